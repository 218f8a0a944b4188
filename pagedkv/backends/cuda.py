"""The routines as ``numba.cuda`` kernels over a pool that lives on the GPU.

Same signatures and checks as the reference. The pool is a
``KVPool(config, device="cuda")``; K/V inputs may be numba device arrays,
CuPy arrays, torch CUDA tensors (anything with ``__cuda_array_interface__``,
taken without a copy) or numpy arrays (copied to the GPU once per call).
Outputs are numba device arrays (wrap them with ``cupy.asarray`` or
``torch.as_tensor`` at no cost), or the ``out=`` arrays you pass.

Index arrays are validated on the host before any kernel runs: a device
index array is copied to the host for that (it is small), then used as is.

Each kernel gives one thread one float, consecutive threads consecutive
``d``, so loads and stores are coalesced in both layouts; the offset
arithmetic is :mod:`pagedkv.layout`'s, compiled as device functions. Launch
sizes come from :data:`THREADS_PER_BLOCK` (tests shrink it so that the CUDA
simulator covers several blocks with tiny data).

Without numba-cuda (``pip install "pagedkv[gpu]"``) or without a GPU (and
without ``NUMBA_ENABLE_CUDASIM=1``) :func:`pagedkv.get_backend` raises a
:class:`~pagedkv.BackendUnavailableError` that says which.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from .. import layout, validate
from ..errors import ArgumentError, BackendUnavailableError, DTypeError, PoolMismatchError
from ..pool import KVPool
from .reference import cu_seqlens

NAME = "cuda"
DEVICE = "cuda"

#: threads per CUDA block of every launch
THREADS_PER_BLOCK = 256
#: threads per CUDA block of paged_attention (one block per query row and head); at most MAX_TILE
ATTENTION_THREADS = 128
MAX_TILE = 256  # positions scored at once; sizes a shared array, so it is a constant
MAX_HEAD_DIM = 512  # sizes the shared accumulator


def check_available() -> None:
    """Raise BackendUnavailableError unless a GPU (or the simulator) is there."""
    if not cuda.is_available():
        raise BackendUnavailableError(
            "backend 'cuda' found no usable GPU (numba.cuda.is_available() is False); "
            "on a machine without one, NUMBA_ENABLE_CUDASIM=1 runs the kernels on numba's simulator"
        )


def device_zeros(n: int, dtype) -> object:
    """A zeroed device array of ``n`` elements (the pool's storage)."""
    check_available()
    data = cuda.device_array(n, dtype=dtype)
    if n:
        _fill[_blocks(n), THREADS_PER_BLOCK](data, 0.0)
    return data


def _blocks(n: int) -> int:
    return max(1, (n + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK)


def _on_device(x, name: str):
    """``x`` as a numba device array without a copy, or the numpy array itself (host)."""
    if isinstance(x, np.ndarray) or hasattr(x, "copy_to_host"):
        return x
    if hasattr(x, "__cuda_array_interface__") and hasattr(cuda, "as_cuda_array"):
        return cuda.as_cuda_array(x)
    raise DTypeError(f"{name} must be a numpy array or a CUDA array, got {type(x).__name__}")


def _to_device(x):
    """A device array for a kernel: device arrays as they are, host arrays copied over."""
    return cuda.to_device(x) if isinstance(x, np.ndarray) else x


def _flat(x):
    """A 1-D view of a C-contiguous device array (kernels index token buffers flat)."""
    return x.reshape(x.size)


# ---- device helpers: the layout arithmetic, compiled for the GPU ------------------------------

token_base = cuda.jit(device=True)(layout.token_base)
block_base = cuda.jit(device=True)(layout.block_base)
table_slot = cuda.jit(device=True)(layout.table_slot)


@cuda.jit(device=True)
def _sequence_of(cu, i):
    """The b with ``cu[b] <= i < cu[b + 1]`` (binary search; skips empty sequences)."""
    lo = 0
    hi = cu.shape[0] - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cu[mid] <= i:
            lo = mid
        else:
            hi = mid
    return lo


@cuda.jit(device=True)
def _split(i, num_heads, head_dim):
    """(row, head, dim) of element i of a flat ``[rows, H, D]`` array."""
    row_len = num_heads * head_dim
    r = i // row_len
    h = (i - r * row_len) // head_dim
    return r, h, i - r * row_len - h * head_dim


# ---- kernels: one thread per float ------------------------------------------------------------

@cuda.jit
def _fill(data, value):
    i = cuda.grid(1)
    if i < data.shape[0]:
        data[i] = value


@cuda.jit
def write_kernel(data, layer, key, value, slots, num_heads, head_dim, block_size,
                 layer_stride, kv_stride, block_stride, pos_stride, head_stride):
    """Element i of the flat key/value (token t, head h, dim d) goes to slot ``slots[t]``."""
    i = cuda.grid(1)
    if i >= key.shape[0]:
        return
    t, h, d = _split(i, num_heads, head_dim)
    slot = slots[t]
    if slot < 0:  # padding (checked explicitly: a negative index would wrap)
        return
    at = token_base(layer, 0, slot, block_size, layer_stride, kv_stride, block_stride, pos_stride)
    at += h * head_stride + d
    data[at] = key[i]
    data[at + kv_stride] = value[i]


@cuda.jit
def read_kernel(data, layer, slots, out_k, out_v, num_heads, head_dim, block_size,
                layer_stride, kv_stride, block_stride, pos_stride, head_stride):
    """Element i of the flat outputs is (token t, head h, dim d) of slot ``slots[t]``; 0 for padding."""
    i = cuda.grid(1)
    if i >= out_k.shape[0]:
        return
    t, h, d = _split(i, num_heads, head_dim)
    slot = slots[t]
    if slot < 0:
        out_k[i] = 0.0
        out_v[i] = 0.0
        return
    at = token_base(layer, 0, slot, block_size, layer_stride, kv_stride, block_stride, pos_stride)
    at += h * head_stride + d
    out_k[i] = data[at]
    out_v[i] = data[at + kv_stride]


@cuda.jit
def gather_kernel(data, layer, tables, cu, out_k, out_v, num_heads, head_dim, block_size,
                  layer_stride, kv_stride, block_stride, pos_stride, head_stride):
    """Packed row r (token ``r - cu[b]`` of sequence b), head h, dim d, for element i of the outputs."""
    i = cuda.grid(1)
    if i >= out_k.shape[0]:
        return
    r, h, d = _split(i, num_heads, head_dim)
    b = _sequence_of(cu, r)
    p = r - cu[b]
    slot = table_slot(tables[b, p // block_size], p, block_size)
    at = token_base(layer, 0, slot, block_size, layer_stride, kv_stride, block_stride, pos_stride)
    at += h * head_stride + d
    out_k[i] = data[at]
    out_v[i] = data[at + kv_stride]


@cuda.jit(device=True)
def _packed_offset(i, blocks, num_layers, layer_stride, kv_stride, block_stride):
    """Pool offset of element i of ``blocks`` packed as ``[N, layers, 2 (K, V), block_stride]``."""
    per_block = num_layers * 2 * block_stride
    n = i // per_block
    rest = i - n * per_block
    half = rest // block_stride  # = layer * 2 + kv
    layer = half // 2
    return block_base(layer, half - layer * 2, blocks[n], layer_stride, kv_stride, block_stride) \
        + rest - half * block_stride


@cuda.jit
def move_blocks_kernel(src_data, dst_data, src, dst, num_layers, layer_stride, kv_stride, block_stride):
    """Element i of the packed copies ``src[n] -> dst[n]`` (every layer, K and V): one thread each."""
    i = cuda.grid(1)
    if i < src.shape[0] * num_layers * 2 * block_stride:
        dst_data[_packed_offset(i, dst, num_layers, layer_stride, kv_stride, block_stride)] = \
            src_data[_packed_offset(i, src, num_layers, layer_stride, kv_stride, block_stride)]


@cuda.jit
def pack_blocks_kernel(data, blocks, packed, num_layers, layer_stride, kv_stride, block_stride):
    """Copy ``blocks`` of every layer and K/V into ``packed`` [N, layers, 2, block_stride] (flat)."""
    i = cuda.grid(1)
    if i < packed.shape[0]:
        packed[i] = data[_packed_offset(i, blocks, num_layers, layer_stride, kv_stride, block_stride)]


@cuda.jit
def unpack_blocks_kernel(packed, data, blocks, num_layers, layer_stride, kv_stride, block_stride):
    """The inverse of :func:`pack_blocks_kernel`."""
    i = cuda.grid(1)
    if i < packed.shape[0]:
        data[_packed_offset(i, blocks, num_layers, layer_stride, kv_stride, block_stride)] = packed[i]


# ---- the public routines ----------------------------------------------------------------------

def _device_index(original, checked: np.ndarray):
    """The index array for a kernel: the caller's device array if it was one, else a copy of the host one."""
    return checked if not isinstance(original, np.ndarray) and hasattr(original, "copy_to_host") \
        else cuda.to_device(checked)


def new_outputs(pool: KVPool, num_tokens: int, out=None):
    """``out`` if given, else two new float32 ``[num_tokens, H, D]`` device arrays."""
    if out is not None:
        return out[0], out[1]
    c = pool.config
    shape = (num_tokens, c.num_kv_heads, c.head_dim)
    return cuda.device_array(shape, dtype=c.dtype), cuda.device_array(shape, dtype=c.dtype)


def _outputs_on_device(out):
    if out is None:
        return None
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        return out  # validation explains
    out = tuple(_on_device(x, f"out[{i}]") for i, x in enumerate(out))
    if any(isinstance(x, np.ndarray) for x in out):
        raise DTypeError("out must be device arrays for the cuda backend")
    return out


def write(pool: KVPool, layer: int, key, value, slot_mapping) -> None:
    """Same contract as :func:`pagedkv.backends.reference.write`, on a GPU pool."""
    key, value = _on_device(key, "key"), _on_device(value, "value")
    layer, slots = validate.write_args(pool, layer, key, value, slot_mapping, DEVICE)
    if slots.shape[0] == 0:
        return
    key, value = _flat(_to_device(key)), _flat(_to_device(value))
    write_kernel[_blocks(key.shape[0]), THREADS_PER_BLOCK](
        pool.data, layer, key, value, _device_index(slot_mapping, slots), *pool.strides.token_args)


def read(pool: KVPool, layer: int, slot_mapping, *, out=None):
    """Same contract as :func:`pagedkv.backends.reference.read`; returns device arrays."""
    out = _outputs_on_device(out)
    layer, slots = validate.read_args(pool, layer, slot_mapping, out, DEVICE)
    out_k, out_v = new_outputs(pool, slots.shape[0], out)
    if slots.shape[0]:
        fk, fv = _flat(out_k), _flat(out_v)
        read_kernel[_blocks(fk.shape[0]), THREADS_PER_BLOCK](
            pool.data, layer, _device_index(slot_mapping, slots), fk, fv, *pool.strides.token_args)
    return out_k, out_v


def gather(pool: KVPool, layer: int, block_tables, context_lens, *, out=None):
    """Same contract as :func:`pagedkv.backends.reference.gather`; returns device arrays.

    ``cu_seqlens`` comes back as a host numpy array (it is computed there).
    """
    out = _outputs_on_device(out)
    layer, tables, lens = validate.gather_args(pool, layer, block_tables, context_lens, out, DEVICE)
    cu = cu_seqlens(lens)
    out_k, out_v = new_outputs(pool, int(cu[-1]), out)
    if cu[-1]:
        fk, fv = _flat(out_k), _flat(out_v)
        gather_kernel[_blocks(fk.shape[0]), THREADS_PER_BLOCK](
            pool.data, layer, _device_index(block_tables, tables), cuda.to_device(cu), fk, fv,
            *pool.strides.token_args)
    return out_k, out_v, cu


def copy_blocks(pool: KVPool, src, dst) -> None:
    """Same contract as :func:`pagedkv.backends.reference.copy_blocks`, on a GPU pool."""
    s_host, d_host = validate.copy_args(pool, pool, src, dst, DEVICE, DEVICE)
    if s_host.size:
        _move_on_device(pool, pool, _device_index(src, s_host), _device_index(dst, d_host))


def _move_on_device(src_pool: KVPool, dst_pool: KVPool, src, dst) -> None:
    s = src_pool.strides
    n = src.shape[0] * s.num_layers * 2 * s.block_stride
    move_blocks_kernel[_blocks(n), THREADS_PER_BLOCK](
        src_pool.data, dst_pool.data, src, dst, s.num_layers, s.layer_stride, s.kv_stride, s.block_stride)


def swap_blocks(src_pool: KVPool, dst_pool: KVPool, src, dst) -> None:
    """Same contract as :func:`pagedkv.backends.reference.swap_blocks`, with either pool on
    the GPU: device to device, host to device (reload) or device to host (offload).

    A host-device swap moves the named blocks in one transfer: they are packed
    into one contiguous buffer on the sending side and unpacked on the other.
    """
    if src_pool.device == dst_pool.device == "cpu":
        raise PoolMismatchError("the cuda backend swaps to or from a GPU pool; both pools are on the CPU")
    s_host, d_host = validate.copy_args(src_pool, dst_pool, src, dst, None, None)
    if not s_host.size:
        return
    s = src_pool.strides
    args = (s.num_layers, s.layer_stride, s.kv_stride, s.block_stride)
    n = s_host.size * s.num_layers * 2 * s.block_stride
    if src_pool.device == dst_pool.device:
        _move_on_device(src_pool, dst_pool, _device_index(src, s_host), _device_index(dst, d_host))
    elif src_pool.device == "cpu":  # reload: pack on the host, one transfer, unpack on the GPU
        packed = _pack_host(src_pool, s_host)
        unpack_blocks_kernel[_blocks(n), THREADS_PER_BLOCK](
            cuda.to_device(packed), dst_pool.data, _device_index(dst, d_host), *args)
    else:  # offload: pack on the GPU, one transfer, unpack on the host
        packed = cuda.device_array(n, dtype=src_pool.config.dtype)
        pack_blocks_kernel[_blocks(n), THREADS_PER_BLOCK](src_pool.data, _device_index(src, s_host), packed, *args)
        _unpack_host(dst_pool, d_host, packed.copy_to_host())


def _block_offsets(p: KVPool, blocks: np.ndarray) -> np.ndarray:
    """Flat offsets ``[N, layers, 2, block_stride]`` of whole blocks (host side of a swap)."""
    s = p.strides
    layers = np.arange(s.num_layers)[None, :, None, None]
    kv = np.arange(2)[None, None, :, None]
    base = layout.block_base(layers, kv, blocks[:, None, None, None], s.layer_stride, s.kv_stride, s.block_stride)
    return base + np.arange(s.block_stride)


def _pack_host(p: KVPool, blocks: np.ndarray) -> np.ndarray:
    return p.data[_block_offsets(p, blocks)].reshape(-1)


def _unpack_host(p: KVPool, blocks: np.ndarray, packed: np.ndarray) -> None:
    p.data[_block_offsets(p, blocks).reshape(-1)] = packed


@cuda.jit
def attention_kernel(data, layer, q, tables, row_seq, row_pos, out, window, scale, cap,
                     num_heads, head_dim, block_size, layer_stride, kv_stride, block_stride,
                     pos_stride, head_stride):
    """One CUDA block per (query row, query head): online softmax over tiles of positions.

    Per tile of ``blockDim.x`` positions: each thread scores one position
    (a dot product over D); thread 0 folds the tile into the running max and
    sum (in shared memory) and turns the scores into weights; then each
    thread updates its share of the D accumulators (consecutive threads,
    consecutive d: coalesced reads of V).
    """
    r = cuda.blockIdx.x
    hq = cuda.blockIdx.y
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    h = hq // (q.shape[1] // num_heads)
    weights = cuda.shared.array(MAX_TILE, float32)
    acc = cuda.shared.array(MAX_HEAD_DIM, float32)
    state = cuda.shared.array(3, float32)  # running max, running sum, this tile's correction
    for d in range(t, head_dim, threads):
        acc[d] = 0.0
    if t == 0:
        state[0] = -math.inf
        state[1] = 0.0
    cuda.syncthreads()
    pos = row_pos[r]
    if pos >= 0:  # the same for the whole block, so the barriers inside are safe
        b = row_seq[r]
        start = 0
        if window > 0:
            start = max(0, pos - window + 1)
        for tile in range(start, pos + 1, threads):
            n = min(threads, pos + 1 - tile)
            x = -math.inf
            if t < n:
                p = tile + t
                at = token_base(layer, 0, table_slot(tables[b, p // block_size], p, block_size), block_size,
                                layer_stride, kv_stride, block_stride, pos_stride) + h * head_stride
                dot = float32(0.0)
                for d in range(head_dim):
                    dot += q[r, hq, d] * data[at + d]
                x = dot * scale
                if cap > 0:
                    x = cap * math.tanh(x / cap)
            weights[t] = x
            cuda.syncthreads()
            if t == 0:
                m_new = state[0]
                for i in range(n):
                    m_new = max(m_new, weights[i])
                total = float32(0.0)
                for i in range(n):
                    e = math.exp(weights[i] - m_new)
                    weights[i] = e
                    total += e
                correction = math.exp(state[0] - m_new)
                state[1] = state[1] * correction + total
                state[0] = m_new
                state[2] = correction
            cuda.syncthreads()
            for d in range(t, head_dim, threads):
                a = acc[d] * state[2]
                for i in range(n):
                    p = tile + i
                    at = token_base(layer, 1, table_slot(tables[b, p // block_size], p, block_size), block_size,
                                    layer_stride, kv_stride, block_stride, pos_stride) + h * head_stride
                    a += weights[i] * data[at + d]
                acc[d] = a
            cuda.syncthreads()
    for d in range(t, head_dim, threads):
        out[r, hq, d] = acc[d] / state[1] if pos >= 0 else 0.0


def paged_attention(q, pool: KVPool, layer: int, block_tables, context_lens, *, scale=None,
                    sliding_window=None, soft_cap=None, query_lens=None):
    """Same contract as :func:`pagedkv.backends.reference.paged_attention`; returns a device array."""
    q = _on_device(q, "q")
    a = validate.attention_args(pool, layer, q, block_tables, context_lens, scale, sliding_window,
                                soft_cap, query_lens, DEVICE)
    c = pool.config
    if c.head_dim > MAX_HEAD_DIM:
        raise ArgumentError(f"the cuda backend's attention handles head_dim up to {MAX_HEAD_DIM}, got {c.head_dim}")
    threads = min(ATTENTION_THREADS, MAX_TILE)
    out = cuda.device_array(tuple(q.shape), dtype=np.float32)
    if q.shape[0]:
        attention_kernel[(q.shape[0], q.shape[1]), threads](
            pool.data, a.layer, _to_device(q), _device_index(block_tables, a.tables), cuda.to_device(a.row_seq),
            cuda.to_device(a.row_pos), out, a.window, np.float32(a.scale), np.float32(a.soft_cap),
            *pool.strides.token_args)
    return out
