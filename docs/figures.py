"""The documentation's pictures, drawn by pagedkv itself when the site is built (``docs/hooks.py``),
so that they cannot drift from the code: every block table, reference count and curve below
comes from a real :class:`pagedkv.BlockManager` or a real demo run."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

import pagedkv  # noqa: E402
from pagedkv.tools.demo import plot, run_demo  # noqa: E402

COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3"]


def _tables(ax, m: pagedkv.BlockManager, seqs: dict[str, object], title: str) -> None:
    """Each sequence's logical blocks (left) pointing at the pool's physical blocks (right), with
    each block's reference count, as the manager holds them now."""
    pool = m.block_pool
    n = pool.num_blocks
    bs = m.block_size
    ax.set_xlim(-0.5, 9.5)
    ax.set_ylim(-0.8, max(n, 3 * len(seqs)) + 0.6)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    for b in range(n):
        y = n - 1 - b
        refs = pool.ref_count(b)
        ax.add_patch(Rectangle((6.2, y), 2.6, 0.8, facecolor="#eeeeee" if refs == 0 else "#cfe3f7",
                               edgecolor="black", lw=0.8))
        ax.text(7.5, y + 0.4, f"block {b}" + (f"  refs {refs}" if refs else "  free"), ha="center", va="center",
                fontsize=7)
    ax.text(7.5, n + 0.1, "pool (physical blocks)", ha="center", fontsize=8)
    row = max(n, 3 * len(seqs)) - 1
    for k, (name, seq) in enumerate(seqs.items()):
        table = m.block_table(seq)
        length = m.context_len(seq)
        ax.text(-0.4, row + 0.4, f"{name}\n{length} tokens", fontsize=7, va="center")
        for j, b in enumerate(table):
            x = 1.4 + j * 1.25
            filled = min(bs, max(0, length - j * bs))
            ax.add_patch(Rectangle((x, row), 1.05, 0.8, facecolor=COLORS[k % len(COLORS)], alpha=0.35 + 0.65 *
                                   filled / bs, edgecolor="black", lw=0.8))
            ax.text(x + 0.52, row + 0.4, f"{j}: {filled}/{bs}", ha="center", va="center", fontsize=6)
            y = n - 1 - b
            ax.add_patch(FancyArrowPatch((x + 1.05, row + 0.4), (6.2, y + 0.4), arrowstyle="->", mutation_scale=7,
                                         color=COLORS[k % len(COLORS)], lw=0.8))
        row -= 3


def block_tables(path: pathlib.Path) -> None:
    """Two prompts sharing a full first block (a prefix hit) and a fork sharing everything."""
    m = pagedkv.BlockManager(block_size=4, num_blocks=8)
    a = m.add_sequence(prompt_token_ids=[5, 6, 7, 8, 9, 10])
    m.append(a, 6)
    c = m.add_sequence(prompt_token_ids=[5, 6, 7, 8, 42, 43, 44])
    m.append(c, 7 - m.num_cached_tokens(c))
    b = m.fork(a)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    _tables(ax, m, {"a": a, "b = fork(a)": b, "c (prefix hit)": c}, "block tables: logical blocks -> pool blocks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def copy_on_write(path: pathlib.Path) -> None:
    """A fork shares a half-filled block; its first write copies it (before and after)."""
    m = pagedkv.BlockManager(block_size=4, num_blocks=6)
    a = m.add_sequence(prompt_token_ids=[5, 6, 7, 8, 9, 10])
    m.append(a, 6)
    b = m.fork(a)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    _tables(left, m, {"a": a, "b = fork(a)": b}, "after fork(a): both share blocks 0 and 1")
    _, src, dst = m.append(b, 1)
    m.release_copy_sources()  # the copy has run (copy_blocks): the source's extra hold goes
    _tables(right, m, {"a": a, "b": b}, f"b appends a token: block {int(src[0])} copied to {int(dst[0])}, "
            "block 0 (full) still shared")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sliding_window(path: pathlib.Path) -> None:
    """One sequence growing over a full-attention manager and a sliding one (window 6) sharing a
    pool: blocks held by each after every step."""
    pool = pagedkv.BlockPool(32)
    full = pagedkv.BlockManager(4, pool)
    sliding = pagedkv.BlockManager(4, pool, sliding_window=6)
    a, b = full.add_sequence(), sliding.add_sequence()
    steps, held_full, held_sliding, tables = [], [], [], []
    for n in range(1, 33):
        full.append(a, 1)
        sliding.append(b, 1)
        steps.append(n)
        held_full.append(sum(x >= 0 for x in full.block_table(a)))
        held_sliding.append(sum(x >= 0 for x in sliding.block_table(b)))
        if n in (8, 20, 32):
            tables.append((n, sliding.block_table(b)))
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    ax.step(steps, held_full, where="post", label="full attention: every block")
    ax.step(steps, held_sliding, where="post", label="sliding window of 6: the blocks it still reads")
    for k, (n, table) in enumerate(tables):
        ax.annotate(f"sliding table {table}", (n, held_sliding[n - 1]), textcoords="offset points",
                    xytext=(-40 - 60 * k, -28), fontsize=7, arrowprops={"arrowstyle": "->", "lw": 0.6})
    ax.set_ylim(0, max(held_full) + 1)
    ax.set_xlabel("tokens in the sequence")
    ax.set_ylabel("blocks held (block size 4)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def memory_over_time(path: pathlib.Path) -> None:
    """The demo's run: blocks in use, paged against a contiguous max-length reservation."""
    plot(run_demo(32, check=False, backend="numpy", progress=None), str(path))


def draw(directory: pathlib.Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    block_tables(directory / "block-tables.png")
    copy_on_write(directory / "copy-on-write.png")
    sliding_window(directory / "sliding-window.png")
    memory_over_time(directory / "memory-over-time.png")


if __name__ == "__main__":
    draw(pathlib.Path(__file__).parent / "img")
