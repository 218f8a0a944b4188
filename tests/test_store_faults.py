"""Stores under faults: values whose lengths are not the pool's, another model's blocks, hostile
headers, nonsense arguments, a directory deleted mid-run, stores that raise, writers killed
mid-write, and the tiers' memory of loaded blocks. Each test names the failure it guards."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import replace

import numpy as np
import pytest

import pagedkv
from pagedkv import PagedKVCache
from pagedkv.blocks import prefix_key
from pagedkv.offload.stored_block import MAGIC, _value, encode_pool_block, fingerprint, payload_bytes, read_block
from pagedkv.offload.stores import DirectoryStore, HostStore, RedisStore, open_store
from pagedkv.testing.strategies import filled_pool
from pagedkv.tools.model import TinyLlama, generate_dense, generate_paged

from .test_stores import PREFIX, TINY, _free_port, redis_url  # noqa: F401  (redis_url: the module's server)


def _key(tokens=(0, 1)):
    return prefix_key.block_key(None, list(tokens), prefix_key.salt_extras(None))


def _resized(pool, key, delta: int) -> bytes:
    """A value of block 1 whose payload is ``delta`` bytes longer (or shorter), with a header, length
    and sha256 that all agree with it: what another writer of a shared store could leave."""
    payload = np.frombuffer(encode_pool_block(pool, 1, key), np.uint8)[-payload_bytes(pool):]
    payload = np.concatenate([payload, np.full(max(delta, 0), 7, np.uint8)])[:payload.size + delta]
    return _value(fingerprint(pool), key, [memoryview(payload.tobytes())], checksum=True)


@pytest.mark.parametrize("dtype", list(pagedkv.geometry.formats.FORMATS))
def test_a_value_longer_or_shorter_than_the_geometry_is_a_miss(dtype):
    """Before, decode_block checked payload_bytes against the value itself only: an int8 value 8 bytes
    long was loaded, and write_block spilled into the next block's scales (another sequence's)."""
    config = pagedkv.CacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, num_blocks=4, block_size=2, dtype=dtype)
    pool, key = filled_pool(config, seed=3), _key()
    s = pool.strides
    run = s.block_size * s.num_kv_heads * 4 if dtype == "int8" else s.block_stride * pool.config.storage_dtype.itemsize
    assert pagedkv.offload.stored_block.decode_block(pool, key, _resized(pool, key, 0)) is not None  # the honest one
    for delta in (1, -1, 8, run, -run):
        assert pagedkv.offload.stored_block.decode_block(pool, key, _resized(pool, key, delta)) is None, delta


@pytest.mark.parametrize("dtype", ["int8", "float32"])
def test_a_too_long_value_in_a_shared_directory_never_touches_the_next_block(tmp_path, dtype):
    model = TinyLlama(TINY)
    config = model.cache_config(16, block_size=4, dtype=dtype)
    store = DirectoryStore(tmp_path, max_bytes=1 << 20)
    with PagedKVCache(config, backend="numpy", stores=[store], model_id="tiny") as cache:
        group = cache.tiers.groups[0]
        key = group.store_key(prefix_key.block_key(None, PREFIX[:4], prefix_key.salt_extras(None)))
        other = cache.add_sequence(prompt_token_ids=[9] * 9).seq_id  # a live sequence's blocks, K/V written
        step = cache.begin_step([other], [9], token_ids=[[9] * 9])
        rng = np.random.default_rng(0)
        for layer in range(config.num_layers):
            k, v = (rng.standard_normal((9, config.num_kv_heads, config.head_dim), dtype=np.float32) for _ in "kv")
            cache.write(layer, k, v, step)
        cache.end_step()
        before = [np.array(x) for x in (cache.pool.data, cache.pool.scales) if x is not None]
        store.put([(key, _resized(cache.pool, key, 8))])
        with pytest.warns(RuntimeWarning, match="not this pool's block"):
            assert cache.add_sequence(prompt_token_ids=PREFIX + [1]).num_cached_tokens == 0
        after = [np.array(x) for x in (cache.pool.data, cache.pool.scales) if x is not None]
        for b, a in zip(before, after, strict=True):
            np.testing.assert_array_equal(a, b)
        assert cache.stats()["tiers"]["disk"]["rejected"] == 1


def test_write_block_refuses_arrays_of_another_geometry():
    config = pagedkv.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=2, block_size=2, dtype="int8")
    pool = filled_pool(config, seed=1)
    stored = read_block(pool, 0, _key())
    longer = stored._replace(scales=np.zeros((1, 2, 3), np.float32))
    with pytest.raises(pagedkv.ArgumentError, match="stored block"):
        pagedkv.offload.stored_block.write_block(pool, 1, longer)


def test_hostile_headers_are_misses_and_nothing_is_parsed():
    """Before, a deeply nested JSON header raised RecursionError out of add_sequence."""
    config = pagedkv.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=2, block_size=2)
    pool, key = filled_pool(config, seed=1), _key()
    size = payload_bytes(pool)
    deep = b"[" * 200_000 + b"]" * 200_000
    for header in (deep, b"{}", b'{"version": 1}', b"\xff\xfe", b" " * 70_000):
        raw = MAGIC + len(header).to_bytes(4, "little") + header + bytes(size)
        assert pagedkv.offload.stored_block.decode_block(pool, key, raw) is None
    good = encode_pool_block(pool, 1, key)
    assert pagedkv.offload.stored_block.decode_block(pool, key, good) is not None
    lying = bytearray(good)
    lying[4:8] = (int.from_bytes(good[4:8], "little") + 10**6).to_bytes(4, "little")  # a length past the end
    assert pagedkv.offload.stored_block.decode_block(pool, key, bytes(lying)) is None
    assert pagedkv.offload.stored_block.decode_block(pool, key, "not bytes") is None  # type: ignore[arg-type]


def _two_models():
    """A base model and a 'fine-tune': one geometry, other weights (other tokens)."""
    return TinyLlama(TINY), TinyLlama(replace(TINY, seed=1))


@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_two_models_sharing_one_store_each_get_only_their_own_blocks(tmp_path, kind, request):
    """Before, the second model of the same geometry loaded the first's K/V and generated wrong tokens."""
    base, tuned = _two_models()
    prompt = PREFIX + [1, 2]
    if kind == "disk":
        store = open_store(str(tmp_path / "blocks"), "shared")
    else:
        store = RedisStore(request.getfixturevalue("redis_url"), f"shared-{tmp_path.name}")
    for model, name in ((base, "base"), (tuned, "tuned")):
        with PagedKVCache(model.cache_config(32, block_size=4), backend="numpy", stores=[store],
                          model_id=name) as cache:
            got, _ = generate_paged(model, cache, prompt, 3)
            assert got == generate_dense(model, prompt, 3)[0]
            assert cache.stats()["tiers"]["tokens"][kind] == 0  # the other model's blocks are not its own
    for model, name in ((base, "base"), (tuned, "tuned")):  # each finds its own, and only those
        with PagedKVCache(model.cache_config(32, block_size=4), backend="numpy", stores=[store],
                          model_id=name) as cache:
            got, _ = generate_paged(model, cache, prompt, 3)
            assert got == generate_dense(model, prompt, 3)[0]
            assert cache.stats()["tiers"]["tokens"][kind] == 16


