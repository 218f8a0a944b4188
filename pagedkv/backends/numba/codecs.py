"""The storage formats inside the numba kernels: store a row of float32 numbers in a pool's
format, or decode one, with :mod:`pagedkv.geometry.formats`' scalar codecs compiled for the CPU.

numba's CPU target has no float16 or bfloat16 arithmetic, so numbers are encoded
and decoded on their bit patterns: float32 inputs are read through ``uint32``
views, and stored bits become float32 values by a bit cast (:func:`as_float32`).
Which code a row takes depends on the pool's element type, so :func:`store_row`
and :func:`decode_row` are chosen when a kernel is compiled for that type
(``numba.extending.overload``); a float32 pool compiles to the plain slice
copies it always had.

Speed rests on two habits. Every loop runs over slices (``src = data[at:at + n]``,
then ``src[d]``), never ``data[at + d]``: numba wraps negative indices, and only
over a slice can LLVM see that ``d`` never is one and vectorise the loop.
And a format's decoding loop has its parameters as constants and no branch
(:func:`decode_loop`, :func:`decode_fp8_loop`): every value computed, then chosen.

A note for whoever edits this module: numba's on-disk cache of the kernels in
:mod:`pagedkv.backends.numba` is keyed on that file alone, so after a change
here delete its ``__pycache__/*.nbi``/``*.nbc`` (or touch ``backends/numba/__init__.py``).
"""

from __future__ import annotations

import warnings

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.errors import NumbaIRAssumptionWarning
from numba.extending import intrinsic, overload

from ...geometry import formats

# Inlining the row encoders' branches (for speed) trips a pedantic internal check of numba's SSA
# pass about variables set in one branch only; the compiled code is right (the agreement
# tests prove it), so that one notice about these functions is silenced.
warnings.filterwarnings("ignore", message=r"variable '_store_row__locals__",
                        category=NumbaIRAssumptionWarning)

NONE, TENSOR, TOKEN = 0, 1, 2  #: scale kinds: none, fp8's per-layer, int8's per (token, head)
SCALE_KINDS = {"none": NONE, "tensor": TENSOR, "token": TOKEN}

encode_bits = njit(cache=True)(formats.encode_bits)
decode_bits = njit(cache=True)(formats.decode_bits)

#: the codec argument of a format without one (float32, int8): never read
NO_CODEC = formats.Codec(0, 0, 0, 0, 0, 0)
ONE = np.float32(1.0)  #: the scale of a format without one
def store_row(data, at, x, x_bits, off, n, codec, kind, scale, scales, scale_at):
    """Store float32 ``x[off:off + n]`` (``x_bits``: its uint32 view) at ``data[at:at + n]`` in the
    pool's format: fp8 divides by ``scale`` first; int8 computes its scale and writes it to
    ``scales[scale_at]``."""


def decode_row(data, at, n, out, off, codec, kind, scale):
    """Decode ``data[at:at + n]`` into float32 ``out[off:off + n]``: fp8 multiplies by its
    per-layer ``scale``, int8 by the row's ``scale``."""


def decode_narrow(data, at, n, out, off, codec, kind, scale):
    """:func:`decode_row` for a pool of a narrow format: a function of its own (see below)."""


