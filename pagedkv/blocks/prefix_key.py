"""Prefix-cache keys: what a full block holds, and after which prefix.

A block's K/V depends on every token before it, not only its own, so a full
block is named by a key chained over its parent's key (vLLM's
``hash_block_tokens``, nano-vllm's ``compute_hash``). The rule, in
:func:`block_key`::

    key(block 0) = H(ROOT,          tokens of block 0, extras)
    key(block j) = H(key(block j-1), tokens of block j, ())

    H(parent, tokens, extras) = sha256(
        b"pagedkv-block-key-v1"
        | parent digest                       (32 bytes)
        | number of tokens                    (int64, little-endian)
        | each token id                       (int64, little-endian)
        | each extra key, tagged              (1 tag byte | payload length, int64 LE | payload))

    ROOT = sha256(b"pagedkv-prefix-root-v1")

Extra keys (the cache salt, vLLM's ``cache_salt``, that keeps tenants apart)
enter only the first block's key; the chain carries them to every later
block. Each extra is tagged with its type (``s`` str as UTF-8, ``b`` bytes,
``i`` int as decimal ASCII, ``f`` float as IEEE-754 binary64 LE, ``?`` bool as
one byte), so ``1``, ``True`` and ``1.0`` are three different salts, and the
length prefix means no concatenation of extras can forge another.

sha256 makes keys portable (the same in every process and on every machine,
which Python's ``hash()`` is not) and a collision between two prefixes
practically impossible. A key also carries its block's token ids, and two keys
are equal only if digest and token ids both are, so a hit is always confirmed
against the tokens themselves.
"""

from __future__ import annotations

import hashlib
import operator
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import ArgumentError

VERSION_TAG = b"pagedkv-block-key-v1"
ROOT = hashlib.sha256(b"pagedkv-prefix-root-v1").digest()

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True, slots=True, eq=False)
class BlockKey:
    """The key of one full block: the chained sha256 ``digest`` and the block's ``token_ids``."""

    digest: bytes
    token_ids: tuple[int, ...]

    def __hash__(self) -> int:
        return int.from_bytes(self.digest[:8], "little")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, BlockKey) and self.digest == other.digest
                and self.token_ids == other.token_ids)

    def __repr__(self) -> str:
        return f"BlockKey({self.digest[:6].hex()}..., {len(self.token_ids)} tokens)"


def token_ids(ids: Iterable[object], name: str = "token ids") -> list[int]:
    """``ids`` as a list of Python ints, each an integer in the int64 range, or an ArgumentError."""
    try:
        items = list(ids)
    except TypeError:
        raise ArgumentError(f"{name} must be a sequence of integers, got {type(ids).__name__}") from None
    out = []
    for t in items:
        try:
            out.append(operator.index(t))  # type: ignore[arg-type]
        except TypeError:
            raise ArgumentError(f"{name} must be integers, got {t!r}") from None
    if out and not (_INT64_MIN <= min(out) and max(out) <= _INT64_MAX):
        raise ArgumentError(f"{name} must fit in int64")
    return out


def encode_extra(value: object) -> bytes:
    """One extra key as tagged bytes (see the module docstring), or an ArgumentError."""
    if isinstance(value, str):
        tag, payload = b"s", value.encode("utf-8")
    elif isinstance(value, bytes):
        tag, payload = b"b", value
    elif isinstance(value, bool):  # before int: True is an int too
        tag, payload = b"?", bytes([value])
    elif isinstance(value, int):
        tag, payload = b"i", str(value).encode("ascii")
    elif isinstance(value, float):
        tag, payload = b"f", struct.pack("<d", value)
    else:
        raise ArgumentError(
            f"a cache salt or extra key must be str, bytes, int, float or bool, got {type(value).__name__}")
    return tag + struct.pack("<q", len(payload)) + payload


def salt_extras(cache_salt: object) -> tuple[bytes, ...]:
    """The extra keys of a sequence's first block: its encoded cache salt, or none."""
    return () if cache_salt is None else (encode_extra(cache_salt),)


def block_key(parent: BlockKey | None, ids: Iterable[int], extras: tuple[bytes, ...] = ()) -> BlockKey:
    """The key of a full block holding ``ids`` after the block keyed ``parent`` (None: the
    first block). ``extras`` are :func:`encode_extra` outputs; give them for the first block only.

    >>> a = block_key(None, [1, 2])
    >>> block_key(a, [3, 4]) == block_key(block_key(None, [1, 2]), [3, 4])
    True
    >>> block_key(a, [3, 4]) == block_key(block_key(None, [9, 9]), [3, 4])
    False
    >>> block_key(None, [1, 2], salt_extras(1)) == block_key(None, [1, 2], salt_extras(True))
    False
    """
    ids = tuple(ids)
    h = hashlib.sha256(VERSION_TAG)
    h.update(ROOT if parent is None else parent.digest)
    h.update(struct.pack("<q", len(ids)))
    h.update(np.asarray(ids, dtype="<i8").tobytes())
    for extra in extras:
        h.update(extra)
    return BlockKey(h.digest(), ids)
