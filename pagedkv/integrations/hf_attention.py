"""pagedkv's attention kernels as a transformers attention implementation: ``attn_implementation="pagedkv"``.

::

    from pagedkv.integrations.hf_attention import register
    from pagedkv.integrations.transformers import PagedCache

    register()                                             # once: "pagedkv" joins transformers' registry
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="pagedkv")
    out = model.generate(**inputs, cache=PagedCache(model.config), max_new_tokens=32)

With the model's own attention (sdpa, eager), :class:`~pagedkv.integrations.transformers.PagedCache`
gathers every layer's keys and values out of the pool at every step, and the model reads that
copy. Here nothing is gathered: each layer's new K/V are written into the pool and the
layer's attention runs pagedkv's kernel over the blocks (decode and prefill, grouped- and
multi-query heads, sliding windows, soft-capping), so a decode step reads the context once.

Padding. transformers hands the cache every row's padding tokens (left padding of unequal
prompts); only the attention mask says which they are. The mask of a token against itself is
its padding bit, so the function reads that diagonal, writes only real tokens and runs
attention for their queries; a padding row's output is zero (the model never reads it: no
real token attends to padding). Each row's sequence therefore holds its real tokens only, so
unequal prompts take only the blocks they need.

Sliding-window layers (Gemma 2/3, gpt-oss): the cache's sliding layer groups free the blocks
that leave the window, and the kernel attends to the window's positions. Left padding comes
before every real token of a row, so the window over the padded positions the model's mask
uses holds the same real tokens as pagedkv's window over the stored ones.

Prefix reuse (``PagedCache(prompt_ids=...)``, ``new_cache``) works for unpadded prompts (one
prompt per call, as ``pagedkv generate`` runs them); padded prompts with ``prompt_ids`` get a
ConfigError before anything is stored (their cached prefixes would be keyed on padding).

Numbers: attention in float32 (the kernels' own, :mod:`pagedkv.testing.tolerance`), not
the bit-for-bit copy of transformers' attention the gathering path gives; greedy tokens agree
with transformers' own in the tests, and the logits within ``1e-4`` there. Refused with a
ConfigError: attention sinks (gpt-oss) and non-causal attention. Needs the ``hf`` extra.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from ..errors import ArgumentError, ConfigError
from .transformers import ATTENTION, LAYER_TAG, PagedLayer, _to_numpy


def register() -> None:
    """Add ``"pagedkv"`` to transformers' attention and mask registries (its masks are sdpa's,
    read only for padding). Idempotent."""
    AttentionInterface.register(ATTENTION, pagedkv_attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def _real_tokens(mask: torch.Tensor | None, rows: int, new: int) -> np.ndarray | None:
    """bool ``[rows, new]``: which of the new tokens are real (not padding), from the layer's 4-D
    mask ``[rows, 1, new, keys]`` (bool: True attends; float: 0 attends); None when all are (no
    mask, or no padding among them: every decode step after the prompt)."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[0] != rows or mask.shape[2] != new:
        raise ArgumentError(f"pagedkv attention needs a [B, 1, T, S] mask for B={rows}, T={new}; "
                            f"got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:  # sdpa's masks: a numpy view, whose indexing costs less per call than torch's
        m = mask.detach().numpy()
        allowed = m[:, 0, :, m.shape[3] - new:].diagonal(axis1=1, axis2=2)  # each token against itself
    else:  # an additive float mask, of any float dtype (numpy has no bfloat16)
        allowed = (mask.detach()[:, 0, :, mask.shape[3] - new:].diagonal(dim1=1, dim2=2) == 0).numpy()
    return None if allowed.all() else np.array(allowed)  # its own copy: the mask may be a view of a reused buffer


def pagedkv_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract (``query [B, Hq, T, D]`` and what the cache's
    ``update`` returned; the output ``[B, T, Hq, D]``), over a PagedCache's pool."""
    layer = getattr(key, LAYER_TAG, None)
    if not isinstance(layer, PagedLayer):
        raise ConfigError('attn_implementation="pagedkv" needs a PagedCache as the cache: '
                          "generate(..., cache=PagedCache(model.config))")
    if dropout:
        raise ArgumentError("pagedkv attention is for inference: dropout must be 0")
    if getattr(module, "sinks", None) is not None or kwargs.get("s_aux") is not None:
        raise ConfigError('attn_implementation="pagedkv" does not serve attention sinks (gpt-oss) yet; use the '
                          "model's own attention with PagedCache")
    if getattr(module, "is_causal", True) is False:
        raise ConfigError('attn_implementation="pagedkv" serves causal self-attention only')
    cache = layer.cache
    b, hq, t, d = query.shape
    first_layer = cache.step is None or layer.layer_idx in cache.written  # of this forward pass
    first_b, first_t, first_real, first_mask = cache.pass_tokens
    same_mask = not first_layer and attention_mask is not None and attention_mask is first_mask
    if same_mask and (b, t) == (first_b, first_t):
        real = first_real  # the first layer's mask tensor itself (transformers hands one to all layers of a kind)
    else:  # read from the mask (a cost per layer worth skipping where the first layer's can be reused)
        real = _real_tokens(attention_mask, b, t)
    if first_layer:
        if cache.prompt_ids is not None and real is not None:
            raise ConfigError('attn_implementation="pagedkv" reuses prefixes (prompt_ids) of unpadded prompts only; '
                              "use the model's own attention (sdpa, eager) for padded ones")
        counts = [t] * b if real is None else real.sum(axis=1).tolist()  # real new tokens of each row
        cache.begin_pass(b, counts)
        cache.padding = [p + t - n for p, n in zip(cache.padding or [0] * b, counts, strict=True)]
        cache.pass_tokens = (b, t, real, attention_mask)
        first_b, first_t, first_real = b, t, real
    step, kv = cache.step, cache.kv
    assert step is not None and kv is not None
    same = real is first_real or real is not None and first_real is not None and np.array_equal(real, first_real)
    if (b, t) != (first_b, first_t) or not same:
        raise ArgumentError(f"layer {layer.layer_idx}'s mask marks other tokens as padding than the first layer's")
    # the real tokens, in (row, position) order: all of them (no copy to pick them) or the mask's
    rows = None if real is None else np.flatnonzero(real.reshape(-1))
    keys, values = _to_numpy(key), _to_numpy(value)
    kv.write(layer.layer_idx, keys if rows is None else keys[rows], values if rows is None else values[rows], step)
    cache.written.add(layer.layer_idx)
    layer.num_tokens += t  # the model's view: padding counted, as in its masks
    q = _to_numpy(query if query.dtype == torch.float32 else query.float())
    if rows is not None:
        q = q[rows]
    softcap, window = kwargs.get("softcap"), kwargs.get("sliding_window")
    options: dict[str, Any] = {"scale": scaling, "soft_cap": softcap if softcap else None}
    if window is not None:  # the last `window` positions, itself included: pagedkv's rule, over real tokens
        options["sliding_window"] = int(window)
    out = np.asarray(kv.attention(layer.layer_idx, q, step, **options))
    if rows is not None:  # padding rows: zeros (no real token attends to them)
        full = np.zeros((b * t, hq, d), dtype=np.float32)
        full[rows] = out
        out = full
    result = torch.from_numpy(out.reshape(b, t, hq, d))
    return (result if query.dtype == torch.float32 else result.to(query.dtype)), None
