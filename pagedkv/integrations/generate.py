"""``pagedkv generate``: text from a local transformers checkpoint, with pagedkv as its KV cache.

Needs the ``hf`` extra. The checkpoint is a directory holding a causal language
model and its tokenizer (``save_pretrained`` writes one; a hub id works where the
machine has network). Prompts run one after another on one pool, so a prefix
they share (a system prompt, say) is computed once and then found in the
prefix cache.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import transformers

from ..errors import ConfigError
from ..memory.pool import human_bytes
from .hf_attention import register
from .transformers import ATTENTION, PagedCache

#: files of which a checkpoint directory must hold one for AutoTokenizer to load its tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load(model_path: str, dtype: torch.dtype | None = None, *, tokenizer: bool = True) -> tuple[Any, Any]:
    """The tokenizer (None with ``tokenizer=False``) and the model (in eval mode, in ``dtype`` if
    given, else the checkpoint's) of a checkpoint directory or hub id. Raises ConfigError saying
    what is missing: no such directory, no tokenizer or no model in it, or a checkpoint
    transformers cannot read."""
    local = os.path.isabs(model_path) or model_path.startswith((".", "~")) or os.path.exists(model_path) \
        or model_path.count("/") != 1  # a hub id is "owner/name"
    if local:
        if not os.path.isdir(model_path):
            raise ConfigError(f"no checkpoint directory at {model_path!r}")
        if tokenizer and not any(os.path.exists(os.path.join(model_path, f)) for f in TOKENIZER_FILES):
            raise ConfigError(f"{model_path!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
                              "save one beside the model with tokenizer.save_pretrained(DIR)")
        if not os.path.exists(os.path.join(model_path, "config.json")):
            raise ConfigError(f"{model_path!r} holds no model (config.json): save one with model.save_pretrained(DIR)")
    loaded = None
    try:
        if tokenizer:
            loaded = transformers.AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"cannot load a tokenizer from {model_path!r}: {_first_line(e)}") from e
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path, **({"dtype": dtype} if dtype else {}))
        model = model.eval()
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"cannot load a causal language model from {model_path!r}: {_first_line(e)}") from e
    return loaded, model


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def generate(model_path: str, prompts: list[str], *, max_new_tokens: int = 32, dtype: str | None = None,
             num_beams: int = 1, block_size: int = 16, attention: str | None = None) -> dict[str, float]:
    """Generate a continuation of each prompt (greedy, or beam search), printing it (streamed
    as it comes, without beams); returns the run's totals, also printed. ``attention``:
    ``"pagedkv"`` runs pagedkv's kernels over the pool as the model's attention
    (:mod:`.hf_attention`); by default the model's own attention reads gathered K/V."""
    if not prompts or any(not p.strip() for p in prompts):
        raise ConfigError("every prompt must hold some text; got an empty one")
    tokenizer, model = load(model_path)
    if attention is not None:
        if attention == ATTENTION:
            register()
        model.set_attn_implementation(attention)
    cache: PagedCache | None = None
    new_tokens = cached = peak_used = peak_dense = 0
    start = time.perf_counter()
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        if cache is None:
            cache = PagedCache(model.config, block_size=block_size, dtype=dtype, prompt_ids=ids,
                               max_tokens=max(8192, 4 * num_beams * (ids.shape[1] + max_new_tokens)))
        else:
            cache.reset()  # the last prompt's blocks go back; its prompt's full blocks stay cached
            cache = cache.new_cache(ids)
        print(f"> {prompt}")
        streamer = None if num_beams > 1 else transformers.TextStreamer(tokenizer, skip_prompt=True,
                                                                        skip_special_tokens=True)
        with torch.no_grad():
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache,
                                    max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                    streamer=streamer, pad_token_id=tokenizer.pad_token_id or 0)
        if streamer is None:
            print(tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True))
        new_tokens += int(output.shape[1] - ids.shape[1])
        cached += cache.cached_tokens
        memory = cache.memory()
        peak_used, peak_dense = max(peak_used, memory["used_bytes"]), max(peak_dense, memory["dense_bytes"])
    seconds = time.perf_counter() - start
    assert cache is not None and cache.kv is not None
    stats = cache.kv.stats()
    print(f"{new_tokens} new tokens in {seconds:.2f} s ({new_tokens / seconds:.1f} tokens/s, model load excluded, "
          f"attention: {attention or getattr(model.config, '_attn_implementation', None) or 'default'}); "
          f"KV cache ({cache.kv.config.dtype}): {human_bytes(peak_used)} in use at most, a dense cache "
          f"{human_bytes(peak_dense)}; prefix cache: {cached} prompt tokens not computed "
          f"({int(stats['prefix_hits'])} block hits)")
    return {"new_tokens": new_tokens, "seconds": seconds, "used_bytes": peak_used, "dense_bytes": peak_dense,
            "cached_tokens": cached}
