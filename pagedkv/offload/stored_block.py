"""The stored-block format: one block of a pool (every layer's K and V, and int8's scales) as a
self-describing value that another process or machine can check before loading it.

A full block is stored under its portable key (:mod:`pagedkv.blocks.prefix_key`: a
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

The header is canonical JSON (sorted keys, ``json.dumps``' default separators), so
:func:`decode_block` parses nothing a store hands back: it builds the header this pool
would write for the key and compares bytes. A value is served only if that header
matches byte for byte (the key, its token ids, the fingerprint, a ``payload_bytes`` equal
to what this pool's geometry and format need, and the version), the payload has exactly
that many bytes, and its sha256 checks; anything else (a value longer or shorter than the
geometry, another model's, a hostile header) is a miss, never loaded.

Why not safetensors, whose container is the same shape (a bounded JSON header, then
named tensors)? Its parser would be a dependency of the core, which needs only numpy and
numba; and a header compared as bytes with the one expected needs no parser at all, so
no header can be too long, too deep or of another schema.

A store whose values never leave this process's memory (``trusted = True``:
:class:`HostStore`) has nothing that could tear or flip their bytes, so its values are
stored and served without the checksum (``"sha256": null``; hashing is far slower than a
memory copy); a value without one is never served from any other
store.

:mod:`pagedkv.offload.stores` keeps such values in its tiers.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, NamedTuple

import numpy as np

from ..blocks.prefix_key import BlockKey
from ..errors import ArgumentError
from ..geometry.layout import K, V, block_base, block_scale_base
from ..memory.pool import KVPool

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


def _runs(pool: KVPool, block: int) -> list[tuple[Any, int, int]]:
    """``(array, offset, length)`` of every run of block ``block`` in payload order: each layer's K
    and V elements (one contiguous run each), then int8's scales."""
    s = pool.strides
    runs = [(pool.data, block_base(layer, kv, block, s), s.block_stride)
            for layer in range(s.num_layers) for kv in (K, V)]
    if pool.scales is not None:
        run = s.block_size * s.num_kv_heads
        runs += [(pool.scales, block_scale_base(layer, kv, block, s), run)
                 for layer in range(s.num_layers) for kv in (K, V)]
    return runs


def _on_host(array: Any, at: int, n: int) -> np.ndarray:
    """``array[at:at + n]``: a view of a host array, a copy from a device one."""
    piece = array[at:at + n]
    return piece if isinstance(piece, np.ndarray) else piece.copy_to_host()


def _put(array: Any, at: int, values: np.ndarray) -> None:
    """``array[at:at + len(values)] = values``, on the host or on a device."""
    if isinstance(array, np.ndarray):
        array[at:at + values.size] = values
    else:
        array[at:at + values.size].copy_to_device(np.ascontiguousarray(values))


def read_block(pool: KVPool, block: int, key: BlockKey) -> StoredBlock:
    """Copy block ``block`` of a pool, on the host or a GPU (every layer, K and V, and its int8
    scales), each element once."""
    s = pool.strides
    runs = [_on_host(*r) for r in _runs(pool, block)]
    data = np.stack(runs[:2 * s.num_layers]).reshape(s.num_layers, 2, s.block_stride)
    scales = None
    if pool.scales is not None:
        scales = np.stack(runs[2 * s.num_layers:]).reshape(s.num_layers, 2, -1)
    return StoredBlock(key, data, scales)


def write_block(pool: KVPool, block: int, stored: StoredBlock) -> None:
    """Put a stored block's elements (and scales) into block ``block`` of a pool, on the host or a GPU.
    Raises ArgumentError, writing nothing, if the block's arrays are not of this pool's geometry
    and format (they would spill into the next block)."""
    s = pool.strides
    want = (s.num_layers, 2, s.block_stride)
    want_scales = None if pool.scales is None else (s.num_layers, 2, s.block_size * s.num_kv_heads)
    if not (isinstance(stored.data, np.ndarray) and stored.data.shape == want
            and stored.data.dtype == pool.config.storage_dtype) \
            or (None if stored.scales is None else np.shape(stored.scales)) != want_scales:
        raise ArgumentError(f"a stored block of this pool is {pool.config.storage_dtype} {want}"
                            f"{'' if want_scales is None else f' with float32 scales {want_scales}'}; got "
                            f"{getattr(stored.data, 'dtype', '?')} {np.shape(stored.data)}"
                            f"{'' if stored.scales is None else f' with scales {np.shape(stored.scales)}'}")
    values = [stored.data[layer, kv] for layer in range(s.num_layers) for kv in (K, V)]
    if stored.scales is not None:
        values += [stored.scales[layer, kv] for layer in range(s.num_layers) for kv in (K, V)]
    for (array, at, _), x in zip(_runs(pool, block), values, strict=True):
        _put(array, at, x)


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
    of a CPU pool's block copied once, from the pool straight into the value (a GPU pool's runs
    come over to the host first); ``fp``: the pool's :func:`fingerprint`, if the caller has it."""
    views = [_on_host(*r).data.cast("B") for r in _runs(pool, block)]
    return _value(fingerprint(pool) if fp is None else fp, key, views, checksum)


