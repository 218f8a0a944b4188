"""CacheConfig and KVPool: construction, sizes, and errors for impossible geometries."""

import numpy as np
import pytest

from pagedkv import CacheConfig, ConfigError, KVPool, LayerIndexError


def small(**kw):
    base = dict(num_layers=2, num_kv_heads=4, head_dim=8, num_blocks=10, block_size=16)
    base.update(kw)
    return CacheConfig(**base)


def test_memory_bytes():
    c = small()
    assert c.memory_bytes == 2 * 2 * 10 * 16 * 4 * 8 * 4
    assert c.bytes_per_block * c.num_blocks == c.memory_bytes
    assert KVPool(c).data.nbytes == c.memory_bytes


def test_from_max_seq_len_as_in_the_cache_engine_seed():
    c = CacheConfig.from_max_seq_len(num_layers=2, num_kv_heads=4, head_dim=8, max_seq_len=100, max_batch_size=3)
    assert c.block_size == 16
    assert c.num_blocks == 7 * 3  # ceil(100 / 16) blocks for each of 3 sequences


def test_from_memory_budget_takes_the_most_blocks_that_fit():
    per_block = small(num_blocks=1).bytes_per_block
    c = CacheConfig.from_memory_budget(per_block * 5 + per_block - 1, num_layers=2, num_kv_heads=4,
                                       head_dim=8, block_size=16)
    assert c.num_blocks == 5
    assert c.memory_bytes <= per_block * 6 - 1
    with pytest.raises(ConfigError, match="holds no block"):
        CacheConfig.from_memory_budget(per_block - 1, num_layers=2, num_kv_heads=4, head_dim=8)


@pytest.mark.parametrize("field", ["num_layers", "num_kv_heads", "head_dim", "num_blocks", "block_size"])
@pytest.mark.parametrize("bad", [0, -1])
def test_non_positive_sizes(field, bad):
    with pytest.raises(ConfigError, match=field):
        small(**{field: bad})


def test_non_integer_size():
    with pytest.raises(ConfigError, match="integer"):
        small(head_dim=8.0)


def test_unknown_layout():
    with pytest.raises(ConfigError, match="layout"):
        small(layout="NDH")


@pytest.mark.parametrize("dtype", [np.float64, np.int32, "fp4", "float8_e3m4"])
def test_unsupported_dtype(dtype):
    with pytest.raises(ConfigError, match="supported: float32, float16, bfloat16, fp8_e4m3, fp8_e5m2, int8"):
        small(dtype=dtype)


@pytest.mark.parametrize("given, name", [
    ("bfloat16", "bfloat16"), (np.float16, "float16"), (np.dtype(np.float32), "float32"), (np.int8, "int8"),
    ("float8_e4m3fn", "fp8_e4m3"), ("fp8_e5m2", "fp8_e5m2"),
])
def test_storage_formats_by_name_or_dtype(given, name):
    assert small(dtype=given).dtype == name


def test_storage_formats_by_ml_dtypes_type():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    assert [small(dtype=t).dtype for t in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)] \
        == ["bfloat16", "fp8_e4m3", "fp8_e5m2"]


def test_memory_counts_the_stored_width_and_the_scales():
    """Llama-3-8B's geometry (32 layers, 8 KV heads, D=128) at 32k tokens."""
    geometry = dict(num_layers=32, num_kv_heads=8, head_dim=128, num_blocks=2048, block_size=16)
    sizes = {d: CacheConfig(**geometry, dtype=d).memory_bytes for d in ("float32", "bfloat16", "fp8_e4m3", "int8")}
    assert sizes["float32"] == 2**33  # 8 GiB
    assert sizes["bfloat16"] == 2**32
    assert sizes["fp8_e4m3"] == 2**31 + 32 * 2 * 4  # and a k and v scale per layer
    assert sizes["int8"] == 2**31 + 2**31 // 128 * 4  # and a float32 scale per token and head
    budget = CacheConfig.from_memory_budget(2**31 + 256, num_layers=32, num_kv_heads=8, head_dim=128,
                                            dtype="fp8_e4m3")
    assert budget.num_blocks == 2048 and budget.memory_bytes <= 2**31 + 256


def test_config_is_frozen_and_hashable():
    c = small()
    assert hash(c) == hash(small())
    with pytest.raises(AttributeError):
        c.num_blocks = 3


def test_views_have_the_layout_shape():
    for layout, shape in (("NHD", (10, 16, 4, 8)), ("HND", (10, 4, 16, 8))):
        pool = KVPool(small(layout=layout))
        assert pool.k(1).shape == shape and pool.v(0).shape == shape
        pool.v(1)[3] = 1.0  # a view, not a copy
        assert pool.data.sum() == 16 * 4 * 8


def test_view_of_a_missing_layer():
    pool = KVPool(small())
    with pytest.raises(LayerIndexError):
        pool.k(2)
    with pytest.raises(LayerIndexError):
        pool.v(-1)


def test_pool_needs_a_config_and_a_known_device():
    with pytest.raises(ConfigError):
        KVPool(dict(num_layers=1))
    with pytest.raises(ConfigError, match="device"):
        KVPool(small(), device="tpu")
