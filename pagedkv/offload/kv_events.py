"""KV events over a Redis Stream, for indexers in other processes.

A router that sends each request to the server already holding its prefix keeps an index of
which server's pool caches which block, built from the servers' KV events. An index built from
a lossy stream drifts (an event lost is a block the router believes in forever), so here every
event is numbered by its :class:`~pagedkv.blocks.events.EventPublisher` and the index can always
be rebuilt exactly:

- :class:`RedisEventStream` (the server's side) adds each numbered event to a Redis Stream
  (``XADD``, trimmed to about ``maxlen`` entries), and answers its indexers' requests: the
  events after a number, again, from the publisher's buffer, or, past it, a snapshot of the
  pool's prefix cache (a key beside the stream) current to a number; and it keeps the newest
  number at a key beside the stream, so that a loss at the stream's end shows too;
- :class:`RedisIndexer` (another process) reads the stream into an
  :class:`~pagedkv.blocks.events.EventIndex`; on a gap in the numbers, or a publisher it has not
  seen (a restarted server), it holds what arrives, asks for a replay or a snapshot, and
  applies what it held once the history is in.

Entries are fields ``source``, ``seq`` and ``event`` (JSON: ``type`` ``"stored"``, ``"removed"``
or ``"cleared"``, digests in hex), and ``from`` on a replayed entry. A Redis that fails warns;
the pool and the steps never notice. Needs redis-py (``pip install redis``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from typing import Any

from ..blocks.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    EventIndex,
    EventPublisher,
    Sequenced,
)
from ..errors import ConfigError
from .stores import REDIS_TIMEOUTS


def encode_event(event: Event) -> str:
    """An event as the JSON of a stream entry."""
    if isinstance(event, BlockStored):
        return json.dumps({"type": "stored", "hash": event.block_hash.hex(),
                           "parent": None if event.parent_block_hash is None else event.parent_block_hash.hex(),
                           "tokens": list(event.token_ids), "block_size": event.block_size, "block": event.block_id,
                           "namespace": event.namespace, "group": event.group})
    if isinstance(event, BlockRemoved):
        return json.dumps({"type": "removed", "hash": event.block_hash.hex(), "block": event.block_id,
                           "namespace": event.namespace, "group": event.group})
    return json.dumps({"type": "cleared", "namespace": event.namespace})


def decode_event(text: str | bytes) -> Event:
    """The event of a stream entry's JSON."""
    d = json.loads(text)
    if d["type"] == "stored":
        return BlockStored(bytes.fromhex(d["hash"]), None if d["parent"] is None else bytes.fromhex(d["parent"]),
                           tuple(d["tokens"]), d["block_size"], d["block"], d["namespace"], d["group"])
    if d["type"] == "removed":
        return BlockRemoved(bytes.fromhex(d["hash"]), d["block"], d["namespace"], d["group"])
    return AllBlocksCleared(d["namespace"])


def _client(client: Any) -> Any:
    if isinstance(client, str):
        import redis

        try:
            return redis.Redis.from_url(client, **REDIS_TIMEOUTS)
        except ValueError as e:
            raise ConfigError(f"cannot use the Redis URL {client!r}: {e}") from e
    if not all(callable(getattr(client, m, None)) for m in ("xadd", "xread", "get", "set")):
        raise ConfigError(f"needs a redis.Redis client or a redis:// URL, got {client!r}")
    return client


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisEventStream:
    """Sends a publisher's numbered events to the Redis Stream ``key`` and answers the requests of
    its indexers (see the module docstring). Call :meth:`flush` after each step (it sends what
    the step's events were, and answers requests).

    Args:
        client: a ``redis.Redis`` or a ``redis://`` URL.
        key: the stream's key (a snapshot lives at ``key + ":snapshot"``, requests at
            ``key + ":requests"``, the newest number at ``key + ":head"``).
        publisher: the pool's :class:`~pagedkv.blocks.events.EventPublisher`.
        maxlen: about how many entries the stream keeps (``XADD ... MAXLEN ~``).
    """

    def __init__(self, client: Any, key: str, publisher: EventPublisher, *, maxlen: int = 100_000) -> None:
        if not isinstance(key, str) or not key:
            raise ConfigError(f"key must be a non-empty str, got {key!r}")
        if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen <= 0:
            raise ConfigError(f"maxlen must be a positive integer, got {maxlen!r}")
        self.client, self.key, self.publisher, self.maxlen = _client(client), key, publisher, maxlen

    def _add(self, events: list[Sequenced], replay_from: int | None = None) -> None:
        pipe = self.client.pipeline(transaction=False)
        for e in events:
            fields = {"source": self.publisher.source, "seq": e.seq, "event": encode_event(e.event)}
            if replay_from is not None:
                fields["from"] = replay_from
            pipe.xadd(self.key, fields, maxlen=self.maxlen, approximate=True)
        pipe.execute()

    def flush(self, *, drop: Callable[[int], bool] | None = None) -> int:
        """Send the events since the last flush (``drop(seq)`` True: not sent, a loss to
        recover from, for tests), then answer the indexers' requests; returns events sent."""
        events = [e for e in self.publisher.take() if drop is None or not drop(e.seq)]
        try:
            if events:
                self._add(events)
            # the newest number, so that an indexer finds a loss at the stream's end too
            self.client.set(f"{self.key}:head", json.dumps([self.publisher.source, self.publisher.last_seq]))
            self.answer()
        except Exception as e:  # noqa: BLE001  (redis-py's ConnectionError, TimeoutError...: never the pool's)
            warnings.warn(f"pagedkv: the KV event stream {self.key!r} failed ({type(e).__name__}: {e}); its "
                          "indexers will ask again", RuntimeWarning, stacklevel=2)
            return 0
        return len(events)

    def answer(self) -> None:
        """Answer each request waiting (``{"source", "after"}``): the events after ``after``
        again, from the publisher's buffer, or a snapshot when the buffer no longer reaches."""
        while (raw := self.client.rpop(f"{self.key}:requests")) is not None:
            request = json.loads(raw)
            after = int(request["after"]) if request.get("source") == self.publisher.source else 0
            events = self.publisher.replay(after)
            if events is None:
                seq, blocks = self.publisher.snapshot()
                self.client.set(f"{self.key}:snapshot", json.dumps({
                    "source": self.publisher.source, "seq": seq,
                    "blocks": [[ns, digest.hex(), block] for (ns, digest), block in sorted(blocks.items())]}))
            elif events:
                self._add(events, replay_from=after)
            elif after == 0:  # a publisher with no event yet on an empty pool: nothing to replay
                self.client.set(f"{self.key}:snapshot", json.dumps({"source": self.publisher.source, "seq": 0,
                                                                    "blocks": []}))