# A float32 pool's row is one slice copy, inlined into the kernels (a call for each row of 128
# numbers would cost a tenth of the copy); a narrow format's decoder is a call of its own
# (decode_narrow). Inlined, numba would type each copy of their branches anew at every call
# site, in every pass of its type inference, doubling a narrow attention kernel's compile time
# for no gain at run time (the callers decode a block's rows in one call, or a row's loop costs
# far more than the call). store_row stays inlined: the write kernel calls it per row, and calls a
# narrow format's token (all its heads) as a function of its own instead (the write kernel).
@overload(store_row, inline="always")
def _store_row(data, at, x, x_bits, off, n, codec, kind, scale, scales, scale_at):
    if data.dtype == types.float32:
        def store_float32(data, at, x, x_bits, off, n, codec, kind, scale, scales, scale_at):
            data[at:at + n] = x[off:off + n]
        return store_float32
    if data.dtype == types.int8:
        def store_int8(data, at, x, x_bits, off, n, codec, kind, scale, scales, scale_at):
            src, bits, dst = x[off:off + n], x_bits[off:off + n], data[at:at + n]
            # absmax on the bit patterns: with the sign cleared, the integer order of float32 bits
            # is the order of the numbers, and every NaN lies above inf; an integer max vectorises
            # (a float max that keeps NaNs does not)
            top = np.uint32(0)
            for d in range(n):
                top = max(top, bits[d] & np.uint32(0x7FFFFFFF))
            if top > np.uint32(0x7F800000):  # a NaN: keep the first one, as numpy's max does
                for d in range(n):
                    if src[d] != src[d]:
                        top = bits[d] & np.uint32(0x7FFFFFFF)
                        break
            absmax = as_float32(top)
            s = absmax / np.float32(127.0)
            if not (s > 0 or s != s):  # a zero row, or one whose absmax / 127 underflows: scale 1, q 0
                s = np.float32(1.0)
            scales[scale_at] = s
            for d in range(n):
                q = np.rint(src[d] / s)
                q = np.float32(0.0) if q != q else q
                dst[d] = np.int8(min(max(q, np.float32(-127.0)), np.float32(127.0)))
        return store_int8

    # each format its own loop, its parameters constants in it, so that the loop vectorises; and
    # only the formats of the pool's element type compiled into its kernel
    if data.dtype == types.uint16:
        def store_16_bits(data, at, x, x_bits, off, n, codec, kind, scale, scales, scale_at):
            dst, bits = data[at:at + n], x_bits[off:off + n]
            if codec.exp_bits == 8 and codec.man_bits == 7:  # bfloat16: round the top half, to nearest even
                for d in range(n):
                    b = np.int64(bits[d])
                    if b & 0x7FFFFFFF > 0x7F800000:  # NaN: the quiet one, with its sign
                        dst[d] = ((b >> 16) & 0x8000) | 0x7FC0
                    else:  # a carry past the mantissa bumps the exponent, up to inf: rightly
                        dst[d] = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            elif codec.exp_bits == 5 and codec.man_bits == 10 and not codec.finite_only:
                encode_loop(x[off:off + n], bits, ONE, False, dst, n, 5, 10, 15, False, codec)  # float16
            else:
                encode_each(x[off:off + n], bits, ONE, False, dst, n, codec)
        return store_16_bits

    def store_fp8(data, at, x, x_bits, off, n, codec, kind, scale, scales, scale_at):
        # stored = encode(x / scale): the division inside each format's loop (a pass of its own into
        # a buffer, which a write had to allocate per call, cost fp8 writes a quarter of their time)
        dst, src, bits = data[at:at + n], x[off:off + n], x_bits[off:off + n]
        if codec.exp_bits == 4 and codec.man_bits == 3 and codec.finite_only:
            encode_loop(src, bits, scale, True, dst, n, 4, 3, 7, True, codec)  # fp8_e4m3 (fn)
        elif codec.exp_bits == 5 and codec.man_bits == 2 and not codec.finite_only:
            encode_loop(src, bits, scale, True, dst, n, 5, 2, 15, False, codec)  # fp8_e5m2
        else:
            encode_each(src, bits, scale, True, dst, n, codec)
    return store_fp8


@njit(cache=True)
def encode_each(x, bits, scale, divide, dst, n, codec):
    """``dst[:n]`` = ``x[:n]`` (divided by ``scale`` if ``divide``, else its bits ``bits[:n]``
    as they are) encoded one by one by the reference's codec: a format with no loop of its own."""
    for d in range(n):
        dst[d] = encode_bits(input_bits(x, bits, scale, divide, d), codec)


@njit(inline="always")
def input_bits(x, bits, scale, divide, d):
    """The float32 bits an encoder stores of number ``d``: those of ``x[d] / scale`` (fp8's
    per-layer scale) if ``divide``, else ``bits[d]`` (``x``'s own, NaN payloads included)."""
    return np.int64(as_uint32(x[d] / scale)) if divide else np.int64(bits[d])


@overload(decode_row, inline="always")
def _decode_row(data, at, n, out, off, codec, kind, scale):
    if data.dtype == types.float32:
        def decode_float32(data, at, n, out, off, codec, kind, scale):
            out[off:off + n] = data[at:at + n]
        return decode_float32

    def decode_call(data, at, n, out, off, codec, kind, scale):
        decode_narrow(data, at, n, out, off, codec, kind, scale)
    return decode_call


