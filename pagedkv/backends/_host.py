"""Host-side helpers shared by the backends: the parts of the kernel contract
(:class:`pagedkv.ops.base.Kernels`) that are the same for both CPU backends (inputs taken from
any library's host arrays, index arrays used where they were checked, outputs, raw reads), and
the offsets the cuda backend's host-device swaps pack."""

from __future__ import annotations

import numpy as np

from ..geometry import layout
from ..geometry.formats import RawKV, widen_input
from ..geometry.layout import K, Strides, V
from ..memory.device import host_aligned, host_view
from ..memory.pool import KVPool
from ..ops.plan import Plan

#: bytes from which :func:`new_outputs` starts its arrays on a cache line (below, nothing streams,
#: and the aligned allocation costs a decode-sized call more than it saves)
ALIGN_OUTPUTS_FROM = 1 << 20


def new_outputs(pool: KVPool, num_tokens: int, out=None) -> tuple[np.ndarray, np.ndarray]:
    """``out`` if given (already checked), else two new float32 ``[num_tokens, H, D]`` arrays,
    from :data:`ALIGN_OUTPUTS_FROM` bytes on aligned to a cache line (:func:`pagedkv.memory.device.host_aligned`)."""
    if out is not None:
        return out[0], out[1]
    c = pool.config
    shape = (num_tokens, c.num_kv_heads, c.head_dim)
    if num_tokens * c.num_kv_heads * c.head_dim * 4 >= ALIGN_OUTPUTS_FROM:
        return host_aligned(shape, np.float32), host_aligned(shape, np.float32)
    return np.empty(shape, dtype=np.float32), np.empty(shape, dtype=np.float32)


# ---- the kernel contract's host side (both CPU backends) ----

def host_input(x, name: str):
    """K, V or q from the host as a C-contiguous numpy array: a host array of any library viewed
    without a copy (:func:`pagedkv.memory.device.host_view`: a CPU torch tensor, anything with
    ``__array_interface__``, the buffer protocol or DLPack); a strided one (vLLM's and
    FlashInfer's ``key = kv[:, 0]``) copied once into C order, the one copy the routines make of
    an input. Anything else as it is, for the checks to refuse."""
    view = host_view(x, name)
    return x if view is None else np.ascontiguousarray(view)


def to_tokens(x, name: str):
    """K or V of a write as C-contiguous float32 (:func:`host_input`; float16 and bfloat16
    widened exactly, :func:`pagedkv.geometry.formats.widen_input`)."""
    return widen_input(host_input(x, name))


def to_queries(q):
    """Queries as a C-contiguous numpy array (:func:`host_input`)."""
    return host_input(q, "q")


def to_outputs(out):
    """``out=`` as it is (checked next)."""
    return out


def to_index(original, checked: np.ndarray) -> np.ndarray:
    """The checked host copy: the CPU kernels read it there."""
    return checked


def on_device(plan: Plan, slot_mapping, block_tables) -> Plan:
    """The plan as it is: its kernel arrays are its host arrays."""
    return plan


def swap_devices(src_pool: KVPool, dst_pool: KVPool) -> tuple[str, str]:
    """A CPU backend swaps between two CPU pools."""
    return "cpu", "cpu"


def element_index(s: Strides, layer: int, kv: int, slots: np.ndarray) -> np.ndarray:
    """Flat offsets ``[T, H, D]`` of every number of the tokens stored at ``slots`` (all >= 0)."""
    rows = layout.token_base(layer, kv, slots.astype(np.int64), s)
    heads = np.arange(s.num_kv_heads) * s.head_stride
    dims = np.arange(s.head_dim)
    return rows[:, None, None] + heads[None, :, None] + dims[None, None, :]


def scale_index(s: Strides, layer: int, kv: int, slots: np.ndarray) -> np.ndarray:
    """Indices ``[T, H]`` of the int8 scales of the tokens at ``slots`` (all >= 0)."""
    return layout.scale_index(layer, kv, slots.astype(np.int64)[:, None], np.arange(s.num_kv_heads)[None, :], s)


def stored_at(pool: KVPool, layer: int, kv: int, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The stored elements ``[T, H, D]`` at ``slots`` (all >= 0), and their int8 scales ``[T, H]``."""
    s = pool.strides
    scale = None if pool.scales is None else pool.host_scales[scale_index(s, layer, kv, slots)]
    return pool.host[element_index(s, layer, kv, slots)], scale


def load_raw(pool: KVPool, layer: int, slots: np.ndarray) -> RawKV:
    """The stored elements (and int8 scales) at ``slots``, undecoded; padding rows are zero bits."""
    real = slots >= 0
    c = pool.config
    elements, scales = [], []
    for kv in (K, V):
        stored, scale = stored_at(pool, layer, kv, slots[real])
        x = np.zeros((slots.shape[0], c.num_kv_heads, c.head_dim), c.storage_dtype)  # padding: zero bits
        x[real] = stored
        elements.append(x)
        if scale is not None:
            sc = np.zeros((slots.shape[0], c.num_kv_heads), np.float32)
            sc[real] = scale
            scales.append(sc)
    return RawKV(*elements, *scales)


def block_offsets(s: Strides, blocks: np.ndarray) -> np.ndarray:
    """Flat offsets ``[N, layers, 2, block_stride]`` of whole blocks (every layer, K and V)."""
    layers = np.arange(s.num_layers)[None, :, None, None]
    kv = np.arange(2)[None, None, :, None]
    return layout.block_base(layers, kv, blocks.astype(np.int64)[:, None, None, None], s) + np.arange(s.block_stride)


def block_scale_offsets(p: KVPool, blocks: np.ndarray) -> np.ndarray:
    """Flat indices ``[N * layers * 2 * block_size * H]`` of whole blocks' int8 scales."""
    s = p.strides
    layers = np.arange(s.num_layers)[None, :, None, None]
    kv = np.arange(2)[None, None, :, None]
    run = np.arange(s.block_size * s.num_kv_heads)
    return (layout.block_scale_base(layers, kv, blocks.astype(np.int64)[:, None, None, None], s) + run).reshape(-1)
