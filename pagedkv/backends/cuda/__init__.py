"""The routines as ``numba.cuda`` kernels over a pool that lives on the GPU.

The routines of :mod:`pagedkv.ops.routines` (the same checks as every backend), bound to
the kernels here. The pool is a
``KVPool(config, device="cuda")``; K/V inputs may be numba device arrays,
CuPy arrays, torch CUDA tensors (anything with ``__cuda_array_interface__``,
taken without a copy) or numpy arrays (copied to the GPU once per call).
Outputs are numba device arrays (wrap them with ``cupy.asarray`` or
``torch.as_tensor`` at no cost), or the ``out=`` arrays you pass.

Every storage format works: a narrow pool (float16, bfloat16, fp8, int8)
stores and decodes exactly as the reference does, through the kernels of
:mod:`pagedkv.backends.cuda.format_kernels` (which say how).

Index arrays are validated on the host before any kernel runs: a device
index array is copied to the host for that (it is small), then used as is.
A step's :func:`plan` keeps its index arrays on the GPU for every layer.

The kernels are in :mod:`pagedkv.backends.cuda.kernels` (data movement) and
:mod:`pagedkv.backends.cuda.attention` (one CUDA block per query row and K/V
head, split-K for long contexts). Launch sizes come from
:data:`THREADS_PER_BLOCK`, :data:`ATTENTION_THREADS`, :data:`LANES` and the
split-K thresholds (tests shrink them so that the CUDA simulator covers
several blocks, warps and splits with tiny data).

Without numba-cuda (``pip install "pagedkv[gpu]"``) or without a GPU (and
without ``NUMBA_ENABLE_CUDASIM=1``) :func:`pagedkv.get_backend` raises a
:class:`~pagedkv.BackendUnavailableError` that says which.
"""

from __future__ import annotations

import sys

import numpy as np
from numba import cuda

from ...errors import ArgumentError, DTypeError, PoolMismatchError
from ...geometry import formats, layout
from ...geometry.formats import RawKV
from ...geometry.layout import K, V
from ...memory import device
from ...memory.pool import KVPool
from ...ops.plan import AttentionPlan, Plan, WritePlan
from ...ops.routines import bind
from ...ops.validate import AttentionOptions
from .._host import block_offsets, block_scale_offsets, element_index, host_input, scale_index
from . import attention as att
from . import format_kernels as fmt_kernels
from . import words
from .kernels import (
    gather_kernel,
    move_blocks_kernel,
    pack_blocks_kernel,
    read_kernel,
    unpack_blocks_kernel,
    write_kernel,
)

NAME = "cuda"
DEVICE = "cuda"

#: threads per CUDA block of every launch
THREADS_PER_BLOCK = 256
#: threads per CUDA block of paged_attention (one block per query row and K/V head); a multiple of
#: LANES, at most attention.MAX_THREADS
ATTENTION_THREADS = 128
#: the most query heads one attention block serves (at most attention.MAX_GROUP; tests shrink it)
GROUP_HEADS = att.MAX_GROUP
#: the lanes attention's warp reductions span: a warp (tests shrink it under the simulator)
LANES = 32
#: split-K: a row's positions are cut into parts of at least this many ...
SPLIT_POSITIONS = 512
#: ... when a step has fewer than this many (row, K/V head) CUDA blocks: twice the 132
#: multiprocessors of an H100 or H200, so that a small batch of long contexts still fills one
SPLIT_BELOW_BLOCKS = 264


def check_available() -> None:
    """Raise BackendUnavailableError unless a GPU (or the simulator) is there."""
    device.cuda_module()


