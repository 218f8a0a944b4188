"""asv: the store tiers against their raw medium, measured in the same run.

Each tier stores and then loads 64 blocks of a Llama-3-8B-shaped layer slice (32 layers,
8 KV heads, D=128, blocks of 16, bfloat16: 2 MiB each, 128 MiB in all): encode (header and
checksum, as :class:`~pagedkv.offload.tiers.Tiers` encodes for that store alone) + put, then get +
decode + copy into a pool. The yardstick moves the same bytes with nothing around them, in and out: two
copies for ``host`` (one to store, one to load), into memory allocated beforehand; writing and reading one file
per block for ``disk``; a Redis SET and GET of each value for ``redis`` (only where
``PAGEDKV_REDIS_URL`` names a server; asv skips it otherwise). ``track_vs_raw`` is raw
seconds / tier seconds (the target is >= 0.7).
"""

import os
import shutil
import tempfile
import time

import numpy as np

from pagedkv import CacheConfig, KVPool
from pagedkv.blocks import prefix_key
from pagedkv.offload.stored_block import (
    decode_block,
    encode_block,
    encode_pool_block,
    fingerprint,
    read_block,
    write_block,
)
from pagedkv.offload.stores import DirectoryStore, HostStore, RedisStore
from pagedkv.tools.bench import median_seconds

BLOCKS = 64


def _redis_url() -> str:
    """The Redis server to benchmark against (``PAGEDKV_REDIS_URL``); asv skips the tier without one."""
    url = os.environ.get("PAGEDKV_REDIS_URL")
    if not url:
        raise NotImplementedError("set PAGEDKV_REDIS_URL to a Redis server to benchmark the redis tier")
    return url


def _pool_and_keys():
    config = CacheConfig(num_layers=32, num_kv_heads=8, head_dim=128, num_blocks=BLOCKS, block_size=16,
                         dtype="bfloat16")
    pool = KVPool(config)
    pool.host[:] = np.random.default_rng(0).integers(0, 1 << 16, pool.host.size, dtype=np.uint16)
    keys = []
    for j in range(BLOCKS):
        keys.append(prefix_key.block_key(keys[-1] if keys else None, range(j * 16, (j + 1) * 16)))
    return pool, keys


class StoreAndLoad:
    params = ["host", "disk", "redis"]
    param_names = ["tier"]
    number = 1
    repeat = 1
    timeout = 600

    def setup(self, tier):
        pool, keys = _pool_and_keys()
        fp = fingerprint(pool)
        values = [encode_block(fp, read_block(pool, j, k)) for j, k in enumerate(keys)]
        self.dir = tempfile.mkdtemp()
        if tier == "host":
            store = HostStore(max_bytes=1 << 40)

            sources = [np.frombuffer(v, np.uint8) for v in values]
            medium = [np.ones_like(x) for x in sources]  # memory the copies go to, allocated and touched
            back = [np.ones_like(x) for x in sources]

            def raw():
                for x, m, b in zip(sources, medium, back, strict=True):
                    np.copyto(m, x)
                    np.copyto(b, m)
        elif tier == "disk":
            store = DirectoryStore(os.path.join(self.dir, "store"), max_bytes=1 << 40)
            os.makedirs(os.path.join(self.dir, "raw"))

            def raw():
                for j, v in enumerate(values):
                    with open(os.path.join(self.dir, "raw", str(j)), "wb") as f:
                        f.write(v)
                for j in range(len(values)):
                    with open(os.path.join(self.dir, "raw", str(j)), "rb") as f:
                        f.read()
        else:
            store = RedisStore(_redis_url(), "pagedkv-bench")
            client = store.client

            def raw():
                for j, v in enumerate(values):
                    client.set(f"pagedkv-bench-raw:{j}", v)
                for j in range(len(values)):
                    client.get(f"pagedkv-bench-raw:{j}")

        summed = not getattr(store, "trusted", False)  # as Tiers encodes for this store alone
        into = KVPool(pool.config)  # where the blocks load

        def tier_round_trip():
            store.put([(k, encode_pool_block(pool, j, k, fp, summed)) for j, k in enumerate(keys)])
            for j, (k, v) in enumerate(zip(keys, store.get(keys), strict=True)):
                stored = decode_block(into, k, v, fp, verify=summed)
                assert stored is not None
                write_block(into, j, stored)

        self.raw_seconds = median_seconds(raw, repeat=3)
        self.tier_seconds = median_seconds(tier_round_trip, repeat=3)

    def teardown(self, tier):
        shutil.rmtree(self.dir, ignore_errors=True)

    def track_vs_raw(self, tier):
        return self.raw_seconds / self.tier_seconds

    track_vs_raw.unit = "raw medium seconds / tier seconds (above 0.7: the target)"

    def track_gbps(self, tier):
        return 2 * BLOCKS * (2 << 20) / self.tier_seconds / 1e9

    track_gbps.unit = "GB/s stored and loaded"


