"""What a decode step's calls cost beyond their kernels: numba, B=64 sequences.

Each routine of one decode step (``write``, ``write_step``, ``attention_step`` and the
one-shot ``paged_attention``, 64 sequences, Hq=32, H=8, D=128, block_size=16, blocks in
random order) is timed beside its bare numba kernel on the same, already-checked arguments,
in one process, interleaved; the ratio (call over kernel) is what validation, the plan's
checks and the Python around the kernel add. Run from the repository root::

    python -m benchmarks.decode_calls
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pagedkv import CacheConfig, KVPool
from pagedkv.tools.bench import BLOCK_SIZE, D, H, Workload, median_seconds

from .harness import bare_kernel

BATCH, Q_HEADS = 64, 32
CALLS = ("write", "write_step", "attention_step", "paged_attention")


def decode_calls(layout: str = "NHD", context: int = 16, seed: int = 0) -> dict[str, tuple[Callable, Callable]]:
    """``{call: (whole call, bare kernel)}`` for one layer of a decode step of ``BATCH``
    sequences of ``context`` tokens each (the last token of each is the one written)."""
    from pagedkv.backends import numba as nb

    rng = np.random.default_rng(seed)
    per_seq = -(-context // BLOCK_SIZE)
    num_blocks = BATCH * per_seq
    pool = KVPool(CacheConfig(num_layers=1, num_blocks=num_blocks, block_size=BLOCK_SIZE, num_kv_heads=H,
                              head_dim=D, layout=layout))
    pool.data[:] = rng.standard_normal(pool.data.size, dtype=np.float32)
    tables = rng.permutation(num_blocks).astype(np.int32).reshape(BATCH, per_seq)
    lens = np.full(BATCH, context, np.int32)
    last = context - 1
    slots = tables[:, last // BLOCK_SIZE].astype(np.int64) * BLOCK_SIZE + last % BLOCK_SIZE
    key = rng.standard_normal((BATCH, H, D), dtype=np.float32)
    value = rng.standard_normal((BATCH, H, D), dtype=np.float32)
    q = rng.standard_normal((BATCH, Q_HEADS, D), dtype=np.float32)
    plan = nb.plan(pool, slot_mapping=slots, block_tables=tables, context_lens=lens)
    a, s, fmt = plan.attention, pool.strides, nb._format_args(pool, 0)
    out = np.empty_like(q)
    heads_per_task = nb.decode_heads_per_task(pool)
    scale, no_cap = np.float32(1 / np.sqrt(D)), np.float32(0)
    none = np.empty(0, np.int64)
    write_kernel = bare_kernel(Workload(pool.config, pool, key, value, slots, tables, lens, none, none), "write")

    def attention_kernel() -> None:
        nb.decode_attention_kernel(pool.data, 0, q, a.kernel_tables, a.kernel_row_seq, a.kernel_row_pos, out, 0,
                                   scale, no_cap, heads_per_task, s, *fmt)

    return {
        "write": (lambda: nb.write(pool, 0, key, value, slots), write_kernel),
        "write_step": (lambda: nb.write_step(pool, 0, key, value, plan), write_kernel),
        "attention_step": (lambda: nb.attention_step(q, pool, 0, plan), attention_kernel),
        "paged_attention": (lambda: nb.paged_attention(q, pool, 0, tables, lens), attention_kernel),
    }


def call_over_kernel(call: str, layout: str = "NHD", context: int = 16, rounds: int = 5) -> float:
    """Median over ``rounds`` interleaved rounds of (whole call / bare kernel), each a median time."""
    whole, kernel = decode_calls(layout, context)[call]
    ratios = [median_seconds(whole) / median_seconds(kernel) for _ in range(rounds)]
    return float(np.median(ratios))


def report(layouts=("NHD", "HND"), contexts=(16, 256)) -> str:
    """A markdown table of :func:`call_over_kernel` for every call, layout and context."""
    lines = ["| layout | context | " + " | ".join(CALLS) + " |", "| --- | ---: |" + " ---: |" * len(CALLS)]
    for layout in layouts:
        for context in contexts:
            cells = " | ".join(f"{call_over_kernel(c, layout, context):.2f}" for c in CALLS)
            lines.append(f"| {layout} | {context} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
