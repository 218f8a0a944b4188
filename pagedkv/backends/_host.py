"""Host-side helpers shared by the CPU backends (the reference and numba)."""

from __future__ import annotations

import numpy as np

from ..pool import KVPool


def new_outputs(pool: KVPool, num_tokens: int, out=None) -> tuple[np.ndarray, np.ndarray]:
    """``out`` if given (already checked), else two new ``[num_tokens, H, D]`` arrays of the pool's dtype."""
    if out is not None:
        return out[0], out[1]
    c = pool.config
    shape = (num_tokens, c.num_kv_heads, c.head_dim)
    return np.empty(shape, dtype=c.dtype), np.empty(shape, dtype=c.dtype)
