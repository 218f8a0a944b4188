"""``pagedkv demo``: continuous batching of a small model over a paged KV cache.

Requests share a system prompt, have prompts and answers of different
lengths, and arrive over time. Each step, newly admitted requests prefill
their prompt (minus what the prefix cache already holds) in the same batch
as the running requests' decode tokens. At the end: throughput, prefix-cache
hits, memory used against a contiguous max-length preallocation (the saving
the vLLM paper is about), a map of the pool, and a check that every request
generated exactly the tokens the same model gives with a plain contiguous cache.

``model="gemma-like"`` alternates sliding-window and full-attention layers (as Gemma 2
does): the cache gets two layer groups, the sliding one frees the blocks that leave
its window, and the summary shows the KV memory with and without that freeing.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ..cache import PagedKVCache, warmup
from ..errors import PagedKVError
from ..geometry.layout import cdiv, window_start_block
from ..memory.pool import human_bytes
from ..offload.stores import open_store
from .model import DenseCache, ModelConfig, TinyLlama, generate_dense, paged_step


@dataclass
class Request:
    rid: int
    prompt: list[int]
    max_new_tokens: int
    arrival: int
    seq_id: object = None
    cached: int = 0
    output: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)


@dataclass
class DemoResult:
    requests: list[Request]
    steps: int
    seconds: float
    tokens_generated: int
    prompt_tokens: int
    cached_prompt_tokens: int
    used_blocks: list[int]  # per step
    contiguous_blocks: list[int]  # per step: running requests x blocks of a max-length sequence
    peak_map: str
    agree: bool | None
    max_logit_diff: float | None
    stats: dict
    dtype: str = "float32"
    pool_bytes: int = 0
    float32_bytes: int = 0
    vs_float32: tuple[int, float] | None = None  # requests with float32's tokens; largest logit difference
    tiers: dict | None = None  # with a store: prompt tokens served per tier, and the store's counts
    model: str = "llama"
    window_peaks: tuple[int, int] | None = None  # gemma-like: peak blocks with and without window freeing
    bytes_per_block: int = 0
    compile_seconds: float = 0.0  # compiling (or loading) the kernels, before the clock started


MODELS = ("llama", "gemma-like")
GEMMA_WINDOW = 16  # the sliding layers' window: one block of 16


def model_config(model: str, seed: int) -> ModelConfig:
    """The demo's model: ``"llama"`` (two full-attention layers) or ``"gemma-like"`` (four layers,
    the even ones with a sliding window of :data:`GEMMA_WINDOW`)."""
    if model == "llama":
        return ModelConfig(seed=seed)
    if model == "gemma-like":
        return ModelConfig(seed=seed, num_layers=4, sliding_window=GEMMA_WINDOW)
    raise PagedKVError(f"model must be one of {MODELS}, got {model!r}")


def make_requests(n: int, seed: int, vocab: int) -> list[Request]:
    rng = np.random.default_rng(seed)
    system = rng.integers(0, vocab, 48).tolist()  # the shared system prompt: three blocks of 16
    out = []
    for i in range(n):
        user = rng.integers(0, vocab, int(rng.integers(4, 40))).tolist()
        out.append(Request(i, system + user, int(rng.integers(8, 40)), int(rng.integers(0, 3 * n))))
    return sorted(out, key=lambda r: r.arrival)


def run_demo(num_requests: int = 32, seed: int = 0, backend: str = "auto", num_blocks: int = 96,
             check: bool = True, progress=sys.stderr, dtype: str = "float32", store: str | None = None,
             model_name: str = "llama") -> DemoResult:
    """Serve ``num_requests`` requests with continuous batching; see the module docstring.

    With a ``dtype`` other than float32, ``check`` compares with the same workload
    over a float32 pool instead of a dense cache (a narrower format rounds K/V, so
    tokens may rightly differ): how many requests generate the same tokens, and the
    largest logit difference up to each request's first differing token.

    ``store`` (a directory, or ``redis://HOST:PORT``) backs the prefix cache with a
    :mod:`pagedkv.offload.stores` tier shared with other runs and processes: a second run finds
    the system prompt's blocks there (see the summary's tokens per tier).
    """
    model = TinyLlama(model_config(model_name, seed))
    config = model.cache_config(num_blocks, dtype=dtype)
    stores = [] if store is None else [open_store(store, f"pagedkv-demo-seed{seed}-{dtype}")]
    compile_seconds = warmup([config.dtype] + (["float32"] if check and config.dtype != "float32" else []),
                             backend=backend)  # before the clock: the throughput is the kernels', not the compiler's
    cache = PagedKVCache(config, backend=backend, stores=stores, model_id=f"pagedkv demo {model_name} seed {seed}")
    bs = cache.config.block_size
    requests = make_requests(num_requests, seed, model.config.vocab_size)
    max_len = max(len(r.prompt) + r.max_new_tokens for r in requests)
    waiting = list(requests)
    running: list[Request] = []
    done: list[Request] = []
    used: list[int] = []
    contiguous: list[int] = []
    peak, peak_map = -1, ""
    with_freeing, without = 0, 0  # layer groups: peak blocks held, and as many if sliding layers kept all
    step, start = 0, time.perf_counter()
    while waiting or running:
        # Admit arrived requests while the pool can hold every admitted request's final
        # length: decode steps then never run out of blocks (no preemption needed).
        admitted: list[Request] = []
        while waiting and waiting[0].arrival <= step:
            r = waiting[0]
            seq, cached = cache.add_sequence(prompt_token_ids=r.prompt)
            r.seq_id, r.cached = seq, cached
            growth = sum(_growth(cache, x) for x in running + admitted)
            need = _growth(cache, r)
            if growth + need > cache.manager.block_pool.num_free:
                cache.free(seq)
                if not running and not admitted:  # it would not fit even alone
                    raise PagedKVError(
                        f"request {r.rid} needs {need} blocks; the pool has {cache.config.num_blocks} "
                        "(use more --blocks)")
                r.seq_id = None
                break
            admitted.append(waiting.pop(0))
        batch = running + admitted
        if not batch:
            step += 1
            continue
        new = [[r.output[-1]] for r in running] + [r.prompt[r.cached:] for r in admitted]
        logits = paged_step(model, cache, [r.seq_id for r in batch], new)
        running = []
        for r, row in zip(batch, logits, strict=True):
            r.logits.append(row)
            r.output.append(int(np.argmax(row)))
            (done if len(r.output) == r.max_new_tokens else running).append(r)
        used.append(cache.manager.block_pool.num_used)
        if len(cache.managers) > 1:
            held = [m.blocks_held() for m in cache.managers]
            with_freeing, without = max(with_freeing, sum(held)), max(without, len(held) * held[-1])
        contiguous.append(len(batch) * cdiv(max_len, bs))
        if used[-1] > peak:
            peak, peak_map = used[-1], pool_map(cache, {r.seq_id: r.rid for r in batch})
        for r in done:
            if r.seq_id is not None:
                cache.free(r.seq_id)  # its full prompt blocks stay in the prefix cache
                r.seq_id = None
        step += 1
        _progress(progress, len(done), num_requests)
    cache.end_step()  # the last step's K/V are written: its cached blocks reach the store
    seconds = time.perf_counter() - start
    if progress is not None and progress.isatty():
        progress.write("\n")
    agree, diff, vs_float32 = None, None, None
    if check and config.dtype == "float32":
        agree, diff = True, 0.0
        for r in requests:
            tokens, logits = generate_dense(model, r.prompt, r.max_new_tokens)
            agree &= tokens == r.output
            diff = max(diff, float(np.abs(logits - np.array(r.logits)).max()))
    elif check:
        wide = run_demo(num_requests, seed, backend, num_blocks, check=False, progress=None, model_name=model_name)
        vs_float32 = _compare(requests, wide.requests)
    float32_bytes = model.cache_config(num_blocks).memory_bytes
    peaks = (with_freeing, without) if len(cache.managers) > 1 else None
    return DemoResult(requests, step, seconds, sum(len(r.output) for r in requests),
                      sum(len(r.prompt) for r in requests), sum(r.cached for r in requests),
                      used, contiguous, peak_map, agree, diff, cache.stats(), config.dtype,
                      config.memory_bytes, float32_bytes, vs_float32, cache.stats().get("tiers"), model_name,
                      peaks, config.bytes_per_block, compile_seconds)


def _compare(narrow: list[Request], wide: list[Request]) -> tuple[int, float]:
    """Requests whose tokens equal the float32 run's, and the largest logit difference up to
    each request's first differing token (past it the two runs see different inputs)."""
    same, diff = 0, 0.0
    for a, b in zip(sorted(narrow, key=lambda r: r.rid), sorted(wide, key=lambda r: r.rid), strict=True):
        same += a.output == b.output
        for step, (x, y) in enumerate(zip(a.logits, b.logits, strict=True)):
            diff = max(diff, float(np.abs(x - y).max()))
            if a.output[step] != b.output[step]:
                break
    return same, diff


