"""The storage formats inside the numba kernels: store a row of float32 numbers in a pool's
format, or decode one, with :mod:`pagedkv.formats`' scalar codecs compiled for the CPU.

numba's CPU target has no float16 or bfloat16 arithmetic, so rows are encoded
and decoded on their bit patterns: the kernels see float32 inputs and outputs
through ``uint32`` views too. Which code a row takes depends on the pool's
element type, so :func:`store_row` and :func:`decode_row` are chosen when a
kernel is compiled for that type (``numba.extending.overload``); a float32
pool compiles to the plain slice copies it always had.

A note for whoever edits this module: numba's on-disk cache of the kernels in
:mod:`pagedkv.backends.numba_cpu` is keyed on that file alone, so after a change
here delete its ``__pycache__/*.nbi``/``*.nbc`` (or touch ``numba_cpu.py``).
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
from numba import njit, types
from numba.core.errors import NumbaIRAssumptionWarning
from numba.extending import overload

from .. import formats

# Inlining store_row's branches (for speed) trips a pedantic internal check of numba's SSA
# pass about variables set in one branch only; the compiled code is right (the agreement
# tests prove it), so that one notice about this function is silenced.
warnings.filterwarnings("ignore", message=r"variable '_store_row__locals__", category=NumbaIRAssumptionWarning)

NONE, TENSOR, TOKEN = 0, 1, 2  #: scale kinds: none, fp8's per-layer, int8's per (token, head)
SCALE_KINDS = {"none": NONE, "tensor": TENSOR, "token": TOKEN}

encode_bits = njit(cache=True)(formats.encode_bits)
decode_bits = njit(cache=True)(formats.decode_bits)

#: the codec argument of a format without one (float32, int8): never read
NO_CODEC = formats.Codec(0, 0, 0, 0, 0, 0)
#: the lookup-table argument of a format decoded without one
NO_LUT = np.zeros(1, np.float32)


@functools.lru_cache(maxsize=64)
def decode_table(name: str, scale: float = 1.0) -> np.ndarray:
    """float32 value of every stored pattern of format ``name`` (times an fp8 layer's ``scale``),
    computed by the reference codec: decoding is then one exact lookup. float16 and fp8 use
    one (256 KiB and 1 KiB); bfloat16 decodes by a shift, int8 by a multiply."""
    fmt = formats.FORMATS[name]
    values = formats.decode(fmt, np.arange(1 << (8 * fmt.itemsize), dtype=np.int64).astype(fmt.storage))
    if fmt.scale == "tensor":
        values = values * np.float32(scale)  # the reference's decode(stored) * scale, element by element
    values.setflags(write=False)
    return values


def store_row(data, at, x, x_bits, off, n, codec, kind, scale, scratch, scratch_bits, scales, scale_at):
    """Store float32 ``x[off:off + n]`` (``x_bits``: its uint32 view) at ``data[at:at + n]`` in the
    pool's format: fp8 divides by ``scale`` first; int8 computes its scale and writes it to
    ``scales[scale_at]``. ``scratch`` (float32, with its uint32 view ``scratch_bits``) holds >= n."""


def decode_row(data, at, n, out, out_bits, off, codec, kind, scale, lut):
    """Decode ``data[at:at + n]`` into float32 ``out[off:off + n]`` (``out_bits``: its uint32
    view): fp8 multiplies by its per-layer ``scale``, int8 by the row's ``scale``. ``lut``, when
    longer than 1, is every pattern's value (the scale folded in), looked up instead."""


@overload(store_row, inline="always")
def _store_row(data, at, x, x_bits, off, n, codec, kind, scale, scratch, scratch_bits, scales, scale_at):
    if data.dtype == types.float32:
        def store_float32(data, at, x, x_bits, off, n, codec, kind, scale, scratch, scratch_bits, scales, scale_at):
            data[at:at + n] = x[off:off + n]
        return store_float32
    if data.dtype == types.int8:
        def store_int8(data, at, x, x_bits, off, n, codec, kind, scale, scratch, scratch_bits, scales, scale_at):
            absmax = np.float32(0.0)
            for d in range(n):
                a = abs(x[off + d])
                if absmax == absmax and (a != a or a > absmax):  # keeps a NaN, as numpy's max does
                    absmax = a
            s = absmax / np.float32(127.0) if absmax > 0 or absmax != absmax else np.float32(1.0)
            scales[scale_at] = s
            for d in range(n):
                q = np.rint(x[off + d] / s)
                if q != q:
                    q = np.float32(0.0)
                data[at + d] = np.int8(min(max(q, np.float32(-127.0)), np.float32(127.0)))
        return store_int8

    def store_minifloat(data, at, x, x_bits, off, n, codec, kind, scale, scratch, scratch_bits, scales, scale_at):
        if kind == TENSOR:  # fp8: stored = encode(x / scale)
            for d in range(n):
                scratch[d] = x[off + d] / scale
            for d in range(n):
                data[at + d] = encode_normal(np.int64(scratch_bits[d]), codec)
        elif codec.exp_bits == 8 and codec.man_bits == 7:  # bfloat16: round the top half, to nearest even
            for d in range(n):
                b = np.int64(x_bits[off + d])
                if b & 0x7FFFFFFF > 0x7F800000:  # NaN: the quiet one, with its sign
                    data[at + d] = ((b >> 16) & 0x8000) | 0x7FC0
                else:  # a carry past the mantissa bumps the exponent, up to inf: rightly
                    data[at + d] = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        else:
            for d in range(n):
                data[at + d] = encode_normal(np.int64(x_bits[off + d]), codec)
    return store_minifloat


@njit(cache=True)
def encode_normal(b, c):
    """:func:`pagedkv.formats.encode_bits`, with a shortcut for numbers that land among the
    target's normal numbers: rebias the exponent and round the mantissa to nearest even in
    one add-and-shift (a carry into the exponent, up to inf, is right). The rest (zero,
    subnormals, overflow, inf, NaN) takes the general codec."""
    a = b & 0x7FFFFFFF
    e = (a >> 23) - 127 + c.bias
    top = (1 << c.exp_bits) - 1
    if e >= 1 and (e <= top if c.finite_only else e < top):
        base = 23 - c.man_bits
        h = (a - ((127 - c.bias) << 23) + (1 << (base - 1)) - 1 + ((a >> base) & 1)) >> base
        nan = (top << c.man_bits) | ((1 << c.man_bits) - 1)
        if c.finite_only and h >= nan:  # past 448: no inf in e4m3fn, so NaN
            h = nan
        return ((b >> 31) << (c.exp_bits + c.man_bits)) | h
    return encode_bits(b, c)


@overload(decode_row, inline="always")
def _decode_row(data, at, n, out, out_bits, off, codec, kind, scale, lut):
    if data.dtype == types.float32:
        def decode_float32(data, at, n, out, out_bits, off, codec, kind, scale, lut):
            out[off:off + n] = data[at:at + n]
        return decode_float32
    if data.dtype == types.int8:
        def decode_int8(data, at, n, out, out_bits, off, codec, kind, scale, lut):
            for d in range(n):
                out[off + d] = np.float32(data[at + d]) * scale
        return decode_int8

    def decode_minifloat(data, at, n, out, out_bits, off, codec, kind, scale, lut):
        if lut.shape[0] > 1:  # a table of every pattern's value (float16, fp8): one load each
            for d in range(n):
                out[off + d] = lut[np.int64(data[at + d])]
            return
        if codec.exp_bits == 8 and codec.man_bits == 7:  # bfloat16: the top half of a float32, exactly
            for d in range(n):
                out_bits[off + d] = np.uint32(data[at + d]) << np.uint32(16)
        else:
            for d in range(n):
                out_bits[off + d] = decode_bits(np.int64(data[at + d]), codec)
        if kind == TENSOR:  # fp8: read = decode(stored) * scale
            for d in range(n):
                out[off + d] = out[off + d] * scale
    return decode_minifloat


def load_row(data, at, n, buf, buf_bits, codec, kind, scale, lut):
    """The float32 values of ``data[at:at + n]``: a view of a float32 pool, else decoded into
    ``buf`` (float32 ``>= n``, with its uint32 view ``buf_bits``) and ``buf`` returned."""


@overload(load_row, inline="always")
def _load_row(data, at, n, buf, buf_bits, codec, kind, scale, lut):
    if data.dtype == types.float32:
        def view_float32(data, at, n, buf, buf_bits, codec, kind, scale, lut):
            return data[at:at + n]
        return view_float32

    def load_decoded(data, at, n, buf, buf_bits, codec, kind, scale, lut):
        decode_row(data, at, n, buf, buf_bits, 0, codec, kind, scale, lut)
        return buf
    return load_decoded
