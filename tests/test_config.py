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


@pytest.mark.parametrize("dtype", [np.float16, np.float64, "int8"])
def test_unsupported_dtype(dtype):
    with pytest.raises(ConfigError, match="float32"):
        small(dtype=dtype)


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
