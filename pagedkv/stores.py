"""Prefix blocks that outlive a pool: a stored-block format and three :class:`BlockStore` tiers.

A full block is stored under its portable key (:mod:`pagedkv.prefix_key`: a
sha256 chained over every token before it, the same in every process and on
every machine) as one self-describing value::

    b"PKVB" | header length (uint32 LE) | header (UTF-8 JSON) | payload

    header  = {"version": 1, "key": hex digest, "token_ids": [...],
               "fingerprint": the pool's geometry, layout, storage format and
                              fp8 k/v scales (see :func:`fingerprint`),
               "payload_bytes": n, "sha256": hex digest of the payload, or null}
    payload = the block's stored elements of every layer, K then V
              (``[layers, 2, block_stride]`` in the storage dtype), then, for int8,
              its scales (``[layers, 2, block_size * H]`` float32)

:func:`decode_block` serves a value only if it is whole (lengths and checksum),
written for the same key and tokens, and by a pool of the same fingerprint; anything
else is a miss, never loaded. A store whose values never leave this process's memory
(``trusted = True``: :class:`HostStore`) has nothing that could tear or flip their bytes,
so its values are stored and served without the checksum (``"sha256": null``; hashing
runs at about a tenth of a memory copy's speed); a value without one is never served from
any other store. The stores themselves move bytes:

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

import hashlib
import json
import os
import struct
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from .layout import K, V, block_base, block_scale_base
from .pool import KVPool
from .prefix_key import BlockKey

MAGIC = b"PKVB"
VERSION = 1


class StoredBlock(NamedTuple):
    """One block's K/V as a store keeps them: ``data`` the stored elements ``[layers, 2,
    block_stride]`` (the pool's storage dtype), ``scales`` int8's ``[layers, 2, block_size * H]``."""

    key: BlockKey
    data: np.ndarray
    scales: np.ndarray | None = None


def fingerprint(pool: KVPool) -> dict[str, Any]:
    """What must match for a stored block to be loaded into ``pool``: geometry, layout, format,
    and fp8's per-layer k/v scales (a block encoded with other scales would decode wrong)."""
    c = pool.config
    kv_scales = pool.kv_scales
    return {"num_layers": c.num_layers, "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
            "block_size": c.block_size, "layout": c.layout, "dtype": c.dtype,
            "kv_scales": None if kv_scales is None else kv_scales.tolist()}


def read_block(pool: KVPool, block: int, key: BlockKey) -> StoredBlock:
    """Copy block ``block`` of a CPU pool (every layer, K and V, and its int8 scales), each
    element once."""
    s = pool.strides
    data = np.empty((s.num_layers, 2, s.block_stride), dtype=pool.host.dtype)
    run = s.block_size * s.num_kv_heads
    scales = None if pool.scales is None else np.empty((s.num_layers, 2, run), dtype=np.float32)
    for layer in range(s.num_layers):
        for kv in (K, V):
            at = block_base(layer, kv, block, s)
            data[layer, kv] = pool.host[at:at + s.block_stride]
            if scales is not None:
                at = block_scale_base(layer, kv, block, s)
                scales[layer, kv] = pool.host_scales[at:at + run]
    return StoredBlock(key, data, scales)


def write_block(pool: KVPool, block: int, stored: StoredBlock) -> None:
    """Put a stored block's elements (and scales) into block ``block`` of a CPU pool."""
    s = pool.strides
    for layer in range(s.num_layers):
        for kv in (K, V):
            at = block_base(layer, kv, block, s)
            pool.host[at:at + s.block_stride] = stored.data[layer, kv]
            if stored.scales is not None:
                at = block_scale_base(layer, kv, block, s)
                pool.host_scales[at:at + stored.scales.shape[-1]] = stored.scales[layer, kv]


def encode_block(fp: dict[str, Any], stored: StoredBlock, checksum: bool = True) -> bytes:
    """The stored value of a block (format in the module docstring); the payload is copied once,
    into the value. ``checksum=False``: no sha256 (for trusted stores only, see there)."""
    parts = [np.ascontiguousarray(stored.data)]
    if stored.scales is not None:
        parts.append(np.ascontiguousarray(stored.scales, dtype=np.float32))
    return _value(fp, stored.key, [p.data.cast("B") for p in parts], checksum)


def encode_pool_block(pool: KVPool, block: int, key: BlockKey, fp: dict[str, Any] | None = None,
                      checksum: bool = True) -> bytes:
    """``encode_block(fp, read_block(pool, block, key), checksum)``, the same bytes, with each element
    of the block copied once, from the pool straight into the value (``fp``: the pool's
    :func:`fingerprint`, if the caller has it)."""
    s = pool.strides
    runs = [(pool.host, block_base(layer, kv, block, s), s.block_stride)
            for layer in range(s.num_layers) for kv in (K, V)]
    if pool.scales is not None:
        run = s.block_size * s.num_kv_heads
        runs += [(pool.host_scales, block_scale_base(layer, kv, block, s), run)
                 for layer in range(s.num_layers) for kv in (K, V)]
    views = [array[at:at + n].data.cast("B") for array, at, n in runs]
    return _value(fingerprint(pool) if fp is None else fp, key, views, checksum)


def _value(fp: dict[str, Any], key: BlockKey, views: list[memoryview], checksum: bool) -> bytes:
    """The value of a block whose payload is the bytes of ``views``, in order."""
    digest = hashlib.sha256() if checksum else None
    if digest is not None:
        for v in views:
            digest.update(v)
    header = json.dumps({"version": VERSION, "key": key.digest.hex(), "token_ids": list(key.token_ids),
                         "fingerprint": fp, "payload_bytes": sum(v.nbytes for v in views),
                         "sha256": None if digest is None else digest.hexdigest()}, sort_keys=True).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *views])


def decode_block(pool: KVPool, key: BlockKey, raw: bytes | None, fp: dict[str, Any] | None = None,
                 verify: bool = True) -> StoredBlock | None:
    """The block in ``raw`` if it is whole, is ``key``'s (digest and token ids) and was written by
    a pool like ``pool`` (``fp``: its :func:`fingerprint`, if the caller has it); else None (a miss:
    truncated, corrupted, another model's or format's). ``verify=False`` (a trusted store's value)
    skips the checksum; with ``verify`` a value without one is a miss. The arrays returned are
    views of ``raw``."""
    if raw is None or len(raw) < 8 or raw[:4] != MAGIC:
        return None
    (n,) = struct.unpack("<I", raw[4:8])
    try:
        header = json.loads(raw[8:8 + n])
    except ValueError:
        return None
    payload = memoryview(raw)[8 + n:]  # no copy
    if not isinstance(header, dict):
        return None
    expected = {"version": VERSION, "key": key.digest.hex(), "token_ids": list(key.token_ids),
                "fingerprint": fingerprint(pool) if fp is None else fp, "payload_bytes": payload.nbytes}
    if any(header.get(name) != value for name, value in expected.items()) \
            or (verify and header.get("sha256") != hashlib.sha256(payload).hexdigest()):
        return None
    s, dtype = pool.strides, pool.config.storage_dtype
    n_data = s.num_layers * 2 * s.block_stride
    data = np.frombuffer(payload, dtype=dtype, count=n_data).reshape(s.num_layers, 2, s.block_stride)
    scales = None
    if pool.scales is not None:
        scales = np.frombuffer(payload, dtype=np.float32, offset=n_data * dtype.itemsize).reshape(s.num_layers, 2, -1)
    return StoredBlock(key, data, scales)


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
