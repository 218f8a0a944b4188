"""The contract between the front door (:mod:`.routines`) and a backend's kernels.

A backend is a module that provides :class:`Kernels`: its name, where its pools live, how it
takes its inputs and moves index arrays to where its kernels read them, and one kernel (or a
few lines that launch some) for each thing the routines do. Everything else (the routines'
documentation, every check of their arguments, the plan of a step) is written once, in
:mod:`.routines`, and the backend binds it to its kernels with :func:`.routines.bind`.

By the time a kernel function is called, every argument has been checked against the pool:
layers, slots and blocks are in range, shapes and dtypes match, index arrays are int32 or
int64 and C-contiguous on the host, and (but for :meth:`Kernels.attend`, which may get no query
rows) there is at least one token or block to move.
A kernel function validates nothing and raises nothing but a backend's own limit (the cuda
backend's largest ``head_dim``).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ..geometry.formats import RawKV
from ..memory.pool import KVPool
from .plan import AttentionPlan, Plan, WritePlan
from .validate import AttentionOptions


class Kernels(Protocol):
    """What a backend module provides to have the routines bound to it."""

    #: the name :func:`pagedkv.get_backend` knows it by
    NAME: str
    #: where its pools live: ``"cpu"`` or ``"cuda"``
    DEVICE: str

    # ---- inputs and index arrays ----

    def to_tokens(self, x: Any, name: str) -> Any:
        """K or V of a write as the kernels take it: float32, on this backend's device (float16
        and bfloat16 widened exactly, :func:`pagedkv.geometry.formats.widen_input`)."""

    def to_queries(self, q: Any) -> Any:
        """The queries of an attention call as the kernels take them (not yet checked)."""

    def to_outputs(self, out: Any) -> Any:
        """A caller's ``out=`` pair as the kernels take it (not yet checked)."""

    def to_index(self, original: Any, checked: np.ndarray) -> Any:
        """An index array where the kernels read it: ``checked`` is the validated host copy of
        the caller's ``original`` (which a GPU backend uses as it is if it is on the GPU)."""

    def on_device(self, plan: Plan, slot_mapping: Any, block_tables: Any) -> Plan:
        """``plan`` with its ``kernel_*`` arrays where the kernels read them."""

    def new_outputs(self, pool: KVPool, num_tokens: int, out: Any = None) -> tuple[Any, Any]:
        """``out`` if given, else two new float32 ``[num_tokens, H, D]`` arrays."""

    # ---- kernels ----

    def store(self, pool: KVPool, layer: int, key: Any, value: Any, w: WritePlan) -> None:
        """Store token t of ``key``/``value`` at slot ``w.slot_mapping[t]`` in the pool's format;
        a negative slot is padding and is skipped."""

    def attend(self, q: Any, pool: KVPool, layer: int, a: AttentionPlan, opt: AttentionOptions) -> Any:
        """Paged attention of the query rows of ``a`` (see :func:`.routines.paged_attention`)."""

    def load(self, pool: KVPool, layer: int, slots: np.ndarray, at: Any, out_k: Any, out_v: Any) -> None:
        """Decode the tokens at ``slots`` (``at``: the same, where the kernels read it) into the
        rows of ``out_k``/``out_v``; zeros for a negative slot."""

    def gather_rows(self, pool: KVPool, layer: int, tables: np.ndarray, at: Any, lens: np.ndarray, out_k: Any,
                    out_v: Any) -> np.ndarray:
        """Decode each sequence's tokens in order into packed rows; returns int32 ``cu_seqlens``."""

    def load_raw(self, pool: KVPool, layer: int, slots: np.ndarray) -> RawKV:
        """The stored elements (and int8 scales) at ``slots``, undecoded; zero bits for padding."""

    def swap_devices(self, src_pool: KVPool, dst_pool: KVPool) -> tuple[str, str]:
        """The devices a swap between these pools must find them on (raises if this backend
        does not swap between them)."""

    def move_blocks(self, src_pool: KVPool, dst_pool: KVPool, src: Any, dst: Any, src_host: np.ndarray,
                    dst_host: np.ndarray) -> None:
        """Copy block ``src[i]`` of ``src_pool`` to ``dst[i]`` of ``dst_pool``, every layer, K and V,
        with their int8 scales (``*_host``: the checked host copies of the caller's arrays)."""
