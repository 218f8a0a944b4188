"""Prefix blocks that outlive a pool: a stored-block format and three :class:`BlockStore` tiers.

Values in the format of :mod:`pagedkv.offload.stored_block` (a header with the geometry, format,
key, token ids and a sha256; a value that is not whole, not the key's or another pool's is a
miss, never loaded), kept in tiers. The stores themselves move bytes:

- :class:`HostStore`: host memory, bounded, least recently used evicted first;
- :class:`DirectoryStore`: one file per block in a directory, written to a
  temporary file and renamed (atomic: a reader sees a whole value or none, and
  several processes may share the directory); bounded, oldest read evicted first,
  temporary files included (a writer killed mid-write leaves one: any process that
  evicts removes it once it is older than a write can take);
- :class:`RedisStore`: a Redis or Valkey server, or a Redis Cluster, through redis-py
  (batches pipelined per server, optional time to live, keys under a namespace).

Every store may be shared by several models: :class:`~pagedkv.PagedKVCache` keys and
stamps each value with its ``model_id`` and geometry (see :mod:`pagedkv.offload.tiers`); a
``namespace`` only keeps deployments apart further. A store that fails (a server gone,
a full disk, a directory deleted) warns and answers as a miss: the pool and the sequences
are never touched by a store's failure. A bad constructor argument is a ConfigError.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

from ..blocks.prefix_key import BlockKey
from ..errors import ConfigError
from ..geometry.config import positive_int
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


_NAMESPACE = re.compile(r"[A-Za-z0-9._-]{1,200}")


def _namespace(value: object, *, in_file_names: bool) -> str:
    """A store's namespace: a str, non-empty; in a file name, letters, digits, '.', '_' and '-' only."""
    if not isinstance(value, str) or not value or (in_file_names and not _NAMESPACE.fullmatch(value)):
        rule = "1-200 letters, digits, '.', '_' or '-'" if in_file_names else "a non-empty str"
        raise ConfigError(f"namespace must be {rule}, got {value!r}")
    return value


