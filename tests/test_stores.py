"""Prefix blocks beyond the pool: the stored-block format, the host, directory and Redis stores
(a real Redis server, started here), and PagedKVCache writing through to them and loading
from them, in this process and in another one."""

import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import pytest

import pagedkv
from pagedkv import PagedKVCache
from pagedkv.blocks import prefix_key
from pagedkv.offload.stores import (
    DirectoryStore,
    HostStore,
    RedisStore,
    decode_block,
    encode_block,
    encode_pool_block,
    fingerprint,
    read_block,
)
from pagedkv.testing.strategies import filled_pool
from pagedkv.tools.model import ModelConfig, TinyLlama, generate_dense, generate_paged

TINY = ModelConfig(vocab_size=32, dim=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4, hidden_dim=32)
PREFIX = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]  # four blocks of 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis() -> tuple[subprocess.Popen, str]:
    """A real Redis (or Valkey) server on a free localhost port, answering, and its URL. Without one
    installed: a skip, except where PAGEDKV_REQUIRE_REDIS=1 (CI), which fails instead."""
    pytest.importorskip("redis")
    server = shutil.which("redis-server") or shutil.which("valkey-server")
    if server is None:
        if os.environ.get("PAGEDKV_REQUIRE_REDIS") == "1":
            pytest.fail("no redis-server or valkey-server on PATH (PAGEDKV_REQUIRE_REDIS=1)")
        pytest.skip("no redis-server or valkey-server installed (apt-get install redis-server)")
    port = _free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


@pytest.fixture(scope="module")
def redis_url():
    """A real Redis server for this module's tests, stopped afterwards (see _start_redis)."""
    proc, url = _start_redis()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


class RedisCluster:
    """A real Redis Cluster of three masters (no replicas) on free localhost ports, made with
    ``redis-cli --cluster create``; ``url`` names it for RedisStore; :meth:`stop` ends it."""

    def __init__(self, directory):
        import redis

        server = shutil.which("redis-server") or shutil.which("valkey-server")
        cli = shutil.which("redis-cli") or shutil.which("valkey-cli")
        if server is None or cli is None:
            if os.environ.get("PAGEDKV_REQUIRE_REDIS") == "1":
                pytest.fail("no redis-server and redis-cli on PATH (PAGEDKV_REQUIRE_REDIS=1)")
            pytest.skip("no redis-server and redis-cli installed (apt-get install redis-server)")
        self.ports = [self._free_node_port() for _ in range(3)]
        self.procs = {}
        for port in self.ports:  # a node that loses a peer keeps serving its own slots
            self.procs[port] = subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf", "--dir", str(directory),
                 "--cluster-node-timeout", "2000", "--cluster-require-full-coverage", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in self.ports:
            self._wait(lambda p=port: redis.Redis(port=p).ping())
        subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports], "--cluster-replicas",
                        "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        for port in self.ports:
            self._wait(lambda p=port: redis.Redis(port=p).cluster("info")["cluster_state"] == "ok")
        self.url = f"redis+cluster://127.0.0.1:{self.ports[0]}"

    @staticmethod
    def _free_node_port():
        """A free port at most 55535 whose cluster bus port (10000 above) is free too."""
        import random

        while True:
            port = random.randint(20000, 55535)
            try:
                with socket.socket() as a, socket.socket() as b:
                    a.bind(("127.0.0.1", port))
                    b.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                continue

    @staticmethod
    def _wait(ready, seconds=30.0):
        deadline = time.monotonic() + seconds
        while True:
            try:
                if ready():
                    return
            except Exception:
                pass
            assert time.monotonic() < deadline, "the Redis Cluster did not come up"
            time.sleep(0.05)

    def kill(self, port):
        self.procs[port].kill()
        self.procs[port].wait(timeout=10)

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    """A real Redis Cluster for this module's tests (see RedisCluster)."""
    pytest.importorskip("redis")
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()


def _stores(kind, tmp_path, redis_url=None):
    if kind == "host":
        return HostStore(max_bytes=1 << 20)
    if kind == "disk":
        return DirectoryStore(tmp_path / "blocks", max_bytes=1 << 20)
    return RedisStore(redis_url, namespace=f"test-{tmp_path.name}")


