"""Prefix blocks that outlive a pool: a stored-block format and three :class:`BlockStore` tiers.

Values in the format of :mod:`pagedkv.stored_block` (a header with the geometry, format,
key, token ids and a sha256; a value that is not whole, not the key's or another pool's is a
miss, never loaded), kept in tiers. The stores themselves move bytes:

- :class:`HostStore`: host memory, bounded, least recently used evicted first;
- :class:`DirectoryStore`: one file per block in a directory, written to a
  temporary file and renamed (atomic: a reader sees a whole value or none, and
  several processes may share the directory); bounded, oldest read evicted first;
- :class:`RedisStore`: a Redis or Valkey server through redis-py (pipelined batch
  reads and writes, optional time to live, keys namespaced per model).

A store that fails (a server gone, a full disk) warns and answers as a miss: the
pool and the sequences are never touched by a store's failure.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

from .prefix_key import BlockKey
from .stored_block import (  # noqa: F401  (the format's names, re-exported: stores were where they lived)
    MAGIC,
    VERSION,
    StoredBlock,
    decode_block,
    encode_block,
    encode_pool_block,
    fingerprint,
    read_block,
    write_block,
)


class BlockStore(Protocol):
    """A tier that keeps stored blocks (bytes) by key, in batches."""

    name: str
    #: optional (False if absent): values never leave this process's memory, so they are stored
    #: and served without a checksum
    trusted: bool

    def longest_prefix(self, keys: Sequence[BlockKey]) -> int:
        """How many of ``keys``, from the first, the store holds (it may still fail to serve one)."""

    def get(self, keys: Sequence[BlockKey]) -> list[bytes | None]:
        """The values of ``keys`` (None where missing)."""

    def put(self, items: Sequence[tuple[BlockKey, bytes]]) -> None:
        """Store values (a key stored already is overwritten by an equal value)."""

    def delete(self, keys: Sequence[BlockKey]) -> None:
        """Forget ``keys`` (missing ones are ignored)."""

    def stats(self) -> dict[str, int]:
        """Counts: ``hits``, ``misses``, ``puts``, ``bytes_read``, ``bytes_written``, ``errors``."""


class _Counts:
    def __init__(self) -> None:
        self.counts = {"hits": 0, "misses": 0, "puts": 0, "bytes_read": 0, "bytes_written": 0, "errors": 0}

    def stats(self) -> dict[str, int]:
        return dict(self.counts)

    def _served(self, values: list[bytes | None]) -> list[bytes | None]:
        for v in values:
            self.counts["hits" if v is not None else "misses"] += 1
            self.counts["bytes_read"] += len(v) if v is not None else 0
        return values

    def _failed(self, what: str, error: Exception) -> None:
        self.counts["errors"] += 1
        warnings.warn(f"pagedkv: the {getattr(self, 'name', 'store')} store failed to {what} ({error}); "
                      "treated as a miss, nothing in the pool changed", RuntimeWarning, stacklevel=3)


class HostStore(_Counts):
    """Blocks in host memory, at most ``max_bytes`` of them; the least recently used go first.
    Trusted: its values (immutable ``bytes``) never leave the process, so no checksum."""

    name = "host"
    trusted = True

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes, self._values, self._bytes = max_bytes, OrderedDict[bytes, bytes](), 0

    def longest_prefix(self, keys: Sequence[BlockKey]) -> int:
        n = 0
        while n < len(keys) and keys[n].digest in self._values:
            n += 1
        return n

    def get(self, keys: Sequence[BlockKey]) -> list[bytes | None]:
        values = []
        for k in keys:
            v = self._values.get(k.digest)
            if v is not None:
                self._values.move_to_end(k.digest)
            values.append(v)
        return self._served(values)

    def put(self, items: Sequence[tuple[BlockKey, bytes]]) -> None:
        for k, v in items:
            old = self._values.pop(k.digest, None)
            self._bytes -= len(old) if old is not None else 0
            self._values[k.digest] = v
            self._bytes += len(v)
            self.counts["puts"] += 1
            self.counts["bytes_written"] += len(v)
        while self._bytes > self.max_bytes and self._values:
            _, v = self._values.popitem(last=False)
            self._bytes -= len(v)

    def delete(self, keys: Sequence[BlockKey]) -> None:
        for k in keys:
            v = self._values.pop(k.digest, None)
            self._bytes -= len(v) if v is not None else 0


class DirectoryStore(_Counts):
    """One file per block in ``path`` (made if missing), at most ``max_bytes`` in all: written
    atomically (temporary file, then rename), so processes may share it; the files read
    longest ago (by modification time, which a read renews) are removed first."""

    name = "disk"
    trusted = False

    def __init__(self, path: str | os.PathLike, max_bytes: int) -> None:
        super().__init__()
        self.path, self.max_bytes = os.fspath(path), max_bytes
        os.makedirs(self.path, exist_ok=True)

    def _file(self, key: BlockKey) -> str:
        return os.path.join(self.path, key.digest.hex() + ".pkvb")

    def longest_prefix(self, keys: Sequence[BlockKey]) -> int:
        n = 0
        while n < len(keys) and os.path.exists(self._file(keys[n])):
            n += 1
        return n

    def get(self, keys: Sequence[BlockKey]) -> list[bytes | None]:
        values: list[bytes | None] = []
        for k in keys:
            value: bytes | None = None
            try:
                with open(self._file(k), "rb") as f:
                    value = f.read()
            except FileNotFoundError:  # never written, or evicted by another process meanwhile
                pass
            except OSError as e:
                self._failed("read a block", e)
            if value is not None:
                try:
                    os.utime(self._file(k))  # read now: the last to be evicted
                except OSError:  # removed since: the value read is whole all the same
                    pass
            values.append(value)
        return self._served(values)

    def put(self, items: Sequence[tuple[BlockKey, bytes]]) -> None:
        for k, v in items:
            tmp = None
            try:
                fd, tmp = tempfile.mkstemp(dir=self.path, suffix=".tmp")
                with os.fdopen(fd, "wb") as f:
                    f.write(v)
                os.replace(tmp, self._file(k))
            except OSError as e:  # a full disk, say: reported, and the store goes on without it
                self._failed("write a block", e)
                if tmp is not None:
                    try:
                        os.unlink(tmp)
                    except OSError:
                        pass
                continue
            self.counts["puts"] += 1
            self.counts["bytes_written"] += len(v)
        self._evict()

    def _evict(self) -> None:
        files = []
        for entry in os.scandir(self.path):
            if entry.name.endswith(".pkvb"):
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime_ns, st.st_size, entry.path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            total -= size

    def delete(self, keys: Sequence[BlockKey]) -> None:
        for k in keys:
            try:
                os.unlink(self._file(k))
            except FileNotFoundError:
                pass


class RedisStore(_Counts):
    """Blocks in a Redis or Valkey server (``pip install redis``): ``client`` is a
    ``redis.Redis`` or a URL (``redis://host:port/db``). Keys are ``"{namespace}:{digest}"``:
    give each model its own ``namespace`` (the fingerprint in every value keeps other
    geometries and formats out anyway). ``ttl``: seconds a block lives (None: until the
    server's memory policy evicts it). A server that fails warns and counts as a miss."""

    name = "redis"
    trusted = False

    def __init__(self, client: Any, namespace: str, *, ttl: int | None = None) -> None:
        super().__init__()
        if isinstance(client, str):
            import redis

            client = redis.Redis.from_url(client, socket_timeout=5, socket_connect_timeout=5)
        self.client, self.namespace, self.ttl = client, namespace, ttl

    def _key(self, key: BlockKey) -> str:
        return f"{self.namespace}:{key.digest.hex()}"

    def longest_prefix(self, keys: Sequence[BlockKey]) -> int:
        if not keys:
            return 0
        try:
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.exists(self._key(k))
            present = pipe.execute()
        except Exception as e:  # redis-py's ConnectionError, TimeoutError...
            self._failed("look blocks up", e)
            return 0
        n = 0
        while n < len(present) and present[n]:
            n += 1
        return n

    def get(self, keys: Sequence[BlockKey]) -> list[bytes | None]:
        if not keys:
            return []
        try:
            values = self.client.mget([self._key(k) for k in keys])
        except Exception as e:
            self._failed("read blocks", e)
            values = [None] * len(keys)
        return self._served(list(values))

    def put(self, items: Sequence[tuple[BlockKey, bytes]]) -> None:
        if not items:
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for k, v in items:
                pipe.set(self._key(k), v, ex=self.ttl)
            pipe.execute()
        except Exception as e:
            self._failed("write blocks", e)
            return
        self.counts["puts"] += len(items)
        self.counts["bytes_written"] += sum(len(v) for _, v in items)

    def delete(self, keys: Sequence[BlockKey]) -> None:
        if keys:
            try:
                self.client.delete(*[self._key(k) for k in keys])
            except Exception as e:
                self._failed("delete blocks", e)


def open_store(spec: str, namespace: str, max_bytes: int = 1 << 32) -> BlockStore:
    """A store named by ``spec``: ``redis://HOST:PORT[/DB]`` (or ``rediss://``) a :class:`RedisStore`
    under ``namespace``; anything else a directory, a :class:`DirectoryStore` of ``max_bytes``."""
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(spec, namespace)
    return DirectoryStore(spec, max_bytes)
