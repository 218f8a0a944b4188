"""Backends: the same routines, with the same signatures, on different machinery.

Each backend is a module with ``NAME``, ``DEVICE`` (``"cpu"`` or ``"cuda"``, where its pools
live) and the routines of :class:`Backend`. The routines are written once, in
:mod:`pagedkv.ops.routines` (their documentation and every check of their arguments, made
before any kernel runs); a backend provides only its kernels, as
:class:`pagedkv.ops.base.Kernels` states, and binds the routines to them. A new backend joins
by doing the same and naming its module here.

========  ==========================================  ===================
name      what                                        needs
========  ==========================================  ===================
numpy     the exact reference, plain numpy            numpy
numba     parallel CPU kernels (``numba.njit``)       numba
cuda      GPU kernels (``numba.cuda``)                numba-cuda and a GPU
                                                      (or the simulator)
========  ==========================================  ===================
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, cast

from ..errors import BackendUnavailableError
from ..memory.pool import KVPool
from ..ops.plan import Plan

#: backend name -> module inside this package
_MODULES = {"numpy": "reference", "numba": "numba", "cuda": "cuda"}

BACKENDS = tuple(_MODULES)


class Backend(Protocol):
    """The routines every backend module provides (their contracts: :mod:`pagedkv.ops.routines`)."""

    NAME: str
    DEVICE: str

    def write(self, pool: KVPool, layer: int, key: Any, value: Any, slot_mapping: Any) -> None: ...

    def read(self, pool: KVPool, layer: int, slot_mapping: Any, *, out: Any = None) -> tuple[Any, Any]: ...

    def gather(self, pool: KVPool, layer: int, block_tables: Any, context_lens: Any, *,
               out: Any = None) -> tuple[Any, Any, Any]: ...

    def copy_blocks(self, pool: KVPool, src: Any, dst: Any) -> None: ...

    def swap_blocks(self, src_pool: KVPool, dst_pool: KVPool, src: Any, dst: Any) -> None: ...

    def paged_attention(self, q: Any, pool: KVPool, layer: int, block_tables: Any, context_lens: Any, *,
                        scale: float | None = None, sliding_window: int | None = None,
                        soft_cap: float | None = None, query_lens: Any = None) -> Any: ...

    def plan(self, pool: KVPool, *, slot_mapping: Any = None, block_tables: Any = None,
             context_lens: Any = None, query_lens: Any = None, sliding_window: Any = None) -> Plan: ...

    def write_step(self, pool: KVPool, layer: int, key: Any, value: Any, plan: Plan) -> None: ...

    def attention_step(self, q: Any, pool: KVPool, layer: int, plan: Plan, *, scale: float | None = None,
                       sliding_window: int | None = None, soft_cap: float | None = None) -> Any: ...

    def new_outputs(self, pool: KVPool, num_tokens: int, out: Any = None) -> tuple[Any, Any]: ...


def resolve_backend(name: str = "auto") -> str:
    """The concrete backend name that ``name`` stands for.

    ``"auto"`` means the fastest CPU backend that runs here: ``"numba"``, else
    ``"numpy"``. A GPU backend is only ever chosen by asking for ``"cuda"``,
    since its pools live on the GPU. Other names are returned as they are (an
    unknown one fails in :func:`get_backend`).
    """
    if name != "auto":
        return name
    try:
        importlib.import_module(f".{_MODULES['numba']}", __name__)
        return "numba"
    except ImportError:
        return "numpy"


def get_backend(name: str = "auto") -> Backend:
    """The backend called ``name``: ``"numpy"``, ``"numba"``, ``"cuda"`` or ``"auto"``
    (see :func:`resolve_backend`).

    Raises:
        BackendUnavailableError: an unknown name, or a backend that cannot run
            here (the message says what is missing).
    """
    name = resolve_backend(name)
    if name not in _MODULES:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {BACKENDS} or 'auto'")
    try:
        module = importlib.import_module(f".{_MODULES[name]}", __name__)
    except ImportError as e:
        raise BackendUnavailableError(f"backend {name!r} needs a package that is missing: {e}") from e
    check = getattr(module, "check_available", None)
    if check is not None:
        check()
    return cast(Backend, module)


def available_backends() -> dict[str, str | None]:
    """Each backend name mapped to ``None`` if it runs here, else the reason it does not."""
    out: dict[str, str | None] = {}
    for name in BACKENDS:
        try:
            get_backend(name)
            out[name] = None
        except BackendUnavailableError as e:
            out[name] = str(e)
    return out