def test_a_store_needs_a_model_id_and_a_directory_keeps_its_namespace(tmp_path):
    model = TinyLlama(TINY)
    for bad in (None, "", "  ", 3):
        with pytest.raises(pagedkv.ConfigError, match="model_id"):
            PagedKVCache(model.cache_config(8, block_size=4), stores=[HostStore(1 << 20)], model_id=bad)
    store = open_store(str(tmp_path), "llama-3")
    with PagedKVCache(model.cache_config(16, block_size=4), stores=[store], model_id="tiny") as cache:
        generate_paged(model, cache, PREFIX + [1], 1)
    names = [p.name for p in tmp_path.iterdir()]
    assert names and all(n.startswith("llama-3-") and n.endswith(".pkvb") for n in names)


@pytest.mark.parametrize("make, match", [
    (lambda d: HostStore("1 GiB"), "max_bytes"),
    (lambda d: HostStore(None), "max_bytes"),
    (lambda d: HostStore(-1), "max_bytes"),
    (lambda d: HostStore(0), "max_bytes"),
    (lambda d: HostStore(True), "max_bytes"),
    (lambda d: DirectoryStore(d, None), "max_bytes"),
    (lambda d: DirectoryStore(d, -1), "max_bytes"),
    (lambda d: DirectoryStore(d, 1.5), "max_bytes"),
    (lambda d: DirectoryStore(None, 10), "path"),
    (lambda d: DirectoryStore(d, 10, namespace="../up"), "namespace"),
    (lambda d: DirectoryStore(d, 10, stale_after=0), "stale_after"),
    (lambda d: DirectoryStore("/etc/passwd", 10), "cannot use"),
    (lambda d: RedisStore("redis://127.0.0.1:6379/0", "ns", ttl=0), "ttl"),
    (lambda d: RedisStore("redis://127.0.0.1:6379/0", "ns", ttl=-5), "ttl"),
    (lambda d: RedisStore("redis://127.0.0.1:6379/0", "ns", ttl=1.5), "ttl"),
    (lambda d: RedisStore("redis://127.0.0.1:6379/0", ""), "namespace"),
    (lambda d: RedisStore("redis://h:notaport", "ns"), "cannot use the URL"),
    (lambda d: RedisStore("redis+cluster://h:notaport", "ns"), "cannot use the URL"),
    (lambda d: RedisStore(42, "ns"), "redis.Redis client"),
    (lambda d: open_store("", "ns"), "directory or a redis"),
])
def test_store_constructors_refuse_nonsense(tmp_path, make, match):
    """Before, these were accepted and failed later with a raw TypeError, or stored nothing."""
    pytest.importorskip("redis")
    with pytest.raises(pagedkv.ConfigError, match=match):
        make(tmp_path)


