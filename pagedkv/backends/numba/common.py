"""The jit building blocks the numba kernels share: the layout's arithmetic compiled for the
CPU (the same source the reference runs), the scale of a stored row, and the vectorisable
pieces of attention's inner loops.

numba's on-disk cache of a kernel is keyed on the kernel's own file, not on the helpers it
inlines: after editing one here, delete ``pagedkv/backends/numba/__pycache__/*.nbi`` /
``*.nbc`` (or touch the files of the kernels that use it).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ...geometry import layout
from .codecs import TENSOR, TOKEN, as_float32

#: the float liberties the dot products need to vectorise; no 'ninf'/'nnan': masks use -inf
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

# The layout arithmetic, compiled for the CPU: the same source as the reference uses.
token_base = njit(inline="always", cache=True)(layout.token_base)
table_slot = njit(inline="always", cache=True)(layout.table_slot)
block_base = njit(inline="always", cache=True)(layout.block_base)
scale_index = njit(inline="always", cache=True)(layout.scale_index)
block_scale_base = njit(inline="always", cache=True)(layout.block_scale_base)
window_start = njit(inline="always", cache=True)(layout.window_start)


@njit(inline="always")
def row_scale(layer, kv, slot, h, s, kind, tensor_scale, scales):
    """The multiplier of one stored row: fp8's per-layer scale, int8's per (token, head), or 1."""
    if kind == TOKEN:
        return scales[scale_index(layer, kv, slot, h, s)]
    if kind == TENSOR:
        return tensor_scale
    return np.float32(1.0)


@njit(inline="always")
def fast_exp(x):
    """``exp(x)`` in float32 for ``x <= 0``, without a branch or a library call, so that a loop
    of them vectorises (libm's ``expf`` is a scalar call of about 4 ns, the largest cost of a
    softmax over a block). Cody-Waite reduction ``x = k ln 2 + r`` (``|r| <= ln 2 / 2``), the
    degree-6 polynomial of Cephes' ``expf`` for ``e^r`` (about 1 ulp), and ``2^k`` built from its
    exponent bits; ``x`` below -87 (where ``e^x`` is under float32's normal range) gives
    ``e^-87``, a weight of 1e-38 beside the row's largest weight of 1.
    """
    x = max(x, np.float32(-87.0))
    k = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * r * r + r + np.float32(1.0)
    return y * as_float32(np.uint32(np.int32(k) + np.int32(127)) << np.uint32(23))


@njit(inline="always")
def dot_2x2(q0, q1, k0, k1):
    """``(q0 . k0, q0 . k1, q1 . k0, q1 . k1)``: two queries against two keys, four independent
    sums over D in registers (one sum alone would be a chain of dependent additions)."""
    a0 = a1 = b0 = b1 = np.float32(0.0)
    for d in range(q0.shape[0]):
        x, y, u, v = q0[d], q1[d], k0[d], k1[d]
        a0 += x * u
        a1 += x * v
        b0 += y * u
        b1 += y * v
    return a0, a1, b0, b1


@njit(inline="always")
def add_four_rows(a, b, e, w, i, v0, v1, v2, v3):
    """``a += sum over c < 4 of e[w, i + c] * v_c`` and ``b`` the same with row ``w + 1`` of ``e``:
    two accumulator rows take four value rows per pass (each loaded and stored once)."""
    x0, x1, x2, x3 = e[w, i], e[w, i + 1], e[w, i + 2], e[w, i + 3]
    y0, y1, y2, y3 = e[w + 1, i], e[w + 1, i + 1], e[w + 1, i + 2], e[w + 1, i + 3]
    for d in range(a.shape[0]):
        p, q, r, t = v0[d], v1[d], v2[d], v3[d]
        a[d] += x0 * p + x1 * q + x2 * r + x3 * t
        b[d] += y0 * p + y1 * q + y2 * r + y3 * t
