"""The routines as ``numba.cuda`` kernels over a pool that lives on the GPU.

Same signatures and checks as the reference. The pool is a
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

import numpy as np
from numba import cuda

from ...errors import ArgumentError, DTypeError, PoolMismatchError
from ...geometry import formats, layout
from ...geometry.formats import RawKV
from ...geometry.layout import K, V
from ...memory import device
from ...memory.pool import KVPool
from ...ops import validate
from ...ops.plan import Plan, check_attention, check_window, check_write, make_plan
from .._host import block_offsets, block_scale_offsets, element_index, scale_index
from . import attention as att
from . import format_kernels as fmt_kernels
from . import words as words
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
#: LANES, at most cuda_attention.MAX_THREADS
ATTENTION_THREADS = 128
#: the most query heads one attention block serves (at most cuda_attention.MAX_GROUP; tests shrink it)
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
    """``x`` as a numba device array without a copy, or the numpy array itself (host)."""
    if isinstance(x, np.ndarray) or hasattr(x, "copy_to_host"):
        return x
    if hasattr(x, "__cuda_array_interface__") and hasattr(cuda, "as_cuda_array"):
        return cuda.as_cuda_array(x)
    raise DTypeError(f"{name} must be a numpy array or a CUDA array, got {type(x).__name__}")


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


def _read_raw(pool: KVPool, layer: int, slots: np.ndarray) -> RawKV:
    """The stored elements (and int8 scales) at ``slots``, undecoded, as device arrays; padding
    rows are zero bits (the reference's ``read_raw``, by index arithmetic on the host)."""
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


# ---- the public routines ----------------------------------------------------------------------

def _device_index(original, checked: np.ndarray):
    """The index array for a kernel: the caller's device array if it was one, else an upload
    of the checked host copy."""
    return original if device.is_device_array(original) else _upload(checked)


def new_outputs(pool: KVPool, num_tokens: int, out=None):
    """``out`` if given, else two new ``[num_tokens, H, D]`` device arrays of the pool's dtype."""
    if out is not None:
        return out[0], out[1]
    c = pool.config
    shape = (num_tokens, c.num_kv_heads, c.head_dim)
    return cuda.device_array(shape, dtype=np.float32), cuda.device_array(shape, dtype=np.float32)


def _outputs_on_device(out):
    if out is None:
        return None
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        return out  # validation explains
    out = tuple(_on_device(x, f"out[{i}]") for i, x in enumerate(out))
    if any(isinstance(x, np.ndarray) for x in out):
        raise DTypeError("out must be device arrays for the cuda backend")
    return out


# ---- the step API: plan once (validation and uploads), run per layer ---------------------------

def plan(pool: KVPool, *, slot_mapping=None, block_tables=None, context_lens=None, query_lens=None,
         sliding_window=None) -> Plan:
    """Same contract as :func:`pagedkv.backends.reference.plan`; the plan also holds the index
    arrays on the GPU (the caller's device arrays where given), so that the layers of a step
    upload nothing."""
    p = make_plan(pool, DEVICE, slot_mapping=slot_mapping, block_tables=block_tables,
                  context_lens=context_lens, query_lens=query_lens, sliding_window=sliding_window)
    w, a = p.write, p.attention
    if w is not None and w.slot_mapping.size:
        w = w._replace(kernel_slots=_device_index(slot_mapping, w.slot_mapping))
    if a is not None and a.num_rows:
        a = a._replace(kernel_tables=_device_index(block_tables, a.block_tables),
                       kernel_row_seq=_upload(a.row_seq), kernel_row_pos=_upload(a.row_pos))
    return p._replace(write=w, attention=a)


def write_step(pool: KVPool, layer: int, key, value, plan: Plan) -> None:
    """Same contract as :func:`pagedkv.backends.reference.write_step`, on a GPU pool."""
    key, value = _widened(_on_device(key, "key")), _widened(_on_device(value, "value"))
    layer, w = check_write(plan, pool, layer)
    validate.step_tokens(pool, key, value, w.slot_mapping.shape[0])
    if w.slot_mapping.shape[0] == 0:
        return
    _write(pool, layer, _flat(_to_device(key)), _flat(_to_device(value)), w.kernel_slots)


def attention_step(q, pool: KVPool, layer: int, plan: Plan, *, scale=None, sliding_window=None, soft_cap=None):
    """Same contract as :func:`pagedkv.backends.reference.attention_step`; returns a device array."""
    q = _on_device(q, "q")
    layer, a = check_attention(plan, pool, layer)
    validate.queries(pool, q, a.num_rows, a.query_lens is None)
    opt = validate.attention_options(pool, scale, sliding_window, soft_cap)
    check_window(a, opt.window)
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


# ---- one-shot routines ------------------------------------------------------------------------

def write(pool: KVPool, layer: int, key, value, slot_mapping) -> None:
    """Same contract as :func:`pagedkv.backends.reference.write`, on a GPU pool."""
    write_step(pool, layer, key, value, plan(pool, slot_mapping=slot_mapping))


def read(pool: KVPool, layer: int, slot_mapping, *, out=None, raw: bool = False):
    """Same contract as :func:`pagedkv.backends.reference.read`; returns device arrays."""
    if raw:
        validate.no_out_with_raw(out)
    out = _outputs_on_device(out)
    layer, slots = validate.read_args(pool, layer, slot_mapping, out, DEVICE)
    if raw:
        return _read_raw(pool, layer, slots)
    out_k, out_v = new_outputs(pool, slots.shape[0], out)
    if slots.shape[0]:
        fk, fv, at = _flat(out_k), _flat(out_v), _device_index(slot_mapping, slots)
        ws = _row_words(pool, fk, fv)
        if ws is not None:
            fk, fv = words.as_words(fk), words.as_words(fv)
            words.read_words_kernel[_blocks(fk.shape[0]), THREADS_PER_BLOCK](
                words.as_words(pool.data), layer, at, fk, fv, ws)
        else:
            read_kernel[_blocks(fk.shape[0]), THREADS_PER_BLOCK](pool.data, layer, at, fk, fv, pool.strides,
                                                                 *fmt_kernels.decoding(pool, layer))
    return out_k, out_v


def gather(pool: KVPool, layer: int, block_tables, context_lens, *, out=None, raw: bool = False):
    """Same contract as :func:`pagedkv.backends.reference.gather`; returns device arrays.

    ``cu_seqlens`` comes back as a host numpy array (it is computed there).
    """
    if raw:
        validate.no_out_with_raw(out)
    out = _outputs_on_device(out)
    layer, tables, lens, _ = validate.gather_args(pool, layer, block_tables, context_lens, out, DEVICE)
    cu = layout.cu_seqlens(lens)
    if raw:
        return _read_raw(pool, layer, layout.gather_slots(tables, lens, pool.config.block_size)), cu
    out_k, out_v = new_outputs(pool, int(cu[-1]), out)
    if cu[-1]:
        fk, fv, at = _flat(out_k), _flat(out_v), _device_index(block_tables, tables)
        ws = _row_words(pool, fk, fv)
        if ws is not None:
            fk, fv = words.as_words(fk), words.as_words(fv)
            words.gather_words_kernel[_blocks(fk.shape[0]), THREADS_PER_BLOCK](
                words.as_words(pool.data), layer, at, _upload(cu), fk, fv, ws)
        else:
            gather_kernel[_blocks(fk.shape[0]), THREADS_PER_BLOCK](pool.data, layer, at, _upload(cu), fk, fv,
                                                                   pool.strides, *fmt_kernels.decoding(pool, layer))
    return out_k, out_v, cu


def copy_blocks(pool: KVPool, src, dst) -> None:
    """Same contract as :func:`pagedkv.backends.reference.copy_blocks`, on a GPU pool."""
    s_host, d_host = validate.copy_args(pool, pool, src, dst, DEVICE, DEVICE)
    if s_host.size:
        _move_on_device(pool, pool, src, dst, s_host, d_host)


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
                                                      _device_index(src, s_host), _device_index(dst, d_host), s)
    if src_pool.scales is not None:  # int8: the scales go with their blocks
        at, to = block_scale_offsets(src_pool, s_host), block_scale_offsets(dst_pool, d_host)
        fmt_kernels.move_indexed_kernel[_blocks(at.size), THREADS_PER_BLOCK](
            src_pool.scales, _upload(at), dst_pool.scales, _upload(to))