@pytest.fixture(params=["host", "disk", "redis", "redis cluster"])
def store(request, tmp_path):
    url = None
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
    elif request.param == "redis cluster":
        url = request.getfixturevalue("redis_cluster").url
    return _stores(request.param, tmp_path, url)


def _keys(n, salt=None):
    keys = []
    for j in range(n):
        keys.append(prefix_key.block_key(keys[-1] if keys else None, [j, j + 1], prefix_key.salt_extras(salt) if not j
                                         else ()))
    return keys


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "fp8_e4m3"])
def test_a_stored_block_round_trips_and_a_damaged_one_is_a_miss(dtype):
    config = pagedkv.CacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, num_blocks=4, block_size=2, dtype=dtype)
    pool = filled_pool(config, seed=1)
    key = _keys(1)[0]
    raw = encode_block(fingerprint(pool), read_block(pool, 3, key))
    assert encode_pool_block(pool, 3, key) == raw  # straight from the pool: the same bytes
    back = decode_block(pool, key, raw)
    assert back is not None
    np.testing.assert_array_equal(back.data, read_block(pool, 3, key).data)
    if dtype == "int8":
        np.testing.assert_array_equal(back.scales, read_block(pool, 3, key).scales)
    flipped = bytearray(raw)
    flipped[-1] ^= 1
    other = pagedkv.KVPool(pagedkv.CacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, num_blocks=4, block_size=2,
                                               dtype="float16" if dtype != "float16" else "float32"))
    assert decode_block(pool, key, raw[:-3]) is None  # truncated
    assert decode_block(pool, key, bytes(flipped)) is None  # corrupted: the checksum says so
    assert decode_block(pool, _keys(2)[1], raw) is None  # another key's
    assert decode_block(other, key, raw) is None  # another format's
    assert decode_block(pool, key, b"junk") is None


def test_every_store_keeps_blocks_by_key(store):
    keys = _keys(3)
    assert store.longest_prefix(keys) == 0 and store.get(keys) == [None] * 3
    store.put([(keys[0], b"zero"), (keys[1], b"one")])
    assert store.longest_prefix(keys) == 2
    assert store.get(keys) == [b"zero", b"one", None]
    store.delete([keys[0]])
    assert store.longest_prefix(keys) == 0 and store.get(keys[1:2]) == [b"one"]
    stats = store.stats()
    assert stats["puts"] == 2 and stats["hits"] == 3 and stats["errors"] == 0


def test_bounded_stores_evict_the_least_recently_used(tmp_path):
    keys = _keys(4)
    for store in (HostStore(max_bytes=30), DirectoryStore(tmp_path, max_bytes=30)):
        store.put([(keys[0], b"a" * 10), (keys[1], b"b" * 10)])
        time.sleep(0.01)
        store.get([keys[0]])  # read: the most recently used now
        time.sleep(0.01)
        store.put([(keys[2], b"c" * 10), (keys[3], b"d" * 10)])  # 40 bytes: one must go, keys[1]
        assert [v is not None for v in store.get(keys)] == [True, False, True, True], store.name


def _serve(stores, prompts, new_tokens=3):
    """Greedy generation of each prompt through a fresh cache backed by ``stores``; returns the
    tokens and the prompt tokens each add_sequence found cached."""
    model = TinyLlama(TINY)
    cache = PagedKVCache(model.cache_config(32, block_size=4), backend="numpy", stores=stores, model_id="tiny")
    out, cached = [], []
    for p in prompts:
        before = cache.stats()["tiers"]["tokens"]
        toks, _ = generate_paged(model, cache, p, new_tokens)
        after = cache.stats()["tiers"]["tokens"]
        out.append(toks)
        cached.append({tier: after[tier] - before[tier] for tier in after})
    cache.close()  # ends the last step: its blocks are written through
    return out, cached, cache


