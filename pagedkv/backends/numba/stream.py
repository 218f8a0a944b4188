"""Large copies with non-temporal ("streaming") stores, for the numba kernels.

A plain store first reads the cache line it writes (the core must own the line
before changing part of it), so a copy of n bytes out of memory moves 3n bytes:
n read, n read for ownership, n written back. A non-temporal store writes whole
lines through the CPU's write-combining buffers, skips that read and leaves the
caches alone: a copy moves 2n.

Below :data:`STREAM_MIN_BYTES` plain stores win: what a small call writes is
still in the caches when it is read back (the next layer's attention, the next
step's write of the same blocks), and streaming would push it out. The threshold
is where the two meet on a two-core x86 server (``docs/performance.md``).

Streaming stores are weakly ordered: another core may see them late. Every task
of a kernel that streams ends with :func:`store_fence`, before numba's thread
pool reports the task done, so the caller sees every number written.

LLVM spells a non-temporal store as an ordinary store with ``!nontemporal``
metadata; on x86 a 16-byte aligned vector store becomes ``movntps``, on other
CPUs what they have (or a plain store where they have nothing). numba's on-disk
cache of :mod:`pagedkv.backends.numba` is keyed on that file alone: after a
change here delete its ``__pycache__/*.nbi``/``*.nbc`` (or touch ``backends/numba/__init__.py``).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .codecs import decode_row, store_row

#: bytes a call stores from which its float32 rows (and copy_blocks' blocks) are streamed
STREAM_MIN_BYTES = 16 << 20

_WORD = 16  # bytes a non-temporal store writes: one SSE register, the widest every x86-64 CPU has


def should_stream(nbytes: int) -> bool:
    """Whether a call storing ``nbytes`` streams them (see the module docstring)."""
    return nbytes >= STREAM_MIN_BYTES


@intrinsic
def _stream_words(typingctx, dst, at, src, off, words):
    """Copy ``words`` 16-byte words from ``src[off:]`` to ``dst[at:]`` with non-temporal stores.
    ``dst[at]`` must lie on a 16-byte boundary (the stores fault otherwise); ``src`` need not."""
    def codegen(context, builder, signature, args):
        dst_array, at_, src_array, off_, words_ = args
        word = ir.VectorType(ir.IntType(64), 2)
        d = context.make_array(signature.args[0])(context, builder, dst_array).data
        s = context.make_array(signature.args[2])(context, builder, src_array).data
        d = builder.bitcast(builder.gep(d, [at_]), word.as_pointer())
        s = builder.bitcast(builder.gep(s, [off_]), word.as_pointer())
        nontemporal = builder.module.add_metadata([ir.IntType(32)(1)])
        with cgutils.for_range(builder, words_) as loop:
            value = builder.load(builder.gep(s, [loop.index]), align=1)
            store = builder.store(value, builder.gep(d, [loop.index]), align=_WORD)
            store.set_metadata("nontemporal", nontemporal)
        return context.get_dummy_value()
    return types.void(dst, types.int64, src, types.int64, types.int64), codegen


@intrinsic
def store_fence(typingctx):
    """Wait until this core's earlier stores, streaming ones included, are visible to every
    other core (LLVM's sequentially consistent fence: ``mfence`` on x86)."""
    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen


@njit(inline="always")
def stream_copy(dst, at, src, off, n):
    """``dst[at:at + n] = src[off:off + n]`` (one element type), the 16-byte aligned middle with
    streaming stores, the ends (and a destination that is not aligned to its own element size)
    with plain ones."""
    size = dst.itemsize
    address = np.int64(dst.ctypes.data) + at * size
    head = min(n, (-address % _WORD) // size)
    aligned = np.int64((address + head * size) % _WORD == 0)  # 0 for an array misaligned to its elements
    words = (n - head) * size // _WORD * aligned  # (a product, not a branch: numba inlines this)
    if head > 0:  # (a row of an aligned pool has no ends: no slices to make)
        dst[at:at + head] = src[off:off + head]
    _stream_words(dst, at + head, src, off + head, words)
    done = head + words * (_WORD // size)
    if done < n:
        dst[at + done:at + n] = src[off + done:off + n]


def put_row(data, at, x, x_bits, off, n, codec, kind, scale, scales, scale_at, stream):
    """:func:`~pagedkv.backends.numba.codecs.store_row`, streamed when ``stream`` is true and
    the pool stores float32 (a narrow format's encoders write through the caches)."""


@overload(put_row, inline="always")
def _put_row(data, at, x, x_bits, off, n, codec, kind, scale, scales, scale_at, stream):
    if data.dtype == types.float32:
        def put_float32(data, at, x, x_bits, off, n, codec, kind, scale, scales, scale_at, stream):
            if stream:
                stream_copy(data, at, x, off, n)
            else:
                data[at:at + n] = x[off:off + n]
        return put_float32

    def put_narrow(data, at, x, x_bits, off, n, codec, kind, scale, scales, scale_at, stream):
        store_row(data, at, x, x_bits, off, n, codec, kind, scale, scales, scale_at)
    return put_narrow


def get_row(data, at, n, out, off, codec, kind, scale, stream):
    """:func:`~pagedkv.backends.numba.codecs.decode_row`, streamed into ``out`` when ``stream``
    is true and the pool stores float32."""


@overload(get_row, inline="always")
def _get_row(data, at, n, out, off, codec, kind, scale, stream):
    if data.dtype == types.float32:
        def get_float32(data, at, n, out, off, codec, kind, scale, stream):
            if stream:
                stream_copy(out, off, data, at, n)
            else:
                out[off:off + n] = data[at:at + n]
        return get_float32

    def get_narrow(data, at, n, out, off, codec, kind, scale, stream):
        decode_row(data, at, n, out, off, codec, kind, scale)
    return get_narrow