def swap_blocks(src_pool: KVPool, dst_pool: KVPool, src, dst) -> None:
    """Same contract as :func:`pagedkv.backends.reference.swap_blocks`, with either pool on
    the GPU: device to device, host to device (reload) or device to host (offload).

    A host-device swap moves the named blocks in one transfer: they are packed
    into one contiguous buffer on the sending side and unpacked on the other.
    """
    if src_pool.device == dst_pool.device == "cpu":
        raise PoolMismatchError("the cuda backend swaps to or from a GPU pool; both pools are on the CPU")
    s_host, d_host = validate.copy_args(src_pool, dst_pool, src, dst, src_pool.device, dst_pool.device)
    if not s_host.size:
        return
    if src_pool.device == dst_pool.device:
        _move_on_device(src_pool, dst_pool, src, dst, s_host, d_host)
        return
    view, s, n = _block_words(src_pool, s_host.size)
    if src_pool.device == "cpu":  # reload: pack on the host, one transfer, unpack on the GPU
        packed = src_pool.host[block_offsets(src_pool.strides, s_host)].reshape(-1)
        unpack_blocks_kernel[_blocks(n), THREADS_PER_BLOCK](
            _upload(view(packed)), view(dst_pool.data), _device_index(dst, d_host), s)
    else:  # offload: pack on the GPU, one transfer, unpack on the host
        t = src_pool.strides
        packed = view(cuda.device_array(s_host.size * t.num_layers * 2 * t.block_stride, src_pool.config.storage_dtype))
        pack_blocks_kernel[_blocks(n), THREADS_PER_BLOCK](view(src_pool.data), _device_index(src, s_host), packed, s)
        dst_pool.host[block_offsets(dst_pool.strides, d_host).reshape(-1)] = \
            packed.copy_to_host().view(src_pool.config.storage_dtype)
    if src_pool.scales is not None:  # int8: the blocks' scales, one more transfer
        at, to = block_scale_offsets(src_pool, s_host), block_scale_offsets(dst_pool, d_host)
        if src_pool.device == "cpu":
            fmt_kernels.put_kernel[_blocks(to.size), THREADS_PER_BLOCK](
                _upload(src_pool.host_scales[at]), _upload(to), dst_pool.scales)
        else:
            dst_pool.host_scales[to] = _take(src_pool.scales, at, np.float32).copy_to_host()


def paged_attention(q, pool: KVPool, layer: int, block_tables, context_lens, *, scale=None,
                    sliding_window=None, soft_cap=None, query_lens=None):
    """Same contract as :func:`pagedkv.backends.reference.paged_attention`; returns a device array."""
    p = plan(pool, block_tables=block_tables, context_lens=context_lens, query_lens=query_lens,
             sliding_window=sliding_window)
    return attention_step(q, pool, layer, p, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
