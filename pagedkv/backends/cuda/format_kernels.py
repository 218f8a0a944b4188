"""numba.cuda kernels for GPU pools of the narrow formats (float16, bfloat16, fp8, int8).

Exact first, as everywhere in pagedkv: the bytes these kernels store and the
float32 numbers they read back equal the reference's, bit for bit, on any GPU
and under the CUDA simulator, because they run the reference's own rules.

* A minifloat is **encoded** by :func:`pagedkv.geometry.formats.encode_bits` compiled as
  a device function: integer arithmetic on the float32 inputs' bit patterns (the
  kernels take ``uint32`` views of them). fp8 divides by its per-layer scale
  first, in :func:`divide_kernel` (float32 division, correctly rounded, as
  numpy's), and encodes the quotients' bits.
* A minifloat is **decoded** by one lookup in a table of every pattern's float32
  value, computed on the host by :func:`pagedkv.geometry.formats.to_float32` (fp8's scale
  folded in: decode(stored) * scale, as the reference multiplies), so the decoded
  values are the reference's bits, NaN payloads included.
* int8 takes one thread per (token, head) row: absmax, scale = absmax / 127 (1 where
  that is 0), round half to even, as :func:`pagedkv.geometry.formats.quantize_int8`; it
  reads back as ``float32(q) * scale``.

Attention (:mod:`pagedkv.backends.cuda.attention`) and the read and gather kernels
of :mod:`pagedkv.backends.cuda.kernels` decode through ``load_value``, given the
arguments :func:`decoding` says.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, int64, uint32

from ...geometry import formats
from ...geometry.formats import FORMATS
from ...geometry.layout import K, V
from ...memory.pool import KVPool
from .kernels import AS_IS, INT8, TABLE, scale_index, split_element, token_base

encode_bits = cuda.jit(device=True)(formats.encode_bits)


@cuda.jit
def divide_kernel(x, scale, out):
    """``out[i] = x[i] / scale`` in float32: fp8's stored = encode(x / scale), its first half."""
    i = cuda.grid(1)
    if i < x.shape[0]:
        out[i] = x[i] / scale


@cuda.jit
def write_minifloat_kernel(data, layer, key_bits, value_bits, slots, s, codec):
    """Element i of the flat key/value float32 bits (token t, head h, dim d), encoded, to slot ``slots[t]``."""
    i = cuda.grid(1)
    if i >= key_bits.shape[0]:
        return
    t, h, d = split_element(i, s)
    slot = slots[t]
    if slot < 0:  # padding
        return
    within = h * s.head_stride + d
    data[token_base(layer, K, slot, s) + within] = encode_bits(int64(key_bits[i]), codec)
    data[token_base(layer, V, slot, s) + within] = encode_bits(int64(value_bits[i]), codec)


@cuda.jit(device=True)
def _quantize_row(data, at, x, src, n, scales, si):
    """int8: the row ``x[src:src + n]`` to ``data[at:at + n]``, its scale to ``scales[si]``."""
    absmax = float32(0.0)
    for d in range(n):
        a = abs(x[src + d])
        if absmax == absmax and (a != a or a > absmax):  # keeps a NaN, as numpy's max does
            absmax = a
    sc = absmax / float32(127.0)
    if not (sc > 0 or sc != sc):  # a zero row, or one whose absmax / 127 underflows: scale 1, q 0
        sc = float32(1.0)
    scales[si] = sc
    finite = sc < math.inf  # a row with NaN or inf has a NaN or inf scale: every q is 0 (or NaN, stored 0)
    for d in range(n):
        if finite:
            data[at + d] = min(max(round(x[src + d] / sc), -127), 127)  # round(): half to even, as numpy's rint
        else:
            data[at + d] = 0


@cuda.jit
def write_int8_kernel(data, scales, layer, key, value, slots, s):
    """Row j = (token t, head h) of the flat key/value, quantized, to slot ``slots[t]``."""
    j = cuda.grid(1)
    if j >= slots.shape[0] * s.num_kv_heads:
        return
    t = j // s.num_kv_heads
    h = j - t * s.num_kv_heads
    slot = slots[t]
    if slot < 0:
        return
    src = j * s.head_dim
    within = h * s.head_stride
    _quantize_row(data, token_base(layer, K, slot, s) + within, key, src, s.head_dim, scales,
                  scale_index(layer, K, slot, h, s))
    _quantize_row(data, token_base(layer, V, slot, s) + within, value, src, s.head_dim, scales,
                  scale_index(layer, V, slot, h, s))


@cuda.jit
def move_indexed_kernel(src, src_at, dst, dst_at):
    """``dst[dst_at[i]] = src[src_at[i]]``: int8 scales moving with their blocks."""
    i = cuda.grid(1)
    if i < src_at.shape[0]:
        dst[dst_at[i]] = src[src_at[i]]


@cuda.jit
def take_kernel(src, at, out):
    """``out[i] = src[at[i]]``, 0 where ``at[i] < 0`` (raw reads; packing scales for a transfer)."""
    i = cuda.grid(1)
    if i < at.shape[0]:
        out[i] = src[at[i]] if at[i] >= 0 else 0


@cuda.jit
def put_kernel(values, at, dst):
    """``dst[at[i]] = values[i]`` (unpacking scales after a transfer)."""
    i = cuda.grid(1)
    if i < at.shape[0]:
        dst[at[i]] = values[i]


@cuda.jit
def widen_bfloat16_kernel(bits, out_bits):
    """bfloat16 bit patterns (uint16) to float32 bits: the top half of a float32, exactly."""
    i = cuda.grid(1)
    if i < bits.shape[0]:
        out_bits[i] = uint32(bits[i]) << 16


@cuda.jit
def widen_float16_kernel(x, out):
    """float16 to float32: exact."""
    i = cuda.grid(1)
    if i < x.shape[0]:
        out[i] = float32(x[i])


# ---- on the host: what the kernels that decode are given ---------------------------------------

@functools.lru_cache(maxsize=64)
def decode_table(name: str, scale: float):
    """On the GPU: the float32 value of every stored pattern of minifloat format ``name``,
    times fp8's ``scale`` (the reference's values, bit for bit); uploaded once per format and scale."""
    fmt = FORMATS[name]
    patterns = np.arange(1 << (8 * fmt.itemsize), dtype=np.int64).astype(fmt.storage)
    return cuda.to_device(formats.to_float32(fmt, patterns, np.float32(scale) if fmt.scale == "tensor" else None))


@functools.lru_cache(maxsize=2)
def unused(ndim: int = 1):
    """A one-element device array for the kernel arguments a launch does not use (never read)."""
    return cuda.device_array((1,) * ndim, dtype=np.float32)


def decoding(pool: KVPool, layer: int) -> tuple:
    """``(decode, k_table, v_table, scales)``: how the kernels turn ``layer``'s stored
    elements into float32 (see ``kernels.load_value``)."""
    fmt, none = pool.config.format, unused()
    if fmt.is_float32:
        return AS_IS, none, none, none
    if fmt.scale == "token":
        return INT8, none, none, pool.scales
    k_scale, v_scale = pool.kv_scales[layer] if pool.kv_scales is not None else (1.0, 1.0)
    return TABLE, decode_table(fmt.name, float(k_scale)), decode_table(fmt.name, float(v_scale)), none
