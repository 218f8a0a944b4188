"""How far a float32 paged attention may be from the float64 reference, and why.

An attention output is a convex combination of V rows (weights >= 0 that sum
to 1), so its size is at most ``max|V|``. A float32 kernel computes it with
about ``D`` roundings per score (the dot product), one exponential per
position, and sums over ``n`` positions: ``O(n + D)`` roundings, each off by
at most ``eps = 2**-24`` relative. So

    |fast - reference| <= SAFETY * eps * (n + D) * max|V| + a few ulp of |reference|

with ``SAFETY = 8`` covering the order in which sums are taken (``fastmath``
vectorises them), exp/tanh implementations a few ulp apart, and the CUDA
simulator computing exp in float64. The bound is tiny next to a real bug: a
wrong head, a wrong position or an unshifted softmax moves outputs by
``O(max|V|)`` or turns them into NaN.
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps) / 2  # 2**-24, the unit roundoff
SAFETY = 8
RTOL = 4 * EPS32 * SAFETY  # a few ulp of the result itself


def attention_atol(num_positions: int, head_dim: int, max_abs_value: float) -> float:
    """The absolute tolerance of one attention output (see the module docstring)."""
    return SAFETY * EPS32 * (num_positions + head_dim) * max(max_abs_value, 1e-30)


def assert_attention_close(actual, expected, num_positions: int, head_dim: int, max_abs_value: float,
                           err_msg: str = "") -> None:
    """Assert float32 attention output ``actual`` is within the stated bound of ``expected``."""
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=RTOL,
                               atol=attention_atol(num_positions, head_dim, max_abs_value), err_msg=err_msg)
