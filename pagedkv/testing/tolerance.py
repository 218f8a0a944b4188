"""How far a float32 paged attention may be from the float64 reference, and why.

An attention output is a convex combination of V rows (weights >= 0 that sum
to 1), so its size is at most ``max|V|``. A float32 kernel computes it with
about ``D`` roundings per score (the dot product), one exponential per
position, and sums over ``n`` positions: ``O(n + D)`` roundings, each off by
at most ``eps = 2**-24`` relative. Scores themselves can be large: with
``S = D * scale * max|q| * max|k|`` bounding the sum of a dot product's
terms, a float32 score is off by up to ``eps * S``, and softmax carries a
score error ``delta`` into the output as at most ``2 * delta * max|V|``. So

    |fast - reference| <= SAFETY * eps * (n + D + 2 * S) * max|V| + a few ulp of |reference|

with ``SAFETY = 8`` covering the order in which sums are taken (``fastmath``
vectorises them), exp/tanh implementations a few ulp apart, and the CUDA
simulator computing exp in float64. With ordinary inputs ``S`` is small;
with scores in the thousands it dominates, and a correct float32 kernel
really is that far off. The bound stays far below a real bug: a wrong head,
a wrong position or an unshifted softmax moves outputs by ``O(max|V|)`` or
turns them into NaN.
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps) / 2  # 2**-24, the unit roundoff
SAFETY = 8
RTOL = 4 * EPS32 * SAFETY  # a few ulp of the result itself


def score_bound(head_dim: int, scale: float, max_abs_q: float, max_abs_k: float) -> float:
    """``S = D * scale * max|q| * max|k|``: the bound on the dot-product terms of a score."""
    return head_dim * abs(scale) * max_abs_q * max_abs_k


def attention_atol(num_positions: int, head_dim: int, max_abs_value: float, score: float = 0.0) -> float:
    """The absolute tolerance of one attention output (see the module docstring); ``score``
    is :func:`score_bound` of the inputs (0 treats scores as small)."""
    return SAFETY * EPS32 * (num_positions + head_dim + 2 * score) * max(max_abs_value, 1e-30)


#: each storage format's unit roundoff: half the gap between 1 and the next number (float formats,
#: relative to the value); for int8, half a quantisation step relative to the row's absmax
STORAGE_UNIT_ROUNDOFF = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8, "fp8_e4m3": 2.0**-4,
                         "fp8_e5m2": 2.0**-3, "int8": 1 / 254}


def storage_atol(fmt, max_abs_value: float, score: float) -> float:
    """How far attention over a pool of format ``fmt`` may be from attention over a float32 pool
    holding the same K/V (both computed the same way).

    Storing rounds each V number by at most ``u * max|V|`` (``u``: the format's unit
    roundoff; subnormals and int8 rows only round less, relative to that) and each K
    number likewise, which moves a score by at most ``u * S`` (``S``: :func:`score_bound`);
    an output, a convex combination of V rows, then moves by at most
    ``u * max|V| + 2 * u * S * max|V|``. Twice that covers the float32 arithmetic around it.
    """
    u = STORAGE_UNIT_ROUNDOFF[getattr(fmt, "name", fmt)]
    return 2 * u * (1 + 2 * score) * max(max_abs_value, 1e-30)


def assert_attention_close(actual, expected, num_positions: int, head_dim: int, max_abs_value: float,
                           score: float = 0.0, err_msg: str = "") -> None:
    """Assert float32 attention output ``actual`` is within the stated bound of ``expected``."""
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=RTOL,
                               atol=attention_atol(num_positions, head_dim, max_abs_value, score),
                               err_msg=err_msg)
