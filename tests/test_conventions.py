"""The other engines' cache layouts: every element lands where each convention says, and the
round trip through a convention is exact in every storage format and pool layout."""

import numpy as np
import pytest

import pagedkv
from pagedkv import CacheConfig, KVPool
from pagedkv.geometry.formats import FORMATS
from pagedkv.memory.conventions import CONVENTIONS, from_convention, to_convention
from pagedkv.testing.strategies import filled_pool

# where element (kv, block b, position p, head h, dim d) sits in each convention's arrays
WHERE = {
    "vllm": lambda kv, b, p, h, d, x, bs: (kv, (b, p, h, d)),
    "hnd": lambda kv, b, p, h, d, x, bs: (kv, (b, h, p, d)),
    "vllm_paged": lambda kv, b, p, h, d, x, bs: (kv, (b, h, d // x, p, d % x) if kv == 0 else (b, h, d, p)),
    "vllm_cpu": lambda kv, b, p, h, d, x, bs: (0, (kv, b, h, p, d)),
    "flashinfer_nhd": lambda kv, b, p, h, d, x, bs: (0, (b, kv, p, h, d)),
    "flashinfer_hnd": lambda kv, b, p, h, d, x, bs: (0, (b, kv, h, p, d)),
    "transformers": lambda kv, b, p, h, d, x, bs: (kv, (b * bs + p, h, d)),
}


def config(dtype="float32", layout="NHD"):
    return CacheConfig(num_layers=2, num_kv_heads=3, head_dim=16, num_blocks=5, block_size=4, layout=layout,
                       dtype=dtype)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_every_element_lands_where_the_convention_says(convention, layout):
    pool = filled_pool(config(layout=layout), seed=3)
    caches = to_convention(pool, convention, 1)
    x = 16 // pool.config.storage_dtype.itemsize
    rng = np.random.default_rng(0)
    for _ in range(50):
        kv, b, p, h, d = (int(rng.integers(n)) for n in (2, 5, 4, 3, 16))
        stored = (pool.k(1) if kv == 0 else pool.v(1))
        want = stored[b, p, h, d] if layout == "NHD" else stored[b, h, p, d]
        which, index = WHERE[convention](kv, b, p, h, d, x, 4)
        assert caches[which][index] == want


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("dtype", list(FORMATS))
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_the_round_trip_is_exact(convention, dtype, layout):
    pool = filled_pool(config(dtype, layout), seed=5)
    back = KVPool(pool.config)
    from_convention(back, convention, 0, to_convention(pool, convention, 0))
    np.testing.assert_array_equal(back.k(0).view(np.uint8), pool.k(0).view(np.uint8))
    np.testing.assert_array_equal(back.v(0).view(np.uint8), pool.v(0).view(np.uint8))
    assert not back.k(1).any() and not back.v(1).any()  # the other layer untouched


def test_bad_conventions_shapes_and_dtypes_are_refused():
    pool = filled_pool(config(), seed=1)
    before = pool.host.copy()
    with pytest.raises(pagedkv.ArgumentError, match="convention must be one of"):
        to_convention(pool, "tensorrt", 0)
    k, v = to_convention(pool, "vllm", 0)
    with pytest.raises(pagedkv.ShapeError, match="shapes"):
        from_convention(pool, "vllm", 0, (k[:2], v))
    with pytest.raises(pagedkv.ShapeError, match="float32"):
        from_convention(pool, "vllm", 0, (k.astype(np.float64), v))
    np.testing.assert_array_equal(pool.host, before)
    odd = KVPool(CacheConfig(num_layers=1, num_kv_heads=1, head_dim=6, num_blocks=2, block_size=2))
    with pytest.raises(pagedkv.ArgumentError, match="multiple"):
        to_convention(odd, "vllm_paged", 0)