class HostStore(_Counts):
    """Blocks in host memory, at most ``max_bytes`` of them; the least recently used go first.
    Trusted: its values (immutable ``bytes``) never leave the process, so no checksum."""

    name = "host"
    trusted = True

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes = positive_int("HostStore's max_bytes", max_bytes)
        self._values, self._bytes = OrderedDict[bytes, bytes](), 0

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
    longest ago (by modification time, which a read renews) are removed first.

    ``namespace``: a prefix of the file names (letters, digits, '.', '_', '-'), to keep
    deployments apart in one directory. Temporary files count against ``max_bytes``; one older
    than ``stale_after`` seconds (its writer was killed: a write takes far less) is removed by
    the next put of any process. Raises ConfigError for a bad argument.
    """

    name = "disk"
    trusted = False
    TMP_PREFIX, TMP_SUFFIX = ".pkvb-", ".tmp"

    def __init__(self, path: str | os.PathLike, max_bytes: int, *, namespace: str | None = None,
                 stale_after: float = 60.0) -> None:
        super().__init__()
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ConfigError(f"DirectoryStore's path must be a directory's path (str or os.PathLike), got {path!r}")
        self.path = os.fspath(path)
        self.max_bytes = positive_int("DirectoryStore's max_bytes", max_bytes)
        self.namespace = None if namespace is None else _namespace(namespace, in_file_names=True)
        if isinstance(stale_after, bool) or not isinstance(stale_after, (int, float)) or not stale_after > 0:
            raise ConfigError(f"stale_after must be a positive number of seconds, got {stale_after!r}")
        self.stale_after = float(stale_after)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"DirectoryStore cannot use {self.path!r} as its directory: {e}") from e
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise ConfigError(f"DirectoryStore cannot write in {self.path!r}")

    def _file(self, key: BlockKey) -> str:
        name = key.digest.hex() + ".pkvb"
        return os.path.join(self.path, name if self.namespace is None else f"{self.namespace}-{name}")

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
                fd, tmp = tempfile.mkstemp(dir=self.path, prefix=self.TMP_PREFIX, suffix=self.TMP_SUFFIX)
                with os.fdopen(fd, "wb") as f:
                    f.write(v)
                os.replace(tmp, self._file(k))
            except OSError as e:  # a full disk, a directory deleted: reported, and the store goes on without it
                self._failed("write a block", e)
                if tmp is not None:
                    try:
                        os.unlink(tmp)
                    except OSError:
                        pass
                continue
            self.counts["puts"] += 1
            self.counts["bytes_written"] += len(v)
        try:
            self._evict()
        except OSError as e:
            self._failed("evict blocks", e)

    def _evict(self) -> None:
        """Remove stale temporary files, then the files read longest ago until the directory holds at
        most ``max_bytes`` (fresh temporary files, being written, count but stay)."""
        files, total, stale_before = [], 0, time.time_ns() - int(self.stale_after * 1e9)
        for entry in os.scandir(self.path):
            is_tmp = entry.name.startswith(self.TMP_PREFIX) and entry.name.endswith(self.TMP_SUFFIX)
            if not (is_tmp or entry.name.endswith(".pkvb")):
                continue
            try:
                st = entry.stat()
                if is_tmp and st.st_mtime_ns < stale_before:  # its writer died: nothing will rename it
                    os.unlink(entry.path)
                    continue
            except FileNotFoundError:  # renamed or removed by another process meanwhile
                continue
            total += st.st_size
            if not is_tmp:
                files.append((st.st_mtime_ns, st.st_size, entry.path))
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


#: URL schemes that name a Redis Cluster (any one of its nodes) rather than one server
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
#: how long a Redis connection and a reply may take (a server that hangs is a miss, not a stall)
REDIS_TIMEOUTS = {"socket_timeout": 5, "socket_connect_timeout": 5}


class RedisStore(_Counts):
    """Blocks in a Redis or Valkey server, or a Redis Cluster (``pip install redis``).

    ``client``: a ``redis.Redis`` or ``redis.cluster.RedisCluster``, or a URL:
    ``redis://host:port/db`` (``rediss://``, ``unix://``) for one server,
    ``redis+cluster://host:port`` (``rediss+cluster://``) for a cluster, named by any of its
    nodes. Keys are ``"{namespace}:{digest}"``: give each deployment its own ``namespace``
    (the model's fingerprint in every key and value keeps other models, geometries and formats
    apart anyway). ``ttl``: seconds a block lives (None: until the server's memory policy
    evicts it).

    Each batch (look-up, read, write, delete) is one pipeline per server: on a cluster, the
    keys are grouped by the node that holds their slot, so blocks spread over the nodes and a
    batch costs one round trip to each node it touches. A server or node that fails (down,
    timing out, or no longer holding a slot after a failover) warns and its keys count as
    misses; the other nodes' keys are served as usual, and a cluster's map of slots is
    re-read at the next batch.
    """

    name = "redis"
    trusted = False

    def __init__(self, client: Any, namespace: str, *, ttl: int | None = None) -> None:
        super().__init__()
        namespace = _namespace(namespace, in_file_names=False)
        if ttl is not None:
            positive_int("RedisStore's ttl (whole seconds, or None)", ttl)
        self._connect: Any = None  # a cluster named by URL: its client, made at first use
        if isinstance(client, str):
            import redis
            from redis.connection import parse_url

            cluster = client.startswith(CLUSTER_SCHEMES)
            url = client.replace("+cluster", "", 1) if cluster else client
            try:
                if cluster:
                    parse_url(url)  # a URL redis-py cannot read fails here, not at first use
                else:
                    client = redis.Redis.from_url(url, **REDIS_TIMEOUTS)
            except ValueError as e:  # a port that is not a number, say
                raise ConfigError(f"RedisStore cannot use the URL {client!r}: {e}") from e
            if cluster:
                from redis.cluster import RedisCluster

                # require_full_coverage=False: with a node down, the others' slots still serve
                self._connect = lambda: RedisCluster.from_url(url, require_full_coverage=False, **REDIS_TIMEOUTS)
                client = None
        elif not all(callable(getattr(client, m, None)) for m in ("pipeline", "get", "delete")):
            raise ConfigError(f"RedisStore needs a redis.Redis client, a RedisCluster or a redis:// URL, "
                              f"got {client!r}")
        self.client, self.namespace, self.ttl = client, namespace, ttl
        self._stale = False  # a node failed: re-read the cluster's map of slots before the next batch

    def _key(self, key: BlockKey) -> str:
        return f"{self.namespace}:{key.digest.hex()}"

    def _servers(self, names: list[str], what: str) -> list[tuple[Any, list[int]]] | None:
        """The keys ``names`` grouped by the server that holds them: (a client of that server, the
        positions of its keys), or None (warned) when no server can be reached at all."""
        try:
            if self.client is None:
                self.client = self._connect()
            client = self.client
            if not callable(getattr(client, "get_node_from_key", None)):  # one server holds every key
                return [(client, list(range(len(names))))]
            if self._stale:
                self._stale = False
                client.nodes_manager.initialize()
            groups: dict[str, tuple[Any, list[int]]] = {}
            for i, name in enumerate(names):
                node = client.get_node_from_key(name)
                groups.setdefault(node.name, (client.get_redis_connection(node), []))[1].append(i)
            return list(groups.values())
        except Exception as e:  # redis-py's ConnectionError, RedisClusterException (no node answers)...
            self._failed(what, e)
            return None

    def _batch(self, names: list[str], what: str, command: Any) -> list[Any]:
        """``command(pipe, i)`` queued for every key, one pipeline per server; each key's reply, or
        None where its server failed (warned)."""
        replies: list[Any] = [None] * len(names)
        if not names:
            return replies
        for server, positions in self._servers(names, what) or ():
            try:
                pipe = server.pipeline(transaction=False)
                for i in positions:
                    command(pipe, i)
                got = pipe.execute(raise_on_error=False)
            except Exception as e:  # this server only: the others' keys are served
                self._stale = True
                self._failed(f"{what} on {_where(server)}", e)
                continue
            errors = [r for r in got if isinstance(r, Exception)]
            if errors:  # a key this node no longer holds (MOVED after a failover), say
                self._stale = True
                self._failed(f"{what} on {_where(server)}", errors[0])
            for i, reply in zip(positions, got, strict=True):
                replies[i] = None if isinstance(reply, Exception) else reply
        return replies

    def longest_prefix(self, keys: Sequence[BlockKey]) -> int:
        names = [self._key(k) for k in keys]
        present = self._batch(names, "look blocks up", lambda pipe, i: pipe.exists(names[i]))
        n = 0
        while n < len(present) and present[n]:
            n += 1
        return n

    def get(self, keys: Sequence[BlockKey]) -> list[bytes | None]:
        names = [self._key(k) for k in keys]
        return self._served(self._batch(names, "read blocks", lambda pipe, i: pipe.get(names[i])))

    def put(self, items: Sequence[tuple[BlockKey, bytes]]) -> None:
        names = [self._key(k) for k, _ in items]
        done = self._batch(names, "write blocks", lambda pipe, i: pipe.set(names[i], items[i][1], ex=self.ttl))
        written = [len(v) for (_, v), ok in zip(items, done, strict=True) if ok]
        self.counts["puts"] += len(written)
        self.counts["bytes_written"] += sum(written)

    def delete(self, keys: Sequence[BlockKey]) -> None:
        names = [self._key(k) for k in keys]
        self._batch(names, "delete blocks", lambda pipe, i: pipe.delete(names[i]))


def _where(server: Any) -> str:
    """``host:port`` of a redis-py client, for a warning."""
    kwargs = getattr(getattr(server, "connection_pool", None), "connection_kwargs", {})
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}" if "host" in kwargs else "the server"


def open_store(spec: str, namespace: str, max_bytes: int = 1 << 32) -> BlockStore:
    """A store named by ``spec``: ``redis://HOST:PORT[/DB]`` (or ``rediss://``, ``unix://``, or
    ``redis+cluster://HOST:PORT`` for a Redis Cluster) a :class:`RedisStore` under
    ``namespace``; anything else a directory, a :class:`DirectoryStore` of ``max_bytes`` whose
    file names start with ``namespace``. Raises ConfigError for a spec
    that names neither (a URL with a bad port, a path that is a file or cannot be written)."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"a store is a directory or a redis:// URL, got {spec!r}")
    if spec.startswith(("redis://", "rediss://", "unix://", *CLUSTER_SCHEMES)):
        return RedisStore(spec, namespace)
    return DirectoryStore(spec, max_bytes, namespace=namespace)