def _growth(cache: PagedKVCache, r: Request) -> int:
    """Blocks request ``r`` may still take, over every layer group, until it finishes: a
    sliding group holds at most its prompt's blocks from the window of its first computed
    token, and later a window's worth plus the block being filled."""
    bs, total = cache.config.block_size, 0
    for m in cache.managers:
        most, window = _final_blocks(r, bs), m.sliding_window
        if window is not None:
            prefill = cdiv(len(r.prompt), bs) - window_start_block(r.cached, window, bs)
            most = min(most, max(prefill, cdiv(window, bs) + 1))
        total += max(0, most - sum(b >= 0 for b in m.block_table(r.seq_id)))
    return total


def _final_blocks(r: Request, block_size: int) -> int:
    """Blocks request ``r`` holds when done (its last token's K/V is never written)."""
    return cdiv(len(r.prompt) + r.max_new_tokens - 1, block_size)


def _progress(stream, done: int, total: int) -> None:
    if stream is None or not stream.isatty():  # a bar only where someone watches it
        return
    width = 30
    filled = width * done // total
    stream.write(f"\r  serving [{'#' * filled}{'.' * (width - filled)}] {done}/{total} requests")
    stream.flush()


def pool_map(cache: PagedKVCache, names: dict) -> str:
    """One character a block: ``.`` free, ``~`` cached but idle, a letter for the request
    holding it (upper case), ``*`` shared by several."""
    blocks = cache.manager.block_pool
    cells = ["."] * blocks.num_blocks
    holders: dict[int, set] = {}
    for m in cache.managers:  # layer groups hold blocks apart; -1: freed out of a sliding window
        for seq_id in m.seq_ids:
            for b in m.block_table(seq_id):
                if b >= 0:
                    holders.setdefault(b, set()).add(seq_id)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    for b in range(blocks.num_blocks):
        if blocks.is_idle(b):
            cells[b] = "~"
        elif b in holders:
            hs = holders[b]
            cells[b] = "*" if len(hs) > 1 else letters[names.get(next(iter(hs)), 0) % len(letters)]
    return "\n".join("  " + "".join(cells[i:i + 48]) for i in range(0, len(cells), 48))


