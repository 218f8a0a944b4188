"""``pagedkv generate`` on the engine: every prompt of a file as one continuous batch.

Greedy continuations of each prompt, printed in order once the batch is done (one prompt: its
tokens streamed as they come), then the run's totals: new tokens per second, the KV pool's
peak use against the padded dense cache that one batched ``generate`` call would hold, and
the prompt tokens the prefix cache served.
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import ConfigError
from ..memory.pool import human_bytes
from .llm import LLM
from .params import SamplingParams


def generate(model_path: str, prompts: list[str], *, max_new_tokens: int = 32, kv_dtype: str | None = None,
             block_size: int = 16, kv_cache_bytes: int | None = None, max_num_seqs: int = 64,
             explain: bool = False) -> dict[str, Any]:
    """Run ``prompts`` through :class:`~.llm.LLM` on the checkpoint at ``model_path``; print each
    continuation and the totals; return the totals. ``explain``: first print, for each prompt
    as it is added, where each block of its K/V will come from or why not (:mod:`pagedkv.explain`)."""
    if not prompts or any(not p.strip() for p in prompts):
        raise ConfigError("every prompt must hold some text; got an empty one")
    llm = LLM(model_path, kv_dtype=kv_dtype, block_size=block_size, kv_cache_bytes=kv_cache_bytes,
              max_num_seqs=max_num_seqs, max_num_batched_tokens=max(2048, max_num_seqs))
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0)
    ids = []
    for p in prompts:
        if explain:
            print(f"> {p}\n{llm.explain_prefix(p)}")
        ids.append(llm.add_request(None, p, params))
    c = llm.cache.config
    per_block = c.memory_bytes // c.num_blocks
    finished: dict[str, Any] = {}
    peak_blocks = 0
    start = time.perf_counter()
    if len(prompts) == 1:
        print(f"> {prompts[0]}")
    while llm.has_unfinished_requests():
        for out in llm.step():
            if len(prompts) == 1 and out.new_token_ids and llm.tokenizer is not None:
                print(llm.tokenizer.decode(out.new_token_ids, skip_special_tokens=True), end=" ", flush=True)
            if out.finished:
                finished[out.request_id] = out
        peak_blocks = max(peak_blocks, int(llm.cache.stats()["blocks_used"]))
    seconds = time.perf_counter() - start
    if len(prompts) == 1:
        print()
    for prompt, rid in zip(prompts, ids, strict=True):
        out = finished[rid].outputs[0]
        if len(prompts) > 1:
            print(f"> {prompt}")
            print(out.text)
        if out.finish_reason == "error":
            print(f"(not run: {out.error})")
    new_tokens = sum(len(out.outputs[0].token_ids) for out in finished.values())
    cached = sum(out.num_cached_tokens for out in finished.values())
    longest = max(len(out.prompt_token_ids) + len(out.outputs[0].token_ids) for out in finished.values())
    dense = len(prompts) * longest * c.bytes_per_token  # one padded batch, every row as long as the longest
    used = peak_blocks * per_block
    why = (f" (whole blocks of {c.block_size} tokens: short sequences leave most of their last block empty)"
           if used > dense else "")
    print(f"{new_tokens} new tokens in {seconds:.2f} s ({new_tokens / seconds:.1f} tokens/s; model load and "
          f"{llm.warmup_seconds:.1f} s of compiling or loading the kernels excluded, "
          f"{len(prompts)} prompts in one continuous batch); KV cache ({c.dtype}): "
          f"{human_bytes(used)} in use at most, a dense cache {human_bytes(dense)}{why}; "
          f"prefix cache: {cached} prompt tokens not computed; {llm.scheduler.num_preemptions} preemptions")
    return {"new_tokens": new_tokens, "seconds": seconds, "used_bytes": used, "dense_bytes": dense,
            "cached_tokens": cached}