def payload_bytes(pool: KVPool) -> int:
    """The bytes of one block's payload in ``pool``: every layer's K and V elements, and int8's scales."""
    s = pool.strides
    n = s.num_layers * 2 * s.block_stride * pool.config.storage_dtype.itemsize
    if pool.scales is not None:
        n += s.num_layers * 2 * s.block_size * s.num_kv_heads * 4
    return n


def _header(fp: dict[str, Any], key: BlockKey, payload_bytes: int, sha256: str | None) -> bytes:
    """The canonical header: the only one a value of this key, fingerprint and payload may carry."""
    return json.dumps({"version": VERSION, "key": key.digest.hex(), "token_ids": list(key.token_ids),
                       "fingerprint": fp, "payload_bytes": payload_bytes, "sha256": sha256}, sort_keys=True).encode()


_NO_SUM = "0" * 64  # a placeholder the length of a sha256 in hex, to find where one stands in a header
_HEX = frozenset(b"0123456789abcdef")


def _value(fp: dict[str, Any], key: BlockKey, views: list[memoryview], checksum: bool) -> bytes:
    """The value of a block whose payload is the bytes of ``views``, in order."""
    digest = hashlib.sha256() if checksum else None
    if digest is not None:
        for v in views:
            digest.update(v)
    header = _header(fp, key, sum(v.nbytes for v in views), None if digest is None else digest.hexdigest())
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *views])


def decode_block(pool: KVPool, key: BlockKey, raw: bytes | None, fp: dict[str, Any] | None = None,
                 verify: bool = True) -> StoredBlock | None:
    """The block in ``raw`` if it is whole, is ``key``'s (digest and token ids) and was written by
    a pool like ``pool`` (``fp``: its :func:`fingerprint`, if the caller has it); else None (a miss:
    truncated, longer or shorter than this pool's blocks, corrupted, another model's or format's).
    ``verify=False`` (a trusted store's value) skips the checksum; with ``verify`` a value without
    one is a miss. Nothing in ``raw`` is parsed (see the module docstring). The arrays returned
    are views of ``raw``."""
    if not isinstance(raw, (bytes, bytearray, memoryview)) or len(raw) < 8 or raw[:4] != MAGIC:
        return None
    (n,) = struct.unpack("<I", raw[4:8])
    size = payload_bytes(pool)
    fp = fingerprint(pool) if fp is None else fp
    if len(raw) != 8 + n + size:  # a payload longer or shorter than this pool's blocks
        return None
    header, payload = bytes(raw[8:8 + n]), memoryview(raw)[8 + n:]  # the payload is not copied
    with_sum = _header(fp, key, size, _NO_SUM)  # the one header expected, its sha256 left open
    at = with_sum.index(_NO_SUM.encode())
    if header == with_sum[:at - 1] + b"null" + with_sum[at + 65:]:  # stored without a checksum
        if verify:
            return None
    else:
        if len(header) != len(with_sum) or header[:at] != with_sum[:at] or header[at + 64:] != with_sum[at + 64:]:
            return None
        written = header[at:at + 64]
        if not set(written) <= _HEX or (verify and written.decode() != hashlib.sha256(payload).hexdigest()):
            return None
    s, dtype = pool.strides, pool.config.storage_dtype
    n_data = s.num_layers * 2 * s.block_stride
    data = np.frombuffer(payload, dtype=dtype, count=n_data).reshape(s.num_layers, 2, s.block_stride)
    scales = None
    if pool.scales is not None:
        scales = np.frombuffer(payload, dtype=np.float32, offset=n_data * dtype.itemsize).reshape(s.num_layers, 2, -1)
    return StoredBlock(key, data, scales)