class RedisIndexer:
    """Follows the Redis Stream ``key`` of a :class:`RedisEventStream` into an
    :class:`~pagedkv.blocks.events.EventIndex` (``index``), exact through lost entries and
    restarted publishers (see the module docstring): call :meth:`poll` in a loop.

    Args:
        client: a ``redis.Redis`` or a ``redis://`` URL.
        key: the stream's key.
        hold: the most entries held while waiting for a replay or snapshot (older ones are
            dropped: a snapshot then covers them).
    """

    def __init__(self, client: Any, key: str, *, hold: int = 100_000) -> None:
        self.client, self.key, self.hold = _client(client), key, hold
        self.index = EventIndex()
        self._last_id = "0-0"
        self._held: dict[tuple[str, int], Event] = {}
        self._asked: tuple[str | None, int] | None = None
        self._wanted: str | None = None  # the publisher whose history is missing
        self._retired: set[str] = set()  # publishers followed before the current one (restarted since)

    @property
    def waiting(self) -> bool:
        """Whether events are held, waiting for a replay or snapshot."""
        return bool(self._held)

    def poll(self, block_ms: int | None = None) -> int:
        """Read what the stream has (waiting up to ``block_ms`` for something when given);
        returns the entries read."""
        got = self.client.xread({self.key: self._last_id}, count=1000, block=block_ms) or []
        n = 0
        for _, entries in got:
            for entry_id, fields in entries:
                self._last_id = _str(entry_id)
                f = {_str(k): _str(v) for k, v in fields.items()}
                self._take(f["source"], int(f["seq"]), decode_event(f["event"]), f.get("from"))
                n += 1
        if self._held or self._asked is not None:  # an answer may be in
            self._try_snapshot()
        if self._held:
            self._ask()  # a snapshot or replay may have left a gap of its own: ask for what follows it
        else:
            self._check_head()
        return n

    def _check_head(self) -> None:
        """A loss at the stream's end shows only against the publisher's newest number: ask for
        what is missing (an entry still on its way makes this ask needlessly: the replay's
        duplicates are skipped)."""
        raw = self.client.get(f"{self.key}:head")
        if raw is None:
            return
        source, seq = json.loads(raw)
        if source in self._retired or (source == self.index.source and seq <= self.index.seq):
            return
        self._wanted = source
        self._ask()

    def _switch(self, source: str, seq: int, blocks: dict[tuple[int, bytes], int]) -> None:
        """Follow ``source`` from now on; every other publisher seen (the one followed so far, and
        any whose history never came) is one that a restart replaced: its entries are dropped."""
        others = {k[0] for k in self._held} | ({self.index.source} if self.index.source is not None else set())
        self._retired |= others - {source}
        self.index.load(source, seq, blocks)

    def _take(self, source: str, seq: int, event: Event, replay_from: str | None) -> None:
        if source in self._retired:
            return  # a late entry of a publisher that has restarted since
        if replay_from == "0" and source != self.index.source and seq == 1:
            self._switch(source, 0, {})  # a replay of a publisher's whole life, from an empty pool
        if self.index.apply(source, seq, event):
            self._drain()
            return
        if len(self._held) < self.hold:
            self._held[(source, seq)] = event
        self._wanted = source
        self._ask()

    def _ask(self) -> None:
        """Ask for what follows the last event applied (once per gap)."""
        ask = (self.index.source, self.index.seq)
        if self._asked != ask:
            self._asked = ask
            self.client.lpush(f"{self.key}:requests", json.dumps({"source": ask[0], "after": ask[1]}))

    def _try_snapshot(self) -> None:
        raw = self.client.get(f"{self.key}:snapshot")
        if raw is None:
            return
        snap = json.loads(raw)
        if snap["source"] != self._wanted or (snap["source"] == self.index.source and snap["seq"] <= self.index.seq):
            return
        self._switch(snap["source"], int(snap["seq"]),
                     {(int(ns), bytes.fromhex(h)): int(block) for ns, h, block in snap["blocks"]})
        self._drain()

    def _drain(self) -> None:
        """Apply the held events that now follow, and forget those already covered."""
        source = self.index.source
        if source is None:
            return
        while (source, self.index.seq + 1) in self._held:
            self.index.apply(source, self.index.seq + 1, self._held.pop((source, self.index.seq + 1)))
        for key in [k for k in self._held if k[0] in self._retired or (k[0] == source and k[1] <= self.index.seq)]:
            del self._held[key]
        if not self._held:
            self._asked = None
