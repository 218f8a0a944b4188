"""asv: ``model.generate`` on the CPU with pagedkv's PagedCache against transformers' default
cache, on the same model in the same run.

The model is a randomly initialised Llama big enough for attention to matter (4 layers, hidden
512, 8 query heads, 2 KV heads, float32), its PagedCache run with ``attn_implementation="pagedkv"``
(pagedkv's kernels over the pool) or ``"sdpa"`` (the model's own, over gathered copies), the
default cache with ``sdpa``; a batch of 8 prompts of unequal
lengths (the given length and down to 3/4 of it, left-padded as a tokenizer would) generates
32 tokens greedily. Decode tokens per second are timed between the first and the last new
token (a streamer notes when each arrives), so the prefill, the same for both caches, is left
out. KV bytes: the pool's blocks in use against the default cache's key and value tensors.
Needs the ``hf`` extra (transformers and torch); asv skips it without them.

    python -c "from benchmarks.bench_transformers import measure; print(measure(2000, 'pagedkv'))"
"""

from __future__ import annotations

import time

import numpy as np

BATCH, NEW_TOKENS, REPEAT = 8, 32, 5


def _model():
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                                      attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).eval()


def _inputs(context: int):
    """``BATCH`` prompts of ``context`` down to 3/4 of it tokens, left-padded with their mask."""
    import torch

    rng = np.random.default_rng(0)
    lengths = np.linspace(context, max(1, context * 3 // 4), BATCH).astype(int)
    ids = torch.zeros((BATCH, context), dtype=torch.long)
    mask = torch.zeros((BATCH, context), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, context - n:] = torch.from_numpy(rng.integers(3, 1024, n))
        mask[row, context - n:] = 1
    return ids, mask


class _Clock:
    """A generate streamer that notes the time each step's tokens arrive (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _decode_seconds(model, ids, mask, cache) -> float:
    """Seconds of the decode steps of one greedy generate (after the first new token)."""
    import torch

    clock = _Clock()
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=NEW_TOKENS, do_sample=False,
                       min_new_tokens=NEW_TOKENS, streamer=clock, pad_token_id=0)
    return clock.times[-1] - clock.times[1]  # times[0]: the prompt; times[1]: the first new token


def measure(context: int, attention: str = "pagedkv") -> dict[str, float]:
    """Decode tokens/s of a PagedCache (with ``attention``: ``"pagedkv"``, its kernels over the
    pool, or ``"sdpa"``, the model's own over gathered copies) and of transformers' default cache
    with sdpa, at prompts of ``context`` tokens (medians of ``REPEAT`` runs, interleaved), their
    ratio, and both caches' KV bytes."""
    import transformers

    from pagedkv.integrations.hf_attention import register
    from pagedkv.integrations.transformers import PagedCache

    register()
    model, (ids, mask) = _model(), _inputs(context)
    tokens = BATCH * (NEW_TOKENS - 1)
    max_tokens = BATCH * (context + NEW_TOKENS)
    paged, default = [], []
    for _ in range(REPEAT):
        model.set_attn_implementation(attention)
        cache = PagedCache(model.config, max_tokens=max_tokens)
        paged.append(_decode_seconds(model, ids, mask, cache))
        model.set_attn_implementation("sdpa")
        dynamic = transformers.DynamicCache(config=model.config)
        default.append(_decode_seconds(model, ids, mask, dynamic))
    memory = cache.memory()
    dense = sum(layer.keys.nbytes + layer.values.nbytes for layer in dynamic.layers)
    t_paged, t_default = float(np.median(paged)), float(np.median(default))
    return {"paged_tokens_per_s": tokens / t_paged, "default_tokens_per_s": tokens / t_default,
            "vs_default": t_default / t_paged, "paged_kv_bytes": memory["used_bytes"], "default_kv_bytes": dense}


class Generate:
    """Decode tokens/s of ``generate`` with a PagedCache over the default cache's (targets:
    >= 1.0x at short context, >= 1.3x at 2k tokens) and KV bytes against the default cache's."""

    params = ([128, 2000], ["pagedkv", "sdpa"])
    param_names = ["context", "attention"]
    number = 1
    repeat = 1
    timeout = 900

    def setup(self, context, attention):
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            raise NotImplementedError("needs the hf extra (transformers and torch)") from e
        self.m = measure(context, attention)

    def track_tokens_per_second_vs_default(self, context, attention):
        return self.m["vs_default"]

    track_tokens_per_second_vs_default.unit = "x transformers' default cache"

    def track_kv_bytes_vs_default(self, context, attention):
        return self.m["paged_kv_bytes"] / self.m["default_kv_bytes"]

    track_kv_bytes_vs_default.unit = "x the default cache's KV bytes"