def test_a_pool_on_any_backend_stores_and_loads_prefixes(backend, tmp_path):
    """A GPU pool (the simulator's here) too: its blocks come over to the host to be stored, and
    loaded blocks go back to the device."""
    model = TinyLlama(TINY)
    prompt, other = PREFIX + [1, 2, 3], PREFIX + [7, 7]
    want = generate_dense(model, other, 3)[0]
    store = DirectoryStore(tmp_path / "blocks", max_bytes=1 << 20)
    with PagedKVCache(model.cache_config(16, block_size=4), backend=backend.NAME, stores=[store], model_id="tiny") as a:
        generate_paged(model, a, prompt, 2)
    assert store.stats()["puts"] >= 4  # the prompt's four full blocks (and any the new tokens fill)
    with PagedKVCache(model.cache_config(16, block_size=4, dtype="int8"), backend=backend.NAME,
                      stores=[store], model_id="tiny") as other_format:  # another format's blocks: never loaded
        assert other_format.add_sequence(prompt_token_ids=other).num_cached_tokens == 0
    with PagedKVCache(model.cache_config(16, block_size=4), backend=backend.NAME, stores=[store], model_id="tiny") as b:
        got, _ = generate_paged(model, b, other, 3)
        assert got == want and b.stats()["tiers"]["tokens"]["disk"] == 16


def test_layer_groups_store_and_load_each_groups_blocks(tmp_path):
    """A sliding-window model: each group keeps its own copy of a prompt block under its own key;
    a new pool loads a prefix only where every group finds it."""
    model = TinyLlama(ModelConfig(vocab_size=32, dim=16, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=4,
                                  hidden_dim=32, sliding_window=6))
    config = model.cache_config(32, block_size=4)
    assert len(config.layer_groups) == 2
    prompt, other = PREFIX + [1, 2], PREFIX + [7, 7]
    want = generate_dense(model, other, 3)[0]
    store = HostStore(max_bytes=1 << 20)
    with PagedKVCache(config, stores=[store], model_id="tiny") as a:
        generate_paged(model, a, prompt, 1)
    assert store.stats()["puts"] == 2 * 4  # four full prompt blocks, one copy per group
    with PagedKVCache(config, stores=[store], model_id="tiny") as b:
        got, _ = generate_paged(model, b, other, 3)
        assert got == want and b.stats()["tiers"]["tokens"]["host"] == 16
        b.manager.check()
    flat = TinyLlama(TINY)  # one group, the same geometry: a grouped cache's blocks are not its own
    with PagedKVCache(flat.cache_config(32, block_size=4), stores=[store], model_id="tiny") as c:
        assert c.add_sequence(prompt_token_ids=other).num_cached_tokens == 0
    store.delete(_group_keys(b, PREFIX, 0)[2:])  # the sliding group lost its last two blocks: only two load
    with PagedKVCache(config, stores=[store], model_id="tiny") as d:
        assert d.add_sequence(prompt_token_ids=other).num_cached_tokens == 8
        assert d.stats()["blocks_per_group"] == [2, 2]


def _group_keys(cache, tokens, group):
    """The keys group ``group`` of ``cache`` stores the full blocks of ``tokens`` under."""
    keys = []
    for j in range(len(tokens) // 4):
        keys.append(prefix_key.block_key(keys[-1] if keys else None, tokens[j * 4:(j + 1) * 4],
                                         () if j else prefix_key.salt_extras(None)))
    return [cache.tiers.groups[group].store_key(k) for k in keys]


def test_a_value_without_its_checksum_is_served_only_by_a_trusted_store(tmp_path):
    config = pagedkv.CacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, num_blocks=4, block_size=2, dtype="int8")
    pool = filled_pool(config, seed=2)
    key = _keys(1)[0]
    unsummed = encode_block(fingerprint(pool), read_block(pool, 1, key), checksum=False)
    back = decode_block(pool, key, unsummed, verify=False)
    assert back is not None
    np.testing.assert_array_equal(back.data, read_block(pool, 1, key).data)
    np.testing.assert_array_equal(back.scales, read_block(pool, 1, key).scales)
    assert decode_block(pool, key, unsummed) is None  # verified: no checksum, a miss
    assert decode_block(pool, key, unsummed[:-1], verify=False) is None  # lengths are still checked
    assert decode_block(pool, _keys(2)[1], unsummed, verify=False) is None  # and the key
    for checksum, served in ((False, 0), (True, 2)):  # an untrusted store never serves an unsummed value
        disk = DirectoryStore(tmp_path / f"blocks-{served}", max_bytes=1 << 20)
        with pagedkv.PagedKVCache(config, stores=[disk], model_id="tiny") as cache:
            stored = cache.tiers.groups[0].store_key(key)
            ident = cache.tiers.groups[0].identity()
            disk.put([(stored, encode_block(ident.fp, read_block(pool, 1, stored), checksum=checksum))])
            with pytest.warns(RuntimeWarning, match="not this pool's block") if not checksum else nullcontext():
                assert cache.add_sequence(prompt_token_ids=[0, 1, 2]).num_cached_tokens == served


