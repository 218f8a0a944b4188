"""One forward pass per step, over the paged cache: :class:`ModelRunner`.

A step's tokens (prefill chunks and decode tokens of many requests) go through the model as
one packed sequence ``[1, N]``, each with its own position, with no padding anywhere. Each
attention layer runs :func:`paged_attention_forward` (registered with transformers as the
attention implementation ``"pagedkv_packed"``): it writes the layer's new K/V into the pool
at the step's slots and runs pagedkv's attention over the blocks, causal within each request
(varlen prefill and decode in one call, the step planned once for every layer). The model
builds no mask (the kernels know each row's sequence and position) and computes logits only
at the positions that sample.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import torch
from transformers import AttentionInterface, AttentionMaskInterface

from ..cache import PagedKVCache, Step
from ..errors import ArgumentError, ConfigError
from ..integrations.transformers import _to_numpy
from .scheduler import Batch

#: the attention implementation a model runs under the engine
ATTENTION = "pagedkv_packed"
#: the keyword that carries the step to the attention layers
STEP_KWARG = "pagedkv_step"


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The engine's mask function: no mask (each query row's sequence and causal limit come from
    the step's plan)."""
    return None


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract for a packed step: ``query [1, Hq, N, D]``,
    ``key``/``value [1, H, N, D]`` (the step's new tokens); returns ``[1, N, Hq, D]``."""
    step = kwargs.get(STEP_KWARG)
    if not isinstance(step, Step):
        raise ConfigError(f'attn_implementation="{ATTENTION}" runs only under pagedkv.LLM, which hands each layer '
                          "its step")
    if dropout:
        raise ArgumentError("pagedkv attention is for inference: dropout must be 0")
    if getattr(module, "sinks", None) is not None or kwargs.get("s_aux") is not None:
        raise ConfigError("pagedkv.LLM does not serve attention sinks (gpt-oss) yet")
    cache = step.cache
    layer = int(cast(Any, module).layer_idx)
    _, hq, n, d = query.shape
    cache.write(layer, _to_numpy(key), _to_numpy(value), step)
    q = _to_numpy(query if query.dtype == torch.float32 else query.float())
    softcap, window = kwargs.get("softcap"), kwargs.get("sliding_window")
    options: dict[str, Any] = {"scale": scaling, "soft_cap": softcap if softcap else None}
    if window is not None:
        options["sliding_window"] = int(window)
    out = torch.from_numpy(np.asarray(cache.attention(layer, q, step, **options)).reshape(1, n, hq, d))
    return (out if query.dtype == torch.float32 else out.to(query.dtype)), None


def _packed_forward(linear: torch.nn.Linear) -> Any:
    """A forward for ``linear`` on its weight reordered once into oneDNN's blocked layout (what
    ``torch.compile``'s CPU freezing does), instead of at every call as eager ``nn.Linear`` does:
    what a step's small matrix products gain is in ``docs/performance.md``. The reordered copy is
    made now, beside the weight (a second copy of every linear layer's weights)."""
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return forward


def register() -> None:
    """Add the engine's attention (and its no-mask function) to transformers' registries. Idempotent."""
    AttentionInterface.register(ATTENTION, paged_attention_forward)
    AttentionMaskInterface.register(ATTENTION, _no_mask)


class ModelRunner:
    """Runs a transformers causal LM's forward over the cache, one packed step at a time."""

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, *, prepack_weights: bool = False) -> None:
        register()
        self.model, self.cache = model, cache
        self.packed: list[tuple[torch.nn.Module, Any]] = []
        if prepack_weights:
            self.packed = [(m, _packed_forward(m)) for m in model.modules() if type(m) is torch.nn.Linear]

    @contextlib.contextmanager
    def _packed_linears(self) -> Iterator[None]:
        """The linear layers run on their prepacked weights for the forward pass (the model's own
        forward again after)."""
        for module, forward in self.packed:
            module.forward = forward
        try:
            yield
        finally:
            for module, _ in self.packed:
                del module.forward

    @contextlib.contextmanager
    def _packed_attention(self) -> Iterator[None]:
        """The model's attention is the engine's for the forward pass, and the caller's again after
        (the model stays usable on its own: ``generate``, other caches)."""
        # transformers has a setter and no public getter: the config attribute its own code reads
        before = getattr(self.model.config, "_attn_implementation", None)
        cast(Any, self.model).set_attn_implementation(ATTENTION)
        try:
            yield
        finally:
            cast(Any, self.model).set_attn_implementation(before)

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[torch.Tensor, list[int]]:
        """Compute the batch's tokens; returns the float32 logits ``[S, vocab]`` of the ``S``
        requests that sample (in batch order) and their indices in the batch."""
        cache = self.cache
        step = cache.begin_step([r.seq_id for r in batch.requests], [len(t) for t in batch.token_ids],
                                token_ids=batch.token_ids)
        try:
            ids = torch.from_numpy(np.fromiter((t for chunk in batch.token_ids for t in chunk), np.int64,
                                               batch.num_tokens))[None]
            positions = torch.from_numpy(np.ascontiguousarray(step.positions, dtype=np.int64))[None]
            ends = np.cumsum([len(t) for t in batch.token_ids]) - 1
            sampling = [i for i, s in enumerate(batch.samples) if s]
            keep = torch.from_numpy(ends[sampling].astype(np.int64))
            if not sampling:  # only prompt chunks this step: no logits needed, but the forward runs
                keep = torch.zeros(1, dtype=torch.int64)
            with self._packed_attention(), self._packed_linears():
                out = self.model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=keep,
                                 **{STEP_KWARG: step})
        finally:
            cache.end_step(step)
        logits = out.logits[0]
        return (logits if sampling else logits[:0]).float(), sampling
