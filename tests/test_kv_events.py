"""KV events an index can trust: numbered events, a replay buffer, snapshots, and an indexer in
another process that follows a serving cache over a real Redis Stream through evictions, a
restart and lost ranges, ending with exactly the pool's contents."""

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np

from pagedkv import CacheConfig, PagedKVCache
from pagedkv.blocks.events import EventIndex, EventPublisher, replay

from .test_stores import redis_url  # noqa: F401  (the fixture: a real Redis server)


def cache(num_blocks=12):
    return PagedKVCache(CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=num_blocks, block_size=4),
                        "numpy")


def serve(c, prompts):
    """Each prompt computed (its full blocks cached) and freed: a small pool evicts as it goes."""
    for p in prompts:
        seq = c.add_sequence(prompt_token_ids=p)
        c.begin_step([seq.seq_id], [len(p) - seq.num_cached_tokens], token_ids=[p[seq.num_cached_tokens:]])
        c.end_step()
        c.free(seq.seq_id)


def prompts(n, seed):
    rng = np.random.default_rng(seed)
    shared = rng.integers(1, 50, 8).tolist()
    return [(shared if i % 2 else []) + rng.integers(1, 50, int(rng.integers(5, 18))).tolist() for i in range(n)]


def test_events_are_numbered_replayed_from_a_buffer_and_snapshotted():
    c = cache()
    pub = EventPublisher(c.manager.block_pool, buffer=16)
    serve(c, prompts(20, seed=1))
    assert pub.last_seq > 16
    events = pub.take()
    assert [e.seq for e in events] == list(range(1, pub.last_seq + 1))  # no gaps
    seq, blocks = pub.snapshot()
    assert seq == pub.last_seq and blocks == c.manager.block_pool.cached_entries()
    assert replay([e.event for e in events]) == blocks  # every event applied: the pool's contents
    assert [e.seq for e in pub.replay(seq - 5)] == list(range(seq - 4, seq + 1))
    assert pub.replay(seq - 40) is None and pub.replay(seq) == []  # past the buffer: a snapshot then


def test_an_index_refuses_a_gap_and_a_new_publisher_until_it_has_their_history():
    c = cache()
    pub = EventPublisher(c.manager.block_pool, source="a")
    serve(c, prompts(8, seed=2))
    events = pub.take()
    index = EventIndex()
    assert not index.apply("a", 1, events[0].event)  # a publisher not seen: its history first
    index.load("a", 0, {})  # this one started on an empty pool: its whole life is its events
    assert all(index.apply("a", e.seq, e.event) for e in events[:3])
    assert not index.apply("a", 5, events[4].event) and index.seq == 3  # a gap: nothing changes
    assert index.apply("a", 2, events[1].event) and index.seq == 3  # already applied: skipped
    for e in pub.replay(index.seq):
        assert index.apply("a", e.seq, e.event)
    assert index.blocks == c.manager.block_pool.cached_entries()
    late = EventPublisher(c.manager.block_pool)  # attached to a pool that holds blocks already
    assert late.replay(0) is None  # its events alone do not tell what the pool holds: a snapshot


INDEXER = textwrap.dedent("""
    import json, sys, time
    from pagedkv.offload.kv_events import RedisIndexer
    url, key = sys.argv[1], sys.argv[2]
    indexer = RedisIndexer(url, key)
    indexer.client.set(key + ":ready", 1)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and indexer.client.get(key + ":stop") is None:
        indexer.poll(block_ms=20)
        if not indexer.waiting:  # where it has got to, for the test to wait on
            indexer.client.set(key + ":progress", json.dumps([indexer.index.source, indexer.index.seq]))
    index = indexer.index
    print(json.dumps({"source": index.source, "seq": index.seq,
                      "blocks": sorted([ns, h.hex(), b] for (ns, h), b in index.blocks.items())}))
""")


def test_an_indexer_in_another_process_follows_through_evictions_restarts_and_losses(redis_url):  # noqa: F811
    """A serving cache publishes as it evicts; a range of its events is lost (the indexer gets
    them again from the buffer); it restarts (a new publisher, its indexer's history gone); a
    range is lost past the small buffer of the new one (the indexer takes a snapshot). At the
    end the indexer's index is the pool's prefix cache, block for block."""
    from pagedkv.offload.kv_events import RedisEventStream

    key = f"kv-events-{os.getpid()}-{time.monotonic_ns()}"
    indexer = subprocess.Popen([sys.executable, "-c", INDEXER, redis_url, key], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        client = RedisEventStream(redis_url, key, EventPublisher(cache().manager.block_pool)).client

        def caught_up(stream):
            deadline = time.monotonic() + 60
            want = json.dumps([stream.publisher.source, stream.publisher.last_seq])
            while (client.get(f"{key}:progress") or b"").decode() != want:
                assert indexer.poll() is None and time.monotonic() < deadline, "the indexer did not catch up"
                stream.flush()  # answering its requests
                time.sleep(0.02)

        deadline = time.monotonic() + 60
        while client.get(f"{key}:ready") is None:
            assert time.monotonic() < deadline and indexer.poll() is None, "the indexer did not start"
            time.sleep(0.05)
        first = cache()
        stream = RedisEventStream(client, key, EventPublisher(first.manager.block_pool, buffer=4096))
        work = prompts(40, seed=3)
        for p in work[:10]:
            serve(first, [p])
            stream.flush()
        caught_up(stream)
        lost = range(stream.publisher.last_seq + 5, stream.publisher.last_seq + 20)
        for p in work[10:]:
            serve(first, [p])
            stream.flush(drop=lambda seq: seq in lost)  # a lost range, within the buffer: replayed
        caught_up(stream)
        replayed = [int(f[b"seq"]) for _, f in client.xrange(key) if f.get(b"from") == str(lost[0] - 1).encode()]
        assert replayed and min(replayed) == lost[0]
        second = cache()  # a restart: a new pool and publisher on the same stream, with a small buffer
        stream = RedisEventStream(client, key, EventPublisher(second.manager.block_pool, buffer=8))
        for p in prompts(40, seed=4):
            serve(second, [p])
            stream.flush(drop=lambda seq: 20 <= seq < 40 or seq > stream.publisher.last_seq - 3)  # past the buffer,
        stream.flush()  # and at the stream's end (the newest number shows it): a snapshot
        assert stream.publisher.last_seq > 60  # the second pool evicted as it went
        caught_up(stream)
        assert json.loads(client.get(f"{key}:snapshot"))["source"] == stream.publisher.source
        client.set(f"{key}:stop", 1)
        out, err = indexer.communicate(timeout=30)
        assert indexer.returncode == 0, err
        got = json.loads(out)
        seq, blocks = stream.publisher.snapshot()
        assert got["source"] == stream.publisher.source and got["seq"] == seq
        assert got["blocks"] == sorted([ns, h.hex(), b] for (ns, h), b in blocks.items()) and got["blocks"]
    finally:
        if indexer.poll() is None:
            indexer.kill()