def test_values_are_checksummed_unless_every_store_is_trusted(tmp_path):
    model = TinyLlama(TINY)
    for with_disk, summed in ((False, False), (True, True)):
        host, disk = HostStore(max_bytes=1 << 20), DirectoryStore(tmp_path / f"blocks-{summed}", max_bytes=1 << 20)
        stores = [host, disk] if with_disk else [host]
        with pagedkv.PagedKVCache(model.cache_config(16, block_size=4), stores=stores, model_id="tiny") as cache:
            assert cache.tiers.checksum is summed
            generate_paged(model, cache, PREFIX + [1], 1)
            (value,) = host.get([cache.tiers.groups[0].store_key(prefix_key.block_key(None, PREFIX[:4],
                                                                          prefix_key.salt_extras(None)))])
        assert (json.loads(value[8:8 + struct.unpack("<I", value[4:8])[0]])["sha256"] is not None) is summed


def test_a_new_pool_loads_shared_prefixes_from_each_tier(tmp_path, redis_url):
    first = [PREFIX + [1, 2, 3]]
    second = [PREFIX + [7, 7], PREFIX[:8] + [0, 0, 0, 0, 1]]
    want = [generate_dense(TinyLlama(TINY), p, 3)[0] for p in second]
    for kind in ("host", "disk", "redis"):
        store = _stores(kind, tmp_path / kind, redis_url)
        _serve([store], first)
        got, cached, _ = _serve([store], second)
        assert got == want, kind
        assert cached[0][kind] == 16 and cached[0]["pool"] == 0  # every full shared block, from the store
        assert cached[1]["pool"] == 8  # the second prompt's shared blocks: in the pool by now


def test_another_process_shares_prefixes_through_redis(redis_url):
    """Process A (this one) serves long prompts; process B, started afterwards, finds their
    prefixes in Redis and generates exactly the tokens A's model would."""
    namespace = f"two-processes-{os.getpid()}"
    _serve([RedisStore(redis_url, namespace)], [PREFIX + [1, 2, 3]])
    script = f"""
import json
from pagedkv import PagedKVCache
from pagedkv.tools.model import ModelConfig, TinyLlama, generate_paged
from pagedkv.offload.stores import RedisStore
model = TinyLlama(ModelConfig(vocab_size=32, dim=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4,
                              hidden_dim=32))
cache = PagedKVCache(model.cache_config(32, block_size=4), backend="numpy",
                     stores=[RedisStore({redis_url!r}, {namespace!r})], model_id="tiny")
tokens, _ = generate_paged(model, cache, {PREFIX + [7, 7]!r}, 3)
print(json.dumps({{"tokens": tokens, "tiers": cache.stats()["tiers"]["tokens"]}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    import json

    result = json.loads(out)
    assert result["tokens"] == generate_dense(TinyLlama(TINY), PREFIX + [7, 7], 3)[0]
    assert result["tiers"]["redis"] == 16 and result["tiers"]["pool"] == 0


def test_a_cluster_spreads_blocks_over_its_nodes_and_serves_prefixes(redis_cluster):
    """Blocks of a long prompt land on every node (their keys hash to slots all over); another pool
    finds them all there, and generates the dense cache's tokens."""
    import redis

    namespace = f"spread-{os.getpid()}"
    prompt = PREFIX * 3 + [1, 2, 3]  # 51 tokens: with the new ones, 13 whole blocks written through
    _serve([RedisStore(redis_cluster.url, namespace)], [prompt])
    held = [len(redis.Redis(port=p).keys(f"{namespace}:*")) for p in redis_cluster.ports]
    assert sum(held) == 13 and all(held), held
    got, cached, _ = _serve([RedisStore(redis_cluster.url, namespace)], [prompt[:-1] + [7]])
    assert got == [generate_dense(TinyLlama(TINY), prompt[:-1] + [7], 3)[0]]
    assert cached[0]["redis"] == 48 and cached[0]["pool"] == 0


