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
from typing import Any

from ..errors import ConfigError
from ..geometry.config import LayerGroup

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
