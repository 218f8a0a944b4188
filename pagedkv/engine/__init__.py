"""The inference engine: many requests over one paged pool (:class:`~.llm.LLM`).

- :mod:`.params`: :class:`SamplingParams` and the outputs (plain Python);
- :mod:`.scheduler`: which tokens of which requests run in each step: admission, chunked
  prefill, prefix reuse, preemption (plain Python over a :class:`~pagedkv.PagedKVCache`);
- :mod:`.runner`: one packed forward pass of a transformers model per step, its attention
  running pagedkv's kernels over the pool;
- :mod:`.sampler`: the next token of each request;
- :mod:`.llm`: :class:`LLM`, the offline and streaming API.

``pagedkv.LLM`` and ``pagedkv.SamplingParams`` name them; the runner and ``LLM`` need the
``hf`` extra, imported only when used. Imports anything below it but the tools.
"""

from __future__ import annotations

from typing import Any

from .params import CompletionOutput, RequestOutput, SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":  # torch and transformers: imported when first asked for
        from .llm import LLM

        return LLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