def test_a_cluster_node_that_goes_down_misses_its_keys_only(tmp_path):
    """One of three masters killed: its keys are misses (warned, counted), the other nodes' keys
    are served, and a cache over the cluster still generates the dense cache's tokens."""
    import redis

    cluster = RedisCluster(tmp_path)
    try:
        store = RedisStore(cluster.url, "down")
        keys = _keys(24)
        store.put([(k, bytes([i])) for i, k in enumerate(keys)])
        node_of = {}
        for port in cluster.ports:
            for name in redis.Redis(port=port).keys("down:*"):
                node_of[name.decode()] = port
        victim = cluster.ports[1]
        cluster.kill(victim)
        with pytest.warns(RuntimeWarning, match=f"redis store failed to read blocks on 127.0.0.1:{victim}"):
            got = store.get(keys)
        for i, k in enumerate(keys):
            lost = node_of[f"down:{k.digest.hex()}"] == victim
            assert got[i] == (None if lost else bytes([i])), i
        assert 0 < got.count(None) < len(keys) and store.stats()["errors"] >= 1
        want = generate_dense(TinyLlama(TINY), PREFIX + [7, 7], 3)[0]
        with pytest.warns(RuntimeWarning, match="redis store failed"):
            tokens, _, _ = _serve([RedisStore(cluster.url, "down-2")], [PREFIX + [7, 7]])
        assert tokens == [want]
    finally:
        cluster.stop()


def test_an_unreachable_server_warns_and_misses(tmp_path):
    pytest.importorskip("redis")
    store = RedisStore(f"redis://127.0.0.1:{_free_port()}/0", "gone")
    want = [generate_dense(TinyLlama(TINY), PREFIX + [7, 7], 3)[0]]
    with pytest.warns(RuntimeWarning, match="redis store failed"):
        got, cached, _ = _serve([store], [PREFIX + [7, 7]])
    assert got == want and cached[0]["redis"] == 0 and store.stats()["errors"] > 0


def test_a_server_killed_mid_run_warns_and_misses():
    """A cache keeps running when its Redis server dies under it: its writes and lookups warn and
    count as misses, and a new prompt is computed, giving the dense cache's tokens."""
    proc, url = _start_redis()
    try:
        store = RedisStore(url, "killed")
        _serve([store], [PREFIX + [1, 2, 3]])  # the server holds the prefix now
        model = TinyLlama(TINY)
        with PagedKVCache(model.cache_config(32, block_size=4), backend="numpy",
                          stores=[store], model_id="tiny") as cache:
            proc.kill()
            proc.wait(timeout=10)
            with pytest.warns(RuntimeWarning, match="redis store failed"):
                got, _ = generate_paged(model, cache, PREFIX + [7, 7], 3)  # lookup and write-through fail
                cache.end_step()
            assert got == generate_dense(model, PREFIX + [7, 7], 3)[0]
            assert cache.stats()["tiers"]["tokens"]["redis"] == 0 and store.stats()["errors"] >= 2
            cache.manager.check()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_damaged_files_and_other_geometries_are_never_served(tmp_path):
    store = DirectoryStore(tmp_path, max_bytes=1 << 20)
    _serve([store], [PREFIX + [1, 2, 3]])
    for f in sorted(tmp_path.glob("*.pkvb"))[:2]:  # damage two of the four blocks
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="not this pool's block"):
        got, cached, _ = _serve([store], [PREFIX + [7, 7]])
    assert got == [generate_dense(TinyLlama(TINY), PREFIX + [7, 7], 3)[0]]
    assert cached[0]["disk"] < 16  # stops at the first damaged block: the model computes the rest
    model = TinyLlama(TINY)  # a pool of another format over the same directory: nothing fits it
    other = PagedKVCache(model.cache_config(32, block_size=4, dtype="bfloat16"), backend="numpy",
                         stores=[store], model_id="tiny")
    assert other.add_sequence(prompt_token_ids=PREFIX + [7, 7]).num_cached_tokens == 0


