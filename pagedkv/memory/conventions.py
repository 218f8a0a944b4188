"""The cache layouts other engines use, and exact converters between them and a pagedkv pool.

One layer's keys and values, in each convention's shapes (``N`` blocks of ``bs``
positions, ``H`` KV heads, ``D`` dims; elements in the pool's storage dtype):

=====================  ======================================================================
``"vllm"``             vLLM's flash layout: K and V caches ``[N, bs, H, D]`` each
``"hnd"``              K and V ``[N, H, bs, D]`` each
``"vllm_paged"``       vLLM's original paged_attention kernels (and the cache engine of the
                       cortex_rust seed): K ``[N, H, D / x, bs, x]`` with ``x = 16 // element
                       size`` (16 bytes of a head's dims together), V ``[N, H, D, bs]``
``"vllm_cpu"``         vLLM's CPU attention: one tensor ``[2, N, H, bs, D]`` (K, then V)
``"flashinfer_nhd"``   FlashInfer's single paged tensor, NHD: ``[N, 2, bs, H, D]``
``"flashinfer_hnd"``   the same, HND: ``[N, 2, H, bs, D]``
``"transformers"``     transformers' paged cache: K and V ``[N * bs, H, D]`` each, a row per slot
=====================  ======================================================================

:func:`to_convention` returns copies in those shapes; :func:`from_convention` writes
them back; the round trip is exact (bytes, whatever the storage format). int8's
per-(token, head) scales and fp8's per-layer scales stay in the pool: they are not
part of these layouts.
"""

from __future__ import annotations

from typing import cast

import numpy as np

from ..errors import ArgumentError, ShapeError
from .pool import KVPool

CONVENTIONS = ("vllm", "hnd", "vllm_paged", "vllm_cpu", "flashinfer_nhd", "flashinfer_hnd", "transformers")


def _nhd(pool: KVPool, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Views ``[N, bs, H, D]`` of a CPU pool's layer, K and V, whatever its layout (a GPU pool:
    PoolMismatchError; ``pool.to_host()`` copies it)."""
    pool.host  # noqa: B018 (raises for a GPU pool)
    k, v = cast(np.ndarray, pool.k(layer)), cast(np.ndarray, pool.v(layer))
    if pool.config.layout == "HND":
        return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    return k, v


def _x(pool: KVPool) -> int:
    x = 16 // pool.config.storage_dtype.itemsize
    if pool.config.head_dim % x:
        raise ArgumentError(f"vllm_paged packs {x} dims together: head_dim {pool.config.head_dim} is not a multiple")
    return x


def to_convention(pool: KVPool, convention: str, layer: int) -> tuple[np.ndarray, ...]:
    """``layer`` of a CPU pool in ``convention``'s shapes (copies): ``(key_cache, value_cache)``
    or, for the single-tensor conventions, ``(kv_cache,)``."""
    k, v = _nhd(pool, layer)
    n, bs, h, d = k.shape
    if convention == "vllm":
        return k.copy(), v.copy()
    if convention == "hnd":
        return k.transpose(0, 2, 1, 3).copy(), v.transpose(0, 2, 1, 3).copy()
    if convention == "vllm_paged":
        x = _x(pool)
        return (np.ascontiguousarray(k.reshape(n, bs, h, d // x, x).transpose(0, 2, 3, 1, 4)),
                np.ascontiguousarray(v.transpose(0, 2, 3, 1)))
    if convention == "vllm_cpu":
        return (np.stack([k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)]),)
    if convention == "flashinfer_nhd":
        return (np.stack([k, v], axis=1),)
    if convention == "flashinfer_hnd":
        return (np.stack([k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)], axis=1),)
    if convention == "transformers":
        return k.reshape(n * bs, h, d).copy(), v.reshape(n * bs, h, d).copy()
    raise ArgumentError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


def from_convention(pool: KVPool, convention: str, layer: int, caches: tuple[np.ndarray, ...]) -> None:
    """Write ``caches`` (``convention``'s shapes, as :func:`to_convention` gives them) into
    ``layer`` of a CPU pool: the exact inverse of :func:`to_convention`."""
    k_view, v_view = _nhd(pool, layer)
    n, bs, h, d = k_view.shape
    caches = tuple(np.asarray(c) for c in caches)
    expected = [c.shape for c in to_convention(pool, convention, layer)]  # also checks the convention
    if [c.shape for c in caches] != expected:
        raise ShapeError(f"{convention} caches of this pool have shapes {expected}, got {[c.shape for c in caches]}")
    if any(c.dtype != pool.config.storage_dtype for c in caches):
        got = [str(c.dtype) for c in caches]
        raise ShapeError(f"caches must hold the pool's {pool.config.storage_dtype}, got {got}")
    if convention == "vllm":
        k, v = caches
    elif convention == "hnd":
        k, v = (c.transpose(0, 2, 1, 3) for c in caches)
    elif convention == "vllm_paged":
        k = caches[0].transpose(0, 3, 1, 2, 4).reshape(n, bs, h, d)
        v = caches[1].transpose(0, 3, 1, 2)
    elif convention == "vllm_cpu":
        k, v = (c.transpose(0, 2, 1, 3) for c in caches[0])
    elif convention == "flashinfer_nhd":
        k, v = caches[0][:, 0], caches[0][:, 1]
    elif convention == "flashinfer_hnd":
        k, v = caches[0][:, 0].transpose(0, 2, 1, 3), caches[0][:, 1].transpose(0, 2, 1, 3)
    else:  # transformers
        k, v = (c.reshape(n, bs, h, d) for c in caches)
    k_view[...] = k
    v_view[...] = v
