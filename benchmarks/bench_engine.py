"""asv: ``pagedkv.LLM`` against transformers' ``generate`` on the same model in the same run.

The workload of :mod:`benchmarks.engine` (its model, its prompts), cut to 8 prompts and 16 new
tokens so that asv's run stays short: one continuous batch over one pool against one padded
``generate`` with the default cache, greedy, output tokens per second, the median of
``REPEAT`` rounds taken in turns. ``python -m benchmarks.engine`` runs the whole workload with
vLLM beside them. Needs the ``hf`` extra; asv skips it without.
"""

from __future__ import annotations

import statistics
import tempfile

PROMPTS, NEW_TOKENS, REPEAT = 8, 16, 3


def measure(dtype: str = "float32", prepack_weights: bool = False) -> dict[str, float]:
    """Output tokens/s of pagedkv.LLM and of transformers' generate, and their ratio."""
    import torch
    import transformers

    from pagedkv import LLM

    from .engine import build_model, prompts, run_pagedkv, run_transformers

    path = tempfile.mkdtemp(prefix="pagedkv-bench-engine-")
    build_model(path, dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    llm = LLM(path, dtype=dtype, kv_cache_bytes=256 << 20, skip_tokenizer_init=True, prepack_weights=prepack_weights)
    work = prompts()[:PROMPTS]
    run_pagedkv(llm, work[:2], 2)  # warm-up: numba's kernels, torch's first calls
    run_transformers(model, work[:2], 2)
    ours, theirs = [], []
    for _ in range(REPEAT):
        llm.cache.reset()
        ours.append(run_pagedkv(llm, work, NEW_TOKENS)[0])
        theirs.append(run_transformers(model, work, NEW_TOKENS))
    tokens = PROMPTS * NEW_TOKENS
    t_ours, t_theirs = statistics.median(ours), statistics.median(theirs)
    return {"tokens_per_s": tokens / t_ours, "transformers_tokens_per_s": tokens / t_theirs,
            "vs_transformers": t_theirs / t_ours}


class Engine:
    """Output tokens/s of pagedkv.LLM over transformers' generate (docs/performance.md's table has the
    whole workload and vLLM)."""

    params = (["float32", "bfloat16"], [False, True])
    param_names = ["dtype", "prepack_weights"]
    number = 1
    repeat = 1
    timeout = 900

    def setup(self, dtype, prepack_weights):
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            raise NotImplementedError("needs the hf extra (transformers and torch)") from e
        self.m = measure(dtype, prepack_weights)

    def track_tokens_per_second_vs_transformers(self, dtype, prepack_weights):
        return self.m["vs_transformers"]

    track_tokens_per_second_vs_transformers.unit = "x transformers' generate"