def test_a_full_disk_is_reported_and_changes_nothing_else(tmp_path, monkeypatch):
    store = DirectoryStore(tmp_path, max_bytes=1 << 20)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pagedkv.offload.stores.tempfile.mkstemp", full)
    with pytest.warns(RuntimeWarning, match="No space left"):
        got, _, cache = _serve([store], [PREFIX + [1, 2, 3]])
    assert got == [generate_dense(TinyLlama(TINY), PREFIX + [1, 2, 3], 3)[0]]
    assert store.stats()["errors"] > 0 and list(tmp_path.iterdir()) == []
    cache.manager.check()


def test_the_demo_shares_its_system_prompt_with_a_later_process(tmp_path, redis_url):
    """pagedkv demo --store, twice, as two processes: the second finds the shared system prompt's
    blocks in the store (directory, then Redis) and still generates the dense cache's tokens."""
    for store in (str(tmp_path / "blocks"), redis_url):
        runs = []
        for _ in range(2):
            proc = subprocess.run([sys.executable, "-m", "pagedkv", "demo", "--requests", "4", "--backend", "numpy",
                                   "--store", store], capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr
            runs.append(proc.stdout)
        tier = "redis" if store.startswith("redis") else "disk"
        first, second = (next(line for line in out.splitlines() if "prompt tokens by tier" in line) for out in runs)
        served = int(second.split(f"{tier} ")[1].split(",")[0])
        assert f"{tier} 0" in first and served >= 48  # the system prompt (three blocks of 16), and more
        assert all("paged == dense generation" in out and " yes " in out for out in runs)


def test_write_back_stores_blocks_as_they_leave_the_pool():
    store = HostStore(max_bytes=1 << 20)
    model = TinyLlama(TINY)
    cache = PagedKVCache(model.cache_config(12, block_size=4), backend="numpy",
                         stores=[store], model_id="tiny", write_back=True)
    generate_paged(model, cache, PREFIX + [1, 2, 3], 3)  # its four full prompt blocks stay cached in the pool
    cache.end_step()
    assert store.stats()["puts"] == 0  # nothing left the pool yet
    generate_paged(model, cache, [9] * 40, 3)  # eleven blocks: the idle cached prefix is evicted for them
    cache.end_step()
    assert store.stats()["puts"] >= 4
    cache.close()  # what the pool still caches is written back too
    assert store.stats()["puts"] >= 4 + 10
    got, cached, _ = _serve([store], [PREFIX + [7, 7], [9] * 40])
    assert got == [generate_dense(TinyLlama(TINY), p, 3)[0] for p in (PREFIX + [7, 7], [9] * 40)]
    assert cached[0]["host"] == 16 and cached[1]["host"] == 36


def test_two_writers_of_one_key_leave_one_whole_value(tmp_path, redis_url):
    """Writers racing on one key (threads here; processes share the same rename and SET): every
    read sees one writer's whole value, never a mix or a torn file."""
    import threading

    key = _keys(1)[0]
    values = [bytes([i]) * 200_000 for i in (1, 2)]
    for store in (DirectoryStore(tmp_path / "race", max_bytes=1 << 30), RedisStore(redis_url, "race")):
        stop = threading.Event()

        def write(v, store=store, stop=stop):
            while not stop.is_set():
                store.put([(key, v)])

        writers = [threading.Thread(target=write, args=(v,)) for v in values]
        for w in writers:
            w.start()
        seen = set()
        try:
            deadline = time.monotonic() + 30
            while store.get([key])[0] is None:  # the first write has landed (threads start late on a busy machine)
                assert time.monotonic() < deadline, store.name
                time.sleep(0.001)
            for _ in range(200):
                (got,) = store.get([key])
                if got is not None:
                    assert got in values, store.name
                    seen.add(got[0])
        finally:
            stop.set()
            for w in writers:
                w.join()
        assert seen, store.name