@intrinsic
def prefetch(typingctx, array, index):
    """Ask the CPU to bring the cache line holding ``array[index]`` into its caches (LLVM's
    ``llvm.prefetch``: a read, kept at every cache level). A hint: it loads nothing into a
    register and never faults."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        hint = builder.module.declare_intrinsic("llvm.prefetch", [byte_pointer],
                                                ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]))
        address = builder.bitcast(builder.gep(data, [args[1]]), byte_pointer)
        builder.call(hint, [address, i32(0), i32(3), i32(1)])  # read, highest locality, data cache
        return context.get_dummy_value()
    return types.void(array, index), codegen


@intrinsic
def as_uint32(typingctx, x):
    """The bit pattern of the float32 ``x``, as a uint32 (a bit cast, no conversion)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def as_float32(typingctx, bits):
    """The float32 whose bit pattern is the uint32 ``bits`` (a bit cast, no conversion)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@njit(inline="always")
def decode_loop(src, dst, n, exp_bits, man_bits, bias, finite_only, nan_payload):
    """``dst[:n]`` = the float32 values of the stored minifloats ``src[:n]``, without a branch, so
    that the loop vectorises (the callers pass the format's parameters as constants).

    :func:`pagedkv.geometry.formats.decode_bits`, by another road: a stored exponent and mantissa,
    placed where a float32 keeps them, read as a float32 are the number times
    2^(bias - 127), exactly (a stored subnormal lands on a float32 subnormal), so one
    multiply by the power of two 2^(127 - bias) finishes the decoding. The all-ones
    exponent is inf or NaN (in e4m3fn: the all-ones pattern alone, NaN)."""
    width = exp_bits + man_bits
    base = np.uint32(23 - man_bits)
    top = np.uint32((1 << width) - 1)
    power = as_float32(np.uint32((254 - bias) << 23))
    for d in range(n):
        h = np.uint32(src[d])
        sign = (h >> np.uint32(width)) << np.uint32(31)
        mag = h & top
        m = mag & np.uint32((1 << man_bits) - 1)
        x = as_float32(sign | (mag << base)) * power
        if finite_only:
            special = mag == top
            bits = sign | np.uint32(0x7FC00000)
        else:
            special = (mag >> np.uint32(man_bits)) == np.uint32((1 << exp_bits) - 1)
            if nan_payload:
                bits = sign | np.uint32(0x7F800000) | (m << base)
            else:
                bits = sign | (np.uint32(0x7FC00000) if m != 0 else np.uint32(0x7F800000))
        dst[d] = as_float32(bits) if special else x


@njit(inline="always")
def encode_loop(x, bits, scale, divide, dst, n, exp_bits, man_bits, bias, finite_only, codec):
    """``dst[:n]`` = float32 ``x[:n]`` (divided by ``scale`` if ``divide``; else its bits
    ``bits[:n]``, as they are) stored in a minifloat format: the format's parameters (and
    ``divide``) are constants at each call, so that the first loop vectorises.

    :func:`pagedkv.geometry.formats.encode_bits` with a shortcut for the numbers that land among
    the format's normal numbers: rebias the exponent and round the mantissa to nearest,
    ties to even, in one add-and-shift (a carry into the exponent, up to inf, is right;
    past e4m3fn's 448, which has no inf, saturated to 448). Overflow, inf and NaN are marked and then
    take the general codec, one by one.

    Numbers below the format's normal range take a shortcut too: a subnormal's stored bits are
    its count of the format's smallest step ``2^(1 - bias - man_bits)``, so ``|x|`` times
    ``2^(bias + man_bits - 1)`` (exact: a power of two) rounded by ``rint`` (to nearest, ties to
    even) is the stored magnitude, and a count that rounds up to ``2^man_bits`` is, rightly, the
    smallest normal number's bits. Without it every zero and subnormal (1-2% of normally
    distributed K/V in fp8) would take the general codec, one by one."""
    base = 23 - man_bits
    top = (1 << exp_bits) - 1
    nan = (top << man_bits) | ((1 << man_bits) - 1)
    highest = top if finite_only else top - 1  # the highest exponent of a normal number
    rebias = (127 - bias) << 23
    steps = as_float32(np.uint32((127 + bias + man_bits - 1) << 23))  # 2^(bias + man_bits - 1)
    others = 0
    for d in range(n):
        b = input_bits(x, bits, scale, divide, d)
        a = b & 0x7FFFFFFF
        e = (a >> 23) - (127 - bias)
        normal = (e >= 1) & (e <= highest)
        below = e < 1  # zero, or under the format's smallest normal number
        h = (a - rebias + (1 << (base - 1)) - 1 + ((a >> base) & 1)) >> base
        if finite_only:  # rounded past the largest finite: saturated, as formats.encode_bits
            h = min(h, nan - 1)
        h_sub = np.int64(np.rint(as_float32(np.uint32(a)) * steps))
        h = h if normal else (h_sub if below else 0)
        dst[d] = ((b >> 31) << (exp_bits + man_bits)) | h
        others += not (normal | below)
    if others:
        for d in range(n):
            b = input_bits(x, bits, scale, divide, d)
            e = ((b & 0x7FFFFFFF) >> 23) - (127 - bias)
            if e > highest:
                dst[d] = encode_bits(b, codec)


@njit(inline="always")
def decode_fp8_loop(src, dst, n, scale, man_bits, bias, finite_only):
    """``dst[:n]`` = fp8 ``src[:n]`` decoded, times the layer's ``scale``, by bit arithmetic on
    each byte, with the format's parameters constants, so that the loop vectorises: 15 G
    numbers/s a core, against 4.5 for the 1 KiB table of every pattern's value that this
    replaced (its lookups are gathers), and bit for bit the table's values.

    A normal number's float32 bits are its exponent and mantissa moved up (``em << (23 -
    man_bits)``) with the exponent rebiased by an add: no float arithmetic, so no subnormal
    float32 ever enters a multiply (which costs a microcode assist). A subnormal's magnitude is
    its mantissa count times the format's smallest step ``2^(1 - bias - man_bits)`` (exact).
    Then one float32 multiply by ``scale``, rounded once, as the reference's ``decode(stored) *
    scale``; the sign is or-ed in afterwards (so -0.0 stays -0.0). Infinity (e5m2) and NaN are
    the reference's: the quiet NaN 0x7FC00000 and inf, with the byte's sign."""
    exp_shift = np.uint32(23 - man_bits)
    rebias = np.uint32((127 - bias) << 23)
    smallest_normal = np.uint32(1 << man_bits)
    step = as_float32(np.uint32((128 - bias - man_bits) << 23))  # 2^(1 - bias - man_bits)
    top = np.uint32(0x7F if finite_only else 0x7C)  # the first magnitude that is not a number
    inf_at = np.uint32(0x80 if finite_only else 0x7C)  # e5m2's infinity (e4m3fn has none: no byte's em is 0x80)
    inf, nan = np.float32(np.inf), np.float32(np.nan)
    for d in range(n):
        # every value computed before it is chosen (a select, no branch): a branch stops the loop vectorising
        b = np.uint32(src[d])
        em = b & np.uint32(0x7F)
        normal = as_float32((em << exp_shift) + rebias)
        subnormal = np.float32(np.int32(em)) * step
        value = (normal if em >= smallest_normal else subnormal) * scale
        special = inf if em == inf_at else nan
        value = value if em < top else special
        dst[d] = as_float32(as_uint32(value) | ((b & np.uint32(0x80)) << np.uint32(24)))


@overload(decode_narrow)
def _decode_narrow(data, at, n, out, off, codec, kind, scale):
    if data.dtype == types.int8:
        def decode_int8(data, at, n, out, off, codec, kind, scale):
            src, dst = data[at:at + n], out[off:off + n]
            for d in range(n):
                dst[d] = np.float32(src[d]) * scale
        return decode_int8

    # each format its own loop, its parameters constants in it (so that the loop vectorises), and
    # only the formats of the pool's element type compiled into its kernel
    if data.dtype == types.uint16:
        def decode_16_bits(data, at, n, out, off, codec, kind, scale):
            src, dst = data[at:at + n], out[off:off + n]
            if codec.exp_bits == 8 and codec.man_bits == 7:  # bfloat16: the top half of a float32, exactly
                for d in range(n):
                    dst[d] = as_float32(np.uint32(src[d]) << np.uint32(16))
            elif codec.exp_bits == 5 and codec.man_bits == 10 and codec.nan_payload_decode:  # float16
                decode_loop(src, dst, n, 5, 10, 15, False, True)
            else:  # any other codec: the reference's scalar decoding
                for d in range(n):
                    dst[d] = as_float32(np.uint32(decode_bits(np.int64(src[d]), codec)))
        return decode_16_bits

    def decode_fp8(data, at, n, out, off, codec, kind, scale):
        src, dst = data[at:at + n], out[off:off + n]
        if codec.exp_bits == 4 and codec.man_bits == 3 and codec.finite_only:
            decode_fp8_loop(src, dst, n, scale, 3, 7, True)  # fp8_e4m3 (fn)
        elif codec.exp_bits == 5 and codec.man_bits == 2 and not codec.finite_only:
            decode_fp8_loop(src, dst, n, scale, 2, 15, False)  # fp8_e5m2
        else:  # any other codec: the reference's scalar decoding, read = decode(stored) * scale
            for d in range(n):
                dst[d] = as_float32(np.uint32(decode_bits(np.int64(src[d]), codec))) * scale
    return decode_fp8


def load_row(data, at, n, buf, codec, kind, scale):
    """The float32 values of ``data[at:at + n]``: a view of a float32 pool, else decoded into
    ``buf`` (float32, ``>= n``) and ``buf`` returned."""


@overload(load_row, inline="always")
def _load_row(data, at, n, buf, codec, kind, scale):
    if data.dtype == types.float32:
        def view_float32(data, at, n, buf, codec, kind, scale):
            return data[at:at + n]
        return view_float32

    def load_decoded(data, at, n, buf, codec, kind, scale):
        decode_row(data, at, n, buf, 0, codec, kind, scale)
        return buf
    return load_decoded