def _blocks(n: int) -> int:
    return max(1, (n + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK)


def _on_device(x, name: str):
    """``x`` as a numba device array without a copy, or as a C-contiguous numpy array if it is a
    host array of any library (:func:`pagedkv.backends._host.host_input`; copied to the GPU at
    the launch)."""
    if hasattr(x, "copy_to_host"):
        return x
    if hasattr(x, "__cuda_array_interface__") and hasattr(cuda, "as_cuda_array"):
        return cuda.as_cuda_array(x)
    x = host_input(x, name)
    if isinstance(x, np.ndarray):
        return x
    raise DTypeError(f"{name} must be a host or a CUDA array, got {type(x).__name__}")


def _upload(x: np.ndarray):
    """Copy a host array to the GPU: the one place this backend does (tests count the calls).
    A strided or reversed view (an index array sliced ``[::2]``, ``[::-1]``) goes over as a
    contiguous copy, as the CPU backends accept it."""
    return cuda.to_device(np.ascontiguousarray(x))


def _to_device(x):
    """A device array for a kernel: device arrays as they are, host arrays copied over."""
    return _upload(x) if isinstance(x, np.ndarray) else x


def _flat(x):
    """A 1-D view of a C-contiguous device array (kernels index token buffers flat)."""
    return x.reshape(x.size)


def _write(pool: KVPool, layer: int, key, value, slots) -> None:
    """Launch the write of the flat float32 device ``key``/``value`` in the pool's format."""
    fmt, s = pool.config.format, pool.strides
    if fmt.is_float32:
        data, ws = pool.data, _row_words(pool, key, value)
        if ws is not None:  # two numbers a thread, in 8-byte words
            data, key, value, s = words.as_words(data), words.as_words(key), words.as_words(value), ws
        write_kernel[_blocks(key.shape[0]), THREADS_PER_BLOCK](data, layer, key, value, slots, s)
        return
    if fmt.scale == "token":
        rows = key.shape[0] // s.head_dim
        fmt_kernels.write_int8_kernel[_blocks(rows), THREADS_PER_BLOCK](pool.data, pool.scales, layer, key, value,
                                                                        slots, s)
        return
    if pool.kv_scales is not None:  # fp8: stored = encode(x / scale), the division first
        k_scale, v_scale = pool.kv_scales[layer]
        key, value = _divided(key, k_scale), _divided(value, v_scale)
    fmt_kernels.write_minifloat_kernel[_blocks(key.shape[0]), THREADS_PER_BLOCK](
        pool.data, layer, key.view(np.uint32), value.view(np.uint32), slots, s, fmt.codec)


def _row_words(pool: KVPool, *arrays):
    """The strides in 8-byte words if ``pool`` is float32 and its rows and ``arrays`` can move as
    words (:mod:`pagedkv.backends.cuda.words`), else None."""
    if not pool.config.format.is_float32 or not words.aligned(*arrays):
        return None
    return words.word_strides(pool.strides, 4, rows=True)


def _divided(x, scale):
    out = cuda.device_array(x.shape[0], dtype=np.float32)
    fmt_kernels.divide_kernel[_blocks(x.shape[0]), THREADS_PER_BLOCK](x, np.float32(scale), out)
    return out


def _widened(x):
    """K or V of a write as float32 (see :func:`pagedkv.geometry.formats.widen_input`): float16 and
    uint16 (bfloat16 bits) GPU arrays widened by a kernel, host arrays on the host."""
    if isinstance(x, np.ndarray):
        return formats.widen_input(x)
    dtype = np.dtype(getattr(x, "dtype", np.float32))
    if dtype not in (np.float16, np.uint16) or not hasattr(x, "reshape"):
        return x
    out = cuda.device_array(tuple(x.shape), dtype=np.float32)
    flat, grid = _flat(x), (_blocks(x.size), THREADS_PER_BLOCK)
    if dtype == np.uint16:
        fmt_kernels.widen_bfloat16_kernel[grid](flat, _flat(out).view(np.uint32))
    else:
        fmt_kernels.widen_float16_kernel[grid](flat, _flat(out))
    return out


def _take(src, at: np.ndarray, dtype):
    """``src[at]`` on the GPU (0 where ``at < 0``), as a new flat device array."""
    out = cuda.device_array(at.size, dtype=dtype)
    if at.size:
        fmt_kernels.take_kernel[_blocks(at.size), THREADS_PER_BLOCK](src, _upload(at.reshape(-1)), out)
    return out


# ---- the kernel contract (pagedkv.ops.base.Kernels) -----------------------------------------

def to_tokens(x, name: str):
    """K or V of a write on the GPU, without a copy where it already is, as float32 (float16 and
    bfloat16 bits widened by a kernel; a host array goes over once, at the kernel's launch)."""
    return _widened(_on_device(x, name))


def to_queries(q):
    """The queries as a device array (or the host array, copied at the launch)."""
    return _on_device(q, "q")


def to_outputs(out):
    """``out=`` as device arrays (host arrays refused: the results are made on the GPU)."""
    if out is None:
        return None
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        return out  # validation explains
    out = tuple(_on_device(x, f"out[{i}]") for i, x in enumerate(out))
    if any(isinstance(x, np.ndarray) for x in out):
        raise DTypeError("out must be device arrays for the cuda backend")
    return out


def to_index(original, checked: np.ndarray):
    """The index array for a kernel: the caller's device array if it was one, else an upload
    of the checked host copy."""
    return original if device.is_device_array(original) else _upload(checked)


def on_device(plan: Plan, slot_mapping, block_tables) -> Plan:
    """The plan with its index arrays on the GPU (the caller's device arrays where given), so
    that the layers of a step upload nothing."""
    w, a = plan.write, plan.attention
    if w is not None and w.slot_mapping.size:
        w = w._replace(kernel_slots=to_index(slot_mapping, w.slot_mapping))
    if a is not None and a.num_rows:
        a = a._replace(kernel_tables=to_index(block_tables, a.block_tables),
                       kernel_row_seq=_upload(a.row_seq), kernel_row_pos=_upload(a.row_pos))
    return plan._replace(write=w, attention=a)


def new_outputs(pool: KVPool, num_tokens: int, out=None):
    """``out`` if given, else two new float32 ``[num_tokens, H, D]`` device arrays."""
    if out is not None:
        return out[0], out[1]
    c = pool.config
    shape = (num_tokens, c.num_kv_heads, c.head_dim)
    return cuda.device_array(shape, dtype=np.float32), cuda.device_array(shape, dtype=np.float32)


def store(pool: KVPool, layer: int, key, value, w: WritePlan) -> None:
    """The write kernel of the pool's format, over flat device copies of ``key``/``value``."""
    _write(pool, layer, _flat(_to_device(key)), _flat(_to_device(value)), w.kernel_slots)


def attend(q, pool: KVPool, layer: int, a: AttentionPlan, opt: AttentionOptions):
    """One CUDA block per query row and K/V head (serving up to :data:`GROUP_HEADS` query heads),
    split-K when the step has too few blocks for long contexts; returns a device array."""
    c = pool.config
    if c.head_dim > att.MAX_GROUP_DIM:
        raise ArgumentError(f"the cuda backend's attention takes head_dim up to {att.MAX_GROUP_DIM}, got {c.head_dim}")
    out = cuda.device_array(tuple(q.shape), dtype=np.float32)
    rows, heads = q.shape[0], q.shape[1]
    if not rows:
        return out
    per_head = heads // c.num_kv_heads
    group = min(per_head, GROUP_HEADS, att.MAX_GROUP, att.MAX_GROUP_DIM // c.head_dim)  # query heads per CUDA block
    parts = -(-per_head // group)
    threads, lanes = min(ATTENTION_THREADS, att.MAX_THREADS), min(LANES, ATTENTION_THREADS)
    splits, split_len = att.split_positions(a.longest, opt.window, rows * c.num_kv_heads * parts, SPLIT_POSITIONS,
                                            SPLIT_BELOW_BLOCKS)
    args = (pool.data, layer, _to_device(q), a.kernel_tables, a.kernel_row_seq, a.kernel_row_pos, opt.window,
            np.float32(opt.scale), np.float32(opt.soft_cap), pool.strides, *fmt_kernels.decoding(pool, layer), group,
            lanes, split_len, out)
    grid = (rows, c.num_kv_heads * parts, splits)
    if splits == 1:
        att.attention_kernel[grid, threads](*args, fmt_kernels.unused(4), fmt_kernels.unused(4))
        return out
    part_acc = cuda.device_array((rows, splits, heads, c.head_dim), dtype=np.float32)
    part_ml = cuda.device_array((rows, splits, heads, 2), dtype=np.float32)
    att.attention_kernel[grid, threads](*args, part_acc, part_ml)
    att.combine_splits_kernel[(rows, heads), min(threads, c.head_dim)](part_acc, part_ml, a.kernel_row_pos, out)
    return out


def load(pool: KVPool, layer: int, slots: np.ndarray, at, out_k, out_v) -> None:
    """The read kernel: float32 rows in 8-byte words where they align, else element by element
    (decoding a narrow format)."""
    fk, fv = _flat(out_k), _flat(out_v)
    ws = _row_words(pool, fk, fv)
    if ws is not None:
        fk, fv = words.as_words(fk), words.as_words(fv)
        words.read_words_kernel[_blocks(fk.shape[0]), THREADS_PER_BLOCK](
            words.as_words(pool.data), layer, at, fk, fv, ws)
    else:
        read_kernel[_blocks(fk.shape[0]), THREADS_PER_BLOCK](pool.data, layer, at, fk, fv, pool.strides,
                                                             *fmt_kernels.decoding(pool, layer))


def gather_rows(pool: KVPool, layer: int, tables: np.ndarray, at, lens: np.ndarray, out_k, out_v) -> np.ndarray:
    """The gather kernel (words or elements, as :func:`load`); ``cu_seqlens`` is computed on the
    host and comes back there."""
    cu = layout.cu_seqlens(lens)
    fk, fv = _flat(out_k), _flat(out_v)
    ws = _row_words(pool, fk, fv)
    if ws is not None:
        fk, fv = words.as_words(fk), words.as_words(fv)
        words.gather_words_kernel[_blocks(fk.shape[0]), THREADS_PER_BLOCK](
            words.as_words(pool.data), layer, at, _upload(cu), fk, fv, ws)
    else:
        gather_kernel[_blocks(fk.shape[0]), THREADS_PER_BLOCK](pool.data, layer, at, _upload(cu), fk, fv,
                                                               pool.strides, *fmt_kernels.decoding(pool, layer))
    return cu


def load_raw(pool: KVPool, layer: int, slots: np.ndarray) -> RawKV:
    """The stored elements (and int8 scales) at ``slots``, undecoded, as device arrays; padding
    rows are zero bits (the offsets by index arithmetic on the host, the elements taken on the GPU)."""
    c, s = pool.config, pool.strides
    real = slots >= 0
    parts = []
    for kv in (K, V):
        at = np.full((slots.shape[0], c.num_kv_heads, c.head_dim), -1, np.int64)
        at[real] = element_index(s, layer, kv, slots[real])
        parts.append(_take(pool.data, at, c.storage_dtype).reshape(at.shape))
    if pool.scales is not None:
        for kv in (K, V):
            at = np.full((slots.shape[0], c.num_kv_heads), -1, np.int64)
            at[real] = scale_index(s, layer, kv, slots[real])
            parts.append(_take(pool.scales, at, np.float32).reshape(at.shape))
    return RawKV(*parts)


def swap_devices(src_pool: KVPool, dst_pool: KVPool) -> tuple[str, str]:
    """Either pool may be on the GPU, or both; not both on the CPU."""
    if src_pool.device == dst_pool.device == "cpu":
        raise PoolMismatchError("the cuda backend swaps to or from a GPU pool; both pools are on the CPU")
    return src_pool.device, dst_pool.device


def move_blocks(src_pool: KVPool, dst_pool: KVPool, src, dst, src_host: np.ndarray, dst_host: np.ndarray) -> None:
    """Device to device in one kernel; host to device (reload) or device to host (offload) in one
    transfer: the named blocks are packed into one contiguous buffer on the sending side and
    unpacked on the other. int8's scales follow their blocks."""
    if src_pool.device == dst_pool.device:
        _move_on_device(src_pool, dst_pool, src, dst, src_host, dst_host)
        return
    view, s, n = _block_words(src_pool, src_host.size)
    if src_pool.device == "cpu":  # reload: pack on the host, one transfer, unpack on the GPU
        packed = src_pool.host[block_offsets(src_pool.strides, src_host)].reshape(-1)
        unpack_blocks_kernel[_blocks(n), THREADS_PER_BLOCK](
            _upload(view(packed)), view(dst_pool.data), to_index(dst, dst_host), s)
    else:  # offload: pack on the GPU, one transfer, unpack on the host
        t = src_pool.strides
        packed = view(cuda.device_array(src_host.size * t.num_layers * 2 * t.block_stride,
                                        src_pool.config.storage_dtype))
        pack_blocks_kernel[_blocks(n), THREADS_PER_BLOCK](view(src_pool.data), to_index(src, src_host), packed, s)
        dst_pool.host[block_offsets(dst_pool.strides, dst_host).reshape(-1)] = \
            packed.copy_to_host().view(src_pool.config.storage_dtype)
    if src_pool.scales is not None:  # int8: the blocks' scales, one more transfer
        at, to = block_scale_offsets(src_pool, src_host), block_scale_offsets(dst_pool, dst_host)
        if src_pool.device == "cpu":
            fmt_kernels.put_kernel[_blocks(to.size), THREADS_PER_BLOCK](
                _upload(src_pool.host_scales[at]), _upload(to), dst_pool.scales)
        else:
            dst_pool.host_scales[to] = _take(src_pool.scales, at, np.float32).copy_to_host()


def _block_words(p: KVPool, blocks: int):
    """``(as_array, strides, elements)`` for moving ``blocks`` whole blocks of ``p``: in 8-byte
    words where a block is a whole number of them (any format), else number by number."""
    s = p.strides
    ws = words.word_strides(s, p.config.storage_dtype.itemsize, rows=False)
    view, s = (words.as_words, ws) if ws is not None else ((lambda x: x), s)
    return view, s, blocks * s.num_layers * 2 * s.block_stride


def _move_on_device(src_pool: KVPool, dst_pool: KVPool, src, dst, s_host: np.ndarray, d_host: np.ndarray) -> None:
    view, s, n = _block_words(src_pool, s_host.size)
    move_blocks_kernel[_blocks(n), THREADS_PER_BLOCK](view(src_pool.data), view(dst_pool.data),
                                                      to_index(src, s_host), to_index(dst, d_host), s)
    if src_pool.scales is not None:  # int8: the scales go with their blocks
        at, to = block_scale_offsets(src_pool, s_host), block_scale_offsets(dst_pool, d_host)
        fmt_kernels.move_indexed_kernel[_blocks(at.size), THREADS_PER_BLOCK](
            src_pool.scales, _upload(at), dst_pool.scales, _upload(to))


__all__ = [  # the routines, then the kernel contract (pagedkv.ops.base.Kernels)
    "NAME", "DEVICE", "write", "read", "gather", "copy_blocks", "swap_blocks", "paged_attention", "plan", "write_step",
    "attention_step", "new_outputs", "to_tokens", "to_queries", "to_outputs", "to_index", "on_device", "store",
    "attend", "load", "gather_rows", "load_raw", "swap_devices", "move_blocks",
]

# the routines, bound to these kernels
write, read, gather, copy_blocks, swap_blocks, paged_attention, plan, write_step, attention_step = \
    bind(sys.modules[__name__])
