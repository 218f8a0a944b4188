"""Which layers of a transformers model pagedkv serves, and their layer groups.

transformers names each decoder layer's kind in its config (``layer_types``) or, for older
configs, implies it (a ``sliding_window`` makes every layer sliding, as in Mistral). pagedkv
serves full and sliding-window causal self-attention; its sliding layers form
:class:`~pagedkv.LayerGroup` s of their own, whose blocks go back to the pool as they leave the
window. Any other kind (chunked, linear or state-space layers, layers sharing another's K/V,
an encoder-decoder's cross-attention) is refused with a ConfigError before anything is stored.
Reads only the config: neither torch nor transformers is imported here.
"""

from __future__ import annotations

import math
from typing import Any, cast

from ..errors import ConfigError
from ..geometry.config import CacheConfig, LayerGroup, positive_int

#: the kinds of layer (transformers' ``layer_types``) whose attention pagedkv serves
SERVED_LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_types(config: Any, text: Any, num_layers: int) -> list[str]:
    """Each layer's kind, read as transformers' own caches read it (``get_layer_types_and_kwargs``):
    the config's ``layer_types``, or, where it has none, every layer sliding when it names a
    ``sliding_window`` (Mistral, Phi-3), chunked with an ``attention_chunk_size`` (Llama 4), full
    otherwise.

    Raises:
        ConfigError: an encoder-decoder model (its cross-attention), or a layer of a kind other
            than :data:`SERVED_LAYER_TYPES` (chunked attention, linear attention, state-space or
            shared-K/V layers), named with the layer, before anything is stored.
    """
    if getattr(config, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False):
        raise ConfigError(f"PagedCache serves the self-attention of decoder-only models; "
                          f"{getattr(config, 'model_type', 'this model')!r} is an encoder-decoder (cross-attention)")
    types = getattr(text, "layer_types", None)
    if types is None:
        if getattr(text, "sliding_window", None) is not None:
            types = ["sliding_attention"] * num_layers
        elif getattr(text, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"] * num_layers
        else:
            types = ["full_attention"] * num_layers
    types = list(types)
    if len(types) != num_layers:
        raise ConfigError(f"the config's layer_types has {len(types)} entries for {num_layers} layers")
    for i, kind in enumerate(types):
        if kind not in SERVED_LAYER_TYPES:
            raise ConfigError(f"layer {i} is {kind!r}: PagedCache serves layers of the kinds "
                              f"{', '.join(SERVED_LAYER_TYPES)}")
    if getattr(text, "kv_sharing_modes", None) is not None and "reuse" in text.kv_sharing_modes:
        raise ConfigError("layers that reuse another layer's K/V (kv_sharing_modes) are not served: PagedCache "
                          "stores every layer's own K/V")
    return types


def layer_groups(config: Any, text: Any, num_layers: int, num_slots: int) -> tuple[LayerGroup, ...] | None:
    """A model's sliding and full layers (:func:`layer_types`) as layer groups of equal size (the
    greatest common divisor of the two counts, so that no block leaves a plane unused; one group
    when every layer slides); None for a model of full layers only, or a window the pool's
    ``num_slots`` could not outgrow (it then never leaves anything out)."""
    types, window = layer_types(config, text, num_layers), getattr(text, "sliding_window", None)
    if "sliding_attention" not in types:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise ConfigError(f"the config has sliding layers but its sliding_window is {window!r}, "
                          "not a positive integer")
    if window >= num_slots:
        return None
    sliding = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    full = [i for i, kind in enumerate(types) if kind != "sliding_attention"]
    size = math.gcd(len(sliding), len(full)) if full else len(sliding)
    return tuple(LayerGroup(tuple(layers[i:i + size]), w)
                 for layers, w in ((sliding, window), (full, None)) for i in range(0, len(layers), size))


def kv_geometry(text: Any) -> tuple[int, int]:
    """``(K/V heads, head dim)`` from a model's text config, as its attention layers compute them."""
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
        raise ConfigError("stores with prompt_ids need the K/V geometry from the config (num_key_value_heads, "
                          "head_dim); this config does not say it")
    return kv_heads, head_dim


def pool_config(config: Any, *, dtype: str, block_size: int, kv_cache_bytes: int | None = None,
                num_blocks: int | None = None) -> CacheConfig:
    """The pool a transformers model's K/V need: its geometry, ``dtype`` (a storage format) and
    ``block_size``, sized by ``num_blocks`` or by a budget of ``kv_cache_bytes`` (one of them),
    with the model's layer groups (sliding layers apart) when the pool outgrows their window.
    A budget is spent on blocks of the grouped geometry (a block holds one group's layers), so
    a model with sliding layers gets every block its budget pays for."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    num_layers = getattr(text, "num_hidden_layers", None)
    if not isinstance(num_layers, int) or num_layers <= 0:
        raise ConfigError("a pool for this model needs a config with num_hidden_layers")
    if (kv_cache_bytes is None) == (num_blocks is None):
        raise ConfigError("size the pool by kv_cache_bytes or by num_blocks (one of them)")
    kv_heads, head_dim = kv_geometry(text)
    base: dict[str, Any] = dict(num_layers=num_layers, num_kv_heads=kv_heads, head_dim=head_dim,
                                block_size=block_size, dtype=dtype)
    groups = layer_groups(config, text, num_layers, 1 << 62)  # as if the pool outgrew any window
    if num_blocks is None:
        assert kv_cache_bytes is not None
        windowless = None if groups is None else [LayerGroup(g.layers) for g in groups]
        num_blocks = CacheConfig.from_memory_budget(kv_cache_bytes, **base, layer_groups=windowless).num_blocks
    num_blocks = positive_int("num_blocks", num_blocks)
    if groups is not None and layer_groups(config, text, num_layers, num_blocks * block_size) is None:
        # the window never fills this pool: nothing ever leaves it, so no groups (and a budget buys
        # blocks of every layer)
        groups = None
        if kv_cache_bytes is not None:
            num_blocks = CacheConfig.from_memory_budget(kv_cache_bytes, **base).num_blocks
    return CacheConfig(num_blocks=num_blocks, **base, layer_groups=cast(Any, groups))