def format_summary(res: DemoResult, backend: str) -> str:
    peak_used, peak_contig = max(res.used_blocks), max(res.contiguous_blocks)
    rows = [
        ("backend", backend),
        ("requests", f"{len(res.requests)} ({res.steps} batched steps)"),
        ("tokens generated", f"{res.tokens_generated}"),
        ("throughput", f"{res.tokens_generated / res.seconds:.0f} tokens/s ({res.seconds:.1f} s; compiling or "
                       f"loading the kernels before: {res.compile_seconds:.1f} s)"),
        ("prompt tokens from the prefix cache",
         f"{res.cached_prompt_tokens} of {res.prompt_tokens} ({res.cached_prompt_tokens / res.prompt_tokens:.0%}); "
         f"block hit rate {res.stats['prefix_hit_rate']:.0%}"),
        ("peak blocks in use (paged)", f"{peak_used}"),
        ("peak blocks, contiguous max-length", f"{peak_contig}"),
        ("memory saved at the peak", f"{1 - peak_used / peak_contig:.0%}"),
    ]
    if res.window_peaks is not None:
        freeing, kept = res.window_peaks
        rows.append(("KV memory at the peak, all layers",
                     f"{human_bytes(freeing * res.bytes_per_block)} with sliding layers freeing what leaves "
                     f"their window of {GEMMA_WINDOW}, {human_bytes(kept * res.bytes_per_block)} keeping it "
                     f"({1 - freeing / kept:.0%} saved; {freeing} blocks against {kept})"))
    if res.tiers is not None:
        rows.append(("prompt tokens by tier", ", ".join(f"{k} {v}" for k, v in res.tiers["tokens"].items())))
    if res.agree is not None:
        rows.append(("paged == dense generation",
                     f"{'yes' if res.agree else 'NO'} (largest logit difference {res.max_logit_diff:.1e})"))
    if res.dtype != "float32":
        share = res.pool_bytes / res.float32_bytes
        rows.append(("pool memory", f"{human_bytes(res.pool_bytes)} in {res.dtype}, {share:.0%} of float32's "
                                    f"{human_bytes(res.float32_bytes)}"))
    if res.vs_float32 is not None:
        same, diff = res.vs_float32
        rows.append((f"{res.dtype} against float32", f"{same} of {len(res.requests)} requests generate the same "
                                                     f"tokens; largest logit difference {diff:.1e}"))
    width = max(len(k) for k, _ in rows)
    lines = ["", "summary", "-------"] + [f"  {k:<{width}}  {v}" for k, v in rows]
    lines += ["", "pool at the peak (. free, ~ cached and idle, * shared, letters: requests)", res.peak_map]
    return "\n".join(lines)


def plot(res: DemoResult, path: str) -> None:
    """Memory in use over time, paged against contiguous preallocation (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PagedKVError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(res.contiguous_blocks, label="contiguous, max length per request")
    ax.plot(res.used_blocks, label="paged (pagedkv)")
    ax.set_xlabel("step")
    ax.set_ylabel("KV blocks in use")
    ax.set_title("KV cache memory during continuous batching")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["run_demo", "format_summary", "plot", "pool_map", "DenseCache"]
