"""``pagedkv.LLM``: many requests over one paged pool, one forward per step.

::

    from pagedkv import LLM, SamplingParams

    llm = LLM("path/to/checkpoint", kv_cache_bytes=2 << 30)
    for out in llm.generate(["The capital of France is", "1, 2, 3,"], SamplingParams(max_tokens=32)):
        print(out.outputs[0].text)

    llm.add_request("a", "Once upon a time", SamplingParams(max_tokens=64, temperature=0.8, seed=1))
    while llm.has_unfinished_requests():
        for out in llm.step():                 # what each request produced in this step
            print(out.request_id, out.new_token_ids)

Requests join and leave between steps (continuous batching): each step, the
:class:`~.scheduler.Scheduler` packs decode tokens and prompt chunks under a token budget,
and the :class:`~.runner.ModelRunner` runs them through the model in one forward pass over
the pool. A prompt prefix already in the pool (or in a store behind it) is not computed again.
With a float32 model and pool, each request's greedy tokens are the model's own (those of
transformers' ``generate`` for that request alone), whatever else runs beside it.

Needs the ``hf`` extra (transformers and torch), CPU only.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import torch

from ..cache import PagedKVCache, warmup
from ..errors import ArgumentError, ConfigError
from ..explain import PrefixExplanation
from ..geometry.config import positive_int
from ..geometry.formats import get_format
from ..integrations.generate import load
from ..integrations.hf_identity import model_id_of
from ..integrations.hf_layers import pool_config
from ..integrations.transformers import EXACT_FORMATS
from ..offload.stores import BlockStore
from .params import CompletionOutput, RequestOutput, SamplingParams
from .runner import ModelRunner
from .sampler import logprobs_of, sample
from .scheduler import Request, Scheduler

#: the pool's size when neither kv_cache_bytes nor num_blocks is given
DEFAULT_KV_CACHE_BYTES = 1 << 30


class LLM:
    """A transformers causal LM served from a paged KV cache, many requests at once.

    Args:
        model: a checkpoint directory (or hub id) with its tokenizer, or a loaded
            ``PreTrainedModel`` (then pass ``tokenizer=`` for text prompts and outputs).
        tokenizer: a tokenizer for a model object (None: token ids in, token ids out).
        dtype: the model's dtype when loading from a path (``"float32"``, ``"bfloat16"``; None:
            the checkpoint's).
        kv_dtype: the pool's storage format (:mod:`pagedkv.geometry.formats`; None: the model's
            own dtype, which stores K/V exactly).
        block_size: tokens per block.
        kv_cache_bytes, num_blocks: the pool's size, as a byte budget or in blocks (not both;
            neither: :data:`DEFAULT_KV_CACHE_BYTES`).
        max_num_seqs: requests running at once, at most.
        max_num_batched_tokens: tokens one step computes, at most (the chunk of a long prompt).
        enable_prefix_caching: reuse the K/V of prompt prefixes computed before.
        stores: slower tiers behind the prefix cache (:mod:`pagedkv.offload.stores`).
        max_model_len: the longest request, prompt and output (None: the model's
            ``max_position_embeddings``, and never more than the pool holds).
        skip_tokenizer_init: load no tokenizer from the checkpoint (prompts and outputs as
            token ids), as vLLM's flag; without it, a checkpoint without one is a ConfigError.
        prepack_weights: run the linear layers on weights reordered once for oneDNN, which
            eager ``nn.Linear`` does at every call (float32 gains most; ``docs/performance.md``
            has the figures), at the cost of a second copy of every linear layer's weights.

    Raises ConfigError (or ArgumentError) naming the argument that is wrong, before anything
    is loaded.
    """

    def __init__(self, model: Any, *, tokenizer: Any = None, dtype: str | None = None, kv_dtype: str | None = None,
                 block_size: int = 16, kv_cache_bytes: int | None = None, num_blocks: int | None = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, enable_prefix_caching: bool = True,
                 stores: Sequence[BlockStore] = (), max_model_len: int | None = None,
                 skip_tokenizer_init: bool = False, prepack_weights: bool = False) -> None:
        block_size = positive_int("block_size", block_size)
        max_num_seqs = positive_int("max_num_seqs", max_num_seqs)
        max_num_batched_tokens = positive_int("max_num_batched_tokens", max_num_batched_tokens)
        if kv_cache_bytes is not None and num_blocks is not None:
            raise ConfigError("give the pool's size as kv_cache_bytes or as num_blocks, not both")
        if kv_dtype is not None:
            get_format(kv_dtype)
        torch_dtype = None
        if dtype is not None:
            torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else None
            if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
                raise ConfigError(f"dtype must name a torch floating-point dtype ('float32', 'bfloat16'), "
                                  f"got {dtype!r}")
        if isinstance(model, (str, os.PathLike)):
            tokenizer, model = load(os.fspath(model), dtype=torch_dtype, tokenizer=not skip_tokenizer_init)
        elif not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise ConfigError(f"model must be a checkpoint path or a transformers model, got {type(model).__name__}")
        elif torch_dtype is not None:
            model = model.to(torch_dtype)
        self.model, self.tokenizer = model.eval(), tokenizer
        config = model.config
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        num_layers = getattr(text, "num_hidden_layers", None)
        if not isinstance(num_layers, int) or num_layers <= 0:
            raise ConfigError("pagedkv.LLM needs a model config with num_hidden_layers")
        model_dtype = next(model.parameters()).dtype
        fmt = kv_dtype or EXACT_FORMATS.get(model_dtype, "float32")
        cache_config = pool_config(config, dtype=fmt, block_size=block_size, num_blocks=num_blocks,
                                   kv_cache_bytes=None if num_blocks is not None else
                                   DEFAULT_KV_CACHE_BYTES if kv_cache_bytes is None else kv_cache_bytes)
        stores = tuple(stores)
        self.cache = PagedKVCache(cache_config, "auto", enable_prefix_caching=enable_prefix_caching, stores=stores,
                                  model_id=model_id_of(model) if stores else None)
        #: seconds spent compiling (or loading) the kernels before the first step, so that no
        #: request's time includes them
        self.warmup_seconds = warmup([cache_config.dtype], backend=self.cache.backend.NAME,
                                     routines=("write", "attention", "copy_blocks"))
        limit = getattr(text, "max_position_embeddings", None)
        self.max_model_len = min(cache_config.num_slots, limit if isinstance(limit, int) and limit > 0 else 1 << 62)
        if max_model_len is not None:
            self.max_model_len = min(self.max_model_len, positive_int("max_model_len", max_model_len))
        self.scheduler = Scheduler(self.cache, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
        if not torch.backends.mkldnn.is_available() and prepack_weights:
            raise ConfigError("prepack_weights needs torch built with oneDNN (mkldnn)")
        self.runner = ModelRunner(model, self.cache, prepack_weights=prepack_weights)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(tokenizer, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        self.eos_token_id: int | None = eos if isinstance(eos, int) else None
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()

    # -- requests ------------------------------------------------------------------------------

    def _token_ids(self, prompt: Any) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ArgumentError("a text prompt needs a tokenizer: pass tokenizer= (or token ids)")
            return prompt, list(self.tokenizer(prompt)["input_ids"])
        ids = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt) if isinstance(prompt, Sequence) else None
        vocab = getattr(self.model.config, "vocab_size", None)
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids) \
                or (isinstance(vocab, int) and max(ids) >= vocab):
            raise ArgumentError(f"a prompt must be a str or a non-empty sequence of token ids below the vocabulary's "
                                f"{vocab}, got {prompt!r:.80}")
        return None, ids

    def add_request(self, request_id: str | None, prompt: Any, params: SamplingParams | None = None,
                    *, cache_salt: Hashable = None) -> str:
        """Queue a request; returns its id (a new one for ``None``). A prompt too long for the
        model or the pool finishes at once with ``finish_reason == "error"`` (the next
        :meth:`step` reports it); the other requests go on."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ArgumentError(f"params must be a SamplingParams, got {type(params).__name__}")
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if not isinstance(request_id, str):
            raise ArgumentError(f"request_id must be a str, got {request_id!r}")
        if request_id in self._requests:
            raise ArgumentError(f"request {request_id!r} exists already")
        text, ids = self._token_ids(prompt)
        r = Request(request_id, text, ids, params, self.max_model_len, cache_salt)
        self._requests[request_id] = r
        if len(ids) >= self.max_model_len:
            r.finish_reason = "error"
            r.error = (f"the prompt has {len(ids)} tokens; this engine serves at most {self.max_model_len - 1} "
                       f"(max_model_len {self.max_model_len}: the model's positions and the pool's "
                       f"{self.cache.config.num_slots} slots)")
        else:
            self.scheduler.add(r)
        return request_id

    def explain_prefix(self, prompt: Any, *, cache_salt: Hashable = None,
                       reveal_other_salts: bool = True) -> PrefixExplanation:
        """Where each block of ``prompt``'s K/V would come from if it were added now (the pool, a
        store) or why not: :meth:`pagedkv.PagedKVCache.explain_prefix` (a text prompt is
        tokenized first). Changes nothing."""
        _, ids = self._token_ids(prompt)
        return self.cache.explain_prefix(ids, cache_salt, reveal_other_salts=reveal_other_salts)

    def abort(self, request_id: str, index: int | None = None) -> None:
        """End a request now (its blocks go back); its output says ``finish_reason == "abort"``.
        With ``index``, only that completion of it (the others go on). Unknown or finished
        requests and completions are left as they are."""
        r = self._requests.get(request_id)
        if r is None:
            return
        for c in (r, *r.forks):
            if not c.finished and index in (None, c.index):
                self.scheduler.finish(c, "abort")

    def has_unfinished_requests(self) -> bool:
        """Whether a request is running or waiting, or finished without :meth:`step` saying so yet."""
        return self.scheduler.has_unfinished() or any(map(_done, self._requests.values()))

    # -- steps ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; returns what changed: each request that produced tokens (``new_token_ids``)
        or finished since the last call. Finished requests are then forgotten."""
        batch = self.scheduler.schedule()
        if batch.requests:
            try:
                logits, sampling = self.runner.run(batch)
            except BaseException as e:  # their sequences are half-written: they cannot go on
                for r in batch.requests:
                    self.scheduler.finish(r, "error")
                    r.error = f"the model's forward failed: {e}"
                raise
            rows = list(range(len(sampling)))
            for row, i in enumerate(sampling):  # a prompt just computed whose request wants n completions
                r = batch.requests[i]
                if r.params.n > 1 and r.index == 0 and not r.forks and not r.output_token_ids:
                    for index in range(1, r.params.n):  # each samples from the prompt's logits too
                        self.scheduler.fork(r, index, r.num_computed + len(batch.token_ids[i]))
                        batch.requests.append(r.forks[-1])
                        batch.token_ids.append([])
                        batch.samples.append(True)
                        sampling.append(len(batch.requests) - 1)
                        rows.append(row)
            logits = logits[rows] if len(rows) > logits.shape[0] else logits
            tokens = sample(logits, [batch.requests[i] for i in sampling])
            asked = {i: logprobs_of(logits[row], tokens[row], batch.requests[i].params.logprobs or 0)
                     for row, i in enumerate(sampling) if batch.requests[i].params.logprobs is not None}
            self.scheduler.advance(batch, dict(zip(sampling, tokens, strict=True)), self.eos_token_id, asked)
        changed = []
        for r in list(self._requests.values()):
            completions = [r, *r.forks]
            if _done(r) or any(len(c.output_token_ids) > c.reported for c in completions):
                changed.append(self._output(r, new=True))
                for c in completions:
                    c.reported = len(c.output_token_ids)
                if changed[-1].finished:
                    del self._requests[r.request_id]
        return changed

    def _output(self, r: Request, new: bool = False) -> RequestOutput:
        completions = [r, *r.forks]
        outputs = []
        for c in completions:
            text = self.tokenizer.decode(c.output_token_ids, skip_special_tokens=True) if self.tokenizer else None
            outputs.append(CompletionOutput(c.index, list(c.output_token_ids), text, c.finish_reason, c.error,
                                            list(c.logprobs) if c.params.logprobs is not None else None,
                                            list(c.output_token_ids[c.reported:]) if new else []))
        ttft = None if r.first_token_time is None else r.first_token_time - r.arrival
        return RequestOutput(r.request_id, r.prompt, list(r.prompt_token_ids), outputs, _done(r),
                             r.num_cached_tokens or 0, ttft)

    def stream(self, request_id: str) -> Iterator[int]:
        """The tokens of one request (its first completion) as they come, running steps (of every
        request) as needed."""
        r = self._requests.get(request_id)
        if r is None:
            raise ArgumentError(f"no request {request_id!r} (finished requests are forgotten by step())")
        given = 0
        while True:
            while given < len(r.output_token_ids):
                yield r.output_token_ids[given]
                given += 1
            if r.finished:
                return
            self.step()

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to its end as one continuous batch; one output per prompt, in order.

        ``prompts``: a str or token ids, or a list of them. ``params``: one for all, or one per
        prompt. A prompt that cannot run here gets ``finish_reason == "error"``; the others run.
        """
        single = isinstance(prompts, str) or (isinstance(prompts, Sequence) and bool(prompts)
                                              and isinstance(prompts[0], int))
        batch: list[Any] = [prompts] if single else list(prompts)
        if isinstance(params, Sequence):
            if len(params) != len(batch):
                raise ArgumentError(f"{len(params)} SamplingParams for {len(batch)} prompts")
            per = list(params)
        else:
            per = [params or SamplingParams()] * len(batch)
        ids = [self.add_request(None, p, sp) for p, sp in zip(batch, per, strict=True)]
        requests = [self._requests[i] for i in ids]
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="requests", unit="req")
        start = time.perf_counter()
        try:
            while not all(map(_done, requests)):
                self.step()
                if bar is not None:
                    done = sum(map(_done, requests))
                    bar.update(done - bar.n)
        finally:
            if bar is not None:
                bar.close()
        self.last_run_seconds = time.perf_counter() - start
        for r in requests:
            self._requests.pop(r.request_id, None)
        return [self._output(r) for r in requests]


def _done(r: Request) -> bool:
    """Whether every completion of request ``r`` is over (its forks exist from its first token
    on, and one that never got there has none to wait for)."""
    return r.finished and all(c.finished for c in r.forks)