class _Breaking:
    """A store of the user's own that raises on every call (what a directory deleted under
    DirectoryStore did before: a raw FileNotFoundError from its eviction)."""

    name, trusted = "mine", False

    def __init__(self, error: BaseException | None = None):
        self.error = OSError("gone") if error is None else error

    def longest_prefix(self, keys):
        raise self.error

    def get(self, keys):
        raise self.error

    def put(self, items):
        raise self.error

    def delete(self, keys):
        raise self.error

    def stats(self):
        raise self.error


def _run_and_reset(cache, model):
    generate_paged(model, cache, PREFIX + [1, 2], 3)
    seq, cached = cache.add_sequence(prompt_token_ids=PREFIX + [5])
    cache.begin_step([seq], [17 - cached], token_ids=[(PREFIX + [5])[cached:]])
    cache.free(seq)  # held until the step ends
    cache.end_step()
    cache.check()
    cache.reset()
    cache.check()
    assert cache.stats()["blocks_used"] == 0


def test_a_directory_deleted_mid_run_warns_and_leaks_nothing(tmp_path):
    """Before, end_step's flush raised FileNotFoundError after closing the step but before giving its
    held blocks back: 5 of 8 blocks stayed used after reset, and check() passed."""
    model = TinyLlama(TINY)
    store = DirectoryStore(tmp_path / "blocks", max_bytes=1 << 20)
    with PagedKVCache(model.cache_config(16, block_size=4), backend="numpy", stores=[store],
                      model_id="tiny") as cache:
        shutil.rmtree(tmp_path / "blocks")
        with pytest.warns(RuntimeWarning, match="disk store failed"):
            _run_and_reset(cache, model)


def test_a_store_that_raises_is_a_warning_and_a_miss_never_an_exception():
    model = TinyLlama(TINY)
    with PagedKVCache(model.cache_config(16, block_size=4), backend="numpy", stores=[_Breaking()],
                      model_id="tiny") as cache:
        with pytest.warns(RuntimeWarning, match="mine store failed"):
            _run_and_reset(cache, model)
            stats = cache.stats()["tiers"]
        assert stats["tokens"]["mine"] == 0 and stats["mine"]["failed"] >= 3


def test_check_finds_blocks_held_for_a_step_that_is_not_open():
    model = TinyLlama(TINY)
    cache = PagedKVCache(model.cache_config(8, block_size=4), backend="numpy")
    seq = cache.add_sequence().seq_id
    cache.begin_step([seq], [5])
    cache.free(seq)
    cache._open = None  # the state the failed end_step left: a step closed, its held blocks never given back
    with pytest.raises(pagedkv.InvariantError, match="no step is open"):
        cache.check()


class _Interrupt(BaseException):
    """Stands for KeyboardInterrupt (which pytest would take as the user's)."""