PREFIX, SUFFIX = 2000, 16  # the time-to-first-token prompt: a 2,000-token prefix (125 blocks) and its own end


def _ttft_prompt() -> tuple[list[int], list[int]]:
    """The prompt that fills a store (the prefix and one ending) and the prompt timed (another ending)."""
    rng = np.random.default_rng(1)
    prefix = rng.integers(0, 128, PREFIX).tolist()
    return prefix + rng.integers(0, 128, SUFFIX).tolist(), prefix + rng.integers(0, 128, SUFFIX).tolist()


def measure_ttft(tier: str, store=None, repeat: int = 5) -> dict[str, float]:
    """Seconds to the first token's logits of a prompt whose 2,000-token prefix is in ``tier`` (a
    fresh pool each time, so ``store`` serves it; ``pool``: the same pool's prefix cache;
    ``recompute``: no stores, every token computed), with the demo model (medians)."""
    from pagedkv import PagedKVCache
    from pagedkv.tools.model import ModelConfig, TinyLlama, paged_step

    model = TinyLlama(ModelConfig())
    config = model.cache_config(num_blocks=2 * (PREFIX + SUFFIX) // 16 + 8)
    filler, prompt = _ttft_prompt()
    stores = [store] if store is not None else []
    with PagedKVCache(config, stores=stores, model_id="bench") as writer:  # the prefix's blocks go to the store
        seq, _ = writer.add_sequence(prompt_token_ids=filler)
        paged_step(model, writer, [seq], [filler])
        writer.end_step()
        writer.free(seq)
        times, served = [], 0
        for _ in range(repeat):
            cache = writer if tier == "pool" else PagedKVCache(config, stores=stores, model_id="bench")
            t0 = time.perf_counter()
            seq, cached = cache.add_sequence(prompt_token_ids=prompt)
            paged_step(model, cache, [seq], [prompt[cached:]])
            times.append(time.perf_counter() - t0)
            served = cached
            cache.end_step()
            cache.free(seq)
            if cache is not writer:
                cache.close()
    return {"seconds": float(np.median(times)), "cached_tokens": served}


class TimeToFirstToken:
    """Time to the first token of a prompt whose 2,000-token prefix is in each tier, against
    recomputing it (the demo model; ``redis`` only where ``PAGEDKV_REDIS_URL`` names a server)."""

    params = ["recompute", "pool", "host", "disk", "redis"]
    param_names = ["tier"]
    number = 1
    repeat = 1
    timeout = 600

    def setup(self, tier):
        self.dir = tempfile.mkdtemp()
        store = None
        if tier == "host":
            store = HostStore(max_bytes=1 << 30)
        elif tier == "disk":
            store = DirectoryStore(os.path.join(self.dir, "store"), max_bytes=1 << 30)
        elif tier == "redis":
            store = RedisStore(_redis_url(), "pagedkv-bench-ttft")
        self.m = measure_ttft(tier, store)
        self.recompute = measure_ttft("recompute")["seconds"] if tier != "recompute" else self.m["seconds"]

    def teardown(self, tier):
        shutil.rmtree(self.dir, ignore_errors=True)

    def track_seconds(self, tier):
        return self.m["seconds"]

    track_seconds.unit = "seconds to the first token"

    def track_speedup_vs_recompute(self, tier):
        return self.recompute / self.m["seconds"]

    track_speedup_vs_recompute.unit = "x recomputing the prefix"
