"""``pagedkv.plan_memory`` and ``pagedkv plan``: a deployment's KV memory, from a transformers config.

The arithmetic is :mod:`pagedkv.geometry.memory_plan`'s; this module reads a model's geometry
(layers, K/V heads, head dim, sliding layers) from its transformers config, a checkpoint
directory or a ``config.json``, and makes the pool :class:`pagedkv.LLM` would make from the same
arguments (:func:`~.hf_layers.pool_config`), so the plan is the engine's pool to the byte. Reads
configs only: torch is never imported, transformers only to read a path.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigError
from ..geometry.config import CacheConfig, positive_int
from ..geometry.formats import FORMATS, get_format
from ..geometry.memory_plan import MemoryPlan
from ..geometry.memory_plan import plan_memory as plan_pool
from .hf_layers import pool_config


def _read_config(source: Any) -> Any:
    if not isinstance(source, (str, os.PathLike)):
        return source
    path = os.fspath(source)
    if not os.path.exists(path):
        raise ConfigError(f"no model config at {path!r} (a checkpoint directory or a config.json)")
    try:
        import transformers

        return transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"cannot read a model config from {path!r}: {e}") from e


def plan_memory(model: Any, *, kv_dtype: str | None = None, max_model_len: int | None = None, max_num_seqs: int = 1,
                block_size: int = 16, kv_cache_bytes: int | None = None, shared_prefix: int = 0,
                chunk: int | None = None) -> MemoryPlan:
    """Plan the KV memory of a deployment (:mod:`pagedkv.geometry.memory_plan` says what is in it).

    Args:
        model: a :class:`~pagedkv.CacheConfig` (geometry, format, block size and layer groups
            taken from it), a transformers config, a checkpoint directory or a ``config.json``.
        kv_dtype: the storage format (default: the config's dtype where it is one, else float32).
        max_model_len: the longest sequence (default: the config's ``max_position_embeddings``).
        max_num_seqs: sequences at once.
        block_size: tokens per block (for a transformers config).
        kv_cache_bytes: the pool's budget (default: what the sequences need at their worst).
        shared_prefix: tokens of a prefix every sequence shares (a system prompt).
        chunk: the most prompt tokens computed in one step (``max_num_batched_tokens``).
    """
    if isinstance(model, CacheConfig):
        if max_model_len is None:
            raise ConfigError("plan_memory of a CacheConfig needs max_model_len")
        return plan_pool(model, max_model_len=max_model_len, max_num_seqs=max_num_seqs, kv_cache_bytes=kv_cache_bytes,
                         shared_prefix=shared_prefix, chunk=chunk)
    config = _read_config(model)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if kv_dtype is None:
        named = str(getattr(config, "dtype", None) or getattr(text, "dtype", None) or "float32").replace("torch.", "")
        kv_dtype = named if named in FORMATS else "float32"
    kv_dtype = get_format(kv_dtype).name
    if max_model_len is None:
        max_model_len = getattr(text, "max_position_embeddings", None)
        if not isinstance(max_model_len, int):
            raise ConfigError("the config names no max_position_embeddings: give max_model_len")
    max_model_len = positive_int("max_model_len", max_model_len)
    block_size = positive_int("block_size", block_size)
    if kv_cache_bytes is not None:
        pool = pool_config(config, dtype=kv_dtype, block_size=block_size, kv_cache_bytes=kv_cache_bytes)
        return plan_pool(pool, max_model_len=max_model_len, max_num_seqs=max_num_seqs, kv_cache_bytes=kv_cache_bytes,
                         shared_prefix=shared_prefix, chunk=chunk)
    # no budget: a pool as large as the sequences need; its groups are those of a pool that size
    geometry = pool_config(config, dtype=kv_dtype, block_size=block_size, num_blocks=(1 << 31) - 1)
    plan = plan_pool(geometry, max_model_len=max_model_len, max_num_seqs=max_num_seqs, shared_prefix=shared_prefix,
                     chunk=chunk)
    pool = pool_config(config, dtype=kv_dtype, block_size=block_size, num_blocks=plan.blocks_needed)
    if pool.layer_groups != geometry.layer_groups:  # the window never fills a pool that small: no groups
        plan = plan_pool(pool, max_model_len=max_model_len, max_num_seqs=max_num_seqs, shared_prefix=shared_prefix,
                         chunk=chunk)
    return plan