def test_add_sequence_is_all_or_nothing_when_a_store_interrupts_it():
    """An exception a store lets through (a BaseException, as KeyboardInterrupt is, which no store
    may swallow) leaves no sequence behind: its id never reached the caller. Before, a short value or a
    hostile header did this with a raw ValueError or RecursionError."""
    model = TinyLlama(TINY)
    host = HostStore(1 << 20)
    with PagedKVCache(model.cache_config(16, block_size=4), backend="numpy", stores=[host],
                      model_id="tiny") as cache:
        generate_paged(model, cache, PREFIX + [1], 1)
    cache = PagedKVCache(model.cache_config(16, block_size=4), backend="numpy",
                         stores=[host, _Breaking(_Interrupt())], model_id="tiny")
    with pytest.raises(_Interrupt):
        cache.add_sequence(prompt_token_ids=PREFIX[:8] + [3])
    assert cache.manager.stats()["sequences"] == 0 and cache.manager.stats()["blocks_used"] == 0
    cache.check()


_KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    from pagedkv import prefix_key
    from pagedkv.offload.stores import DirectoryStore
    store = DirectoryStore(sys.argv[1], max_bytes=1 << 30)
    os.replace = lambda *a: time.sleep(3600)  # stalls between writing its temporary file and renaming it
    store.put([(prefix_key.block_key(None, [int(sys.argv[2])]), b"x" * (1 << 20))])
""")


def test_writers_killed_mid_put_leave_nothing_past_the_bound(tmp_path):
    """Before, temporary files were never counted nor removed: 15 killed writers left 32 MiB in a
    directory bounded to 8 MiB."""
    d = tmp_path / "blocks"
    for i in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(d), str(i)])
        deadline = time.monotonic() + 60
        while len([p for p in d.glob(".pkvb-*.tmp") if p.stat().st_size == 1 << 20]) <= i:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        time.sleep(0.05)
    assert len(list(d.glob(".pkvb-*.tmp"))) == 4
    store = DirectoryStore(d, max_bytes=(3 << 20) + 100, stale_after=30)
    value = b"v" * (1 << 20)
    store.put([(_key((9,)), value)])  # fresh temporary files count: 4 MiB of them, so the new value goes
    assert sum(p.stat().st_size for p in d.iterdir()) <= 5 << 20 and not list(d.glob("*.pkvb"))
    past = time.time() - 120
    for p in d.glob(".pkvb-*.tmp"):
        os.utime(p, (past, past))  # their writers are long gone
    store.put([(_key((9,)), value), (_key((10,)), value)])
    assert not list(d.glob(".pkvb-*.tmp"))
    assert sum(p.stat().st_size for p in d.iterdir()) <= store.max_bytes
    assert store.get([_key((9,)), _key((10,))]) == [value, value]


def test_the_tiers_forget_loaded_blocks_that_left_the_pool_and_write_recomputed_ones_again():
    """Before, every digest ever loaded was kept (60,000 after 30k prompts on a 16-block pool), and a
    block once loaded and later computed again was never written to a store that had lost it."""
    model = TinyLlama(TINY)
    store = HostStore(1 << 24)
    with PagedKVCache(model.cache_config(16, block_size=4), backend="numpy", stores=[store],
                      model_id="tiny") as writer:
        for j in range(40):  # 40 prompts of two full blocks each go to the store
            generate_paged(model, writer, [j % 32, 1, 2, 3, j // 32, 5, 6, 7, 1], 1)
    cache = PagedKVCache(model.cache_config(16, block_size=4), backend="numpy", stores=[store], model_id="tiny")
    for j in range(40):  # loaded from the store, on a pool far smaller than what passed through it
        generate_paged(model, cache, [j % 32, 1, 2, 3, j // 32, 5, 6, 7, 1], 1)
    cache.end_step()
    assert cache.stats()["tiers"]["tokens"]["host"] == 40 * 8
    assert len(cache.tiers.groups[0].loaded) <= 16  # at most what the pool holds
    first = [20, 1, 2, 3, 0, 5, 6, 7, 1]  # loaded, then evicted by the 19 prompts after it
    keys = cache.manager.prompt_keys(first)
    store.delete([cache.tiers.groups[0].store_key(k) for k in keys])  # the store lost the first prompt
    generate_paged(model, cache, first, 1)  # evicted from the pool long ago: computed again...
    cache.end_step()
    assert store.longest_prefix([cache.tiers.groups[0].store_key(k) for k in keys]) == 2  # ...and written again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.close()


def test_unreachable_redis_url_with_a_free_port_is_a_miss_not_an_error():
    pytest.importorskip("redis")
    store = RedisStore(f"redis://127.0.0.1:{_free_port()}/0", "nobody")
    with pytest.warns(RuntimeWarning):
        assert store.get([_key()]) == [None]
