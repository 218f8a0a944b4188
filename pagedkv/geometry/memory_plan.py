"""How much memory a deployment takes, exactly: :func:`plan_memory`.

Pure arithmetic over a :class:`~pagedkv.CacheConfig` (its geometry, format, block size and
layer groups), the same arithmetic the pool and the block managers follow, so that a pool
made from the plan holds exactly what the plan says (the test suite allocates one and
checks every figure against it):

- a block's bytes (every plane: the layers of one group), a token's bytes in every layer
  (what a dense cache holds per token), scales included (int8's per token and head, fp8's
  per-tensor pair per plane);
- per layer group, the blocks one sequence holds: at ``length`` tokens after a decode step
  (``ceil(length / block_size)`` for full attention; a sliding group lets go of the blocks
  whose positions all left the window of its query, so it holds at most about
  ``window / block_size + 1``), and at its worst over a whole life of ``max_model_len``
  tokens whose prompt is computed in chunks of at most ``chunk`` tokens (a chunk's blocks
  are held together before any leaves the window);
- how many sequences of ``max_model_len`` fit in the pool at once, worst case (each at its
  worst) and with a prefix of ``shared_prefix`` tokens shared by all (its full blocks held
  once while inside every group's window), and the blocks ``max_num_seqs`` of them need;
- token occupancy against block usage: the tokens held over the slots of the blocks in use
  (a pool's blocks are "used" in whole blocks; the tokens fill only part of the last one,
  and a sliding group's blocks are partly out of the window).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..errors import ConfigError
from .config import CacheConfig, human_bytes, positive_int
from .layout import cdiv, window_start_block


@dataclass(frozen=True)
class GroupPlan:
    """One layer group's part of a :class:`MemoryPlan`.

    Attributes:
        layers: the model layers of the group.
        sliding_window: its window (None: full attention).
        blocks_at_length: blocks one sequence holds at ``max_model_len`` tokens, after a decode step.
        blocks_worst: the most blocks one sequence holds at any step of its life.
        shared_blocks: blocks of the shared prefix held once for every sequence (at their worst).
        tokens_in_window: tokens whose K/V the group still reads at ``max_model_len``.
    """

    layers: tuple[int, ...]
    sliding_window: int | None
    blocks_at_length: int
    blocks_worst: int
    shared_blocks: int
    tokens_in_window: int


@dataclass(frozen=True)
class MemoryPlan:
    """What a pool of a given geometry takes and holds (see the module docstring).

    Attributes:
        config: the pool's configuration (``num_blocks``: from ``kv_cache_bytes``, else what
            ``max_num_seqs`` sequences need at their worst).
        bytes_per_block: one block, every plane, scales included.
        bytes_per_token: one token's K/V in every layer (a dense cache's cost per token).
        pool_bytes: the whole pool (``config.memory_bytes``).
        groups: per layer group.
        max_model_len, max_num_seqs, shared_prefix, chunk: the deployment planned for.
        blocks_per_sequence: blocks one sequence holds at its worst, every group.
        blocks_needed: blocks ``max_num_seqs`` sequences need at their worst, with the shared prefix.
        bytes_needed: the pool bytes those blocks take.
        max_sequences: sequences of ``max_model_len`` that fit at once, each at its worst, nothing shared.
        max_sequences_shared: the same with the shared prefix held once.
        token_occupancy: at ``max_model_len``, tokens whose K/V are read over the slots of the
            blocks held (below 1: the last block's empty slots, a window's stale ones).
        dense_bytes: a dense cache reserving ``max_model_len`` tokens for each of ``max_num_seqs``.
    """

    config: CacheConfig
    bytes_per_block: int
    bytes_per_token: int
    pool_bytes: int
    groups: tuple[GroupPlan, ...]
    max_model_len: int
    max_num_seqs: int
    shared_prefix: int
    chunk: int
    blocks_per_sequence: int
    blocks_needed: int
    bytes_needed: int
    max_sequences: int
    max_sequences_shared: int
    token_occupancy: float
    dense_bytes: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["config"] = {k: v for k, v in d["config"].items() if k != "layer_groups"}
        return d

    def table(self) -> str:
        """The plan in words and numbers (what ``pagedkv plan`` prints)."""
        c = self.config

        def size(n: float) -> str:
            return human_bytes(n, digits=2)

        lines = [f"KV cache: {c.num_layers} layers, {c.num_kv_heads} K/V heads of {c.head_dim}, {c.dtype}, "
                 f"blocks of {c.block_size} tokens",
                 f"  a block: {size(self.bytes_per_block)} ({c.num_planes} layers of storage); a token in every "
                 f"layer: {size(self.bytes_per_token)}",
                 f"  pool: {c.num_blocks} blocks, {size(self.pool_bytes)}", ""]
        lines.append(f"per sequence of {self.max_model_len} tokens (prompts in chunks of at most {self.chunk}):")
        for g in self.groups:
            kind = "full attention" if g.sliding_window is None else f"sliding window {g.sliding_window}"
            lines.append(f"  layers {_span(g.layers)} ({kind}): {g.blocks_at_length} blocks at the end, "
                         f"{g.blocks_worst} at worst")
        lines += [f"  every group: {self.blocks_per_sequence} blocks at worst, "
                  f"{size(self.blocks_per_sequence * self.bytes_per_block)}", "",
                  f"{self.max_num_seqs} sequences at once"
                  + (f", sharing a {self.shared_prefix}-token prefix" if self.shared_prefix else "")
                  + f": {self.blocks_needed} blocks, {size(self.bytes_needed)} (a dense cache: "
                  f"{size(self.dense_bytes)})",
                  f"the pool holds {self.max_sequences} such sequences at once at worst"
                  + (f", {self.max_sequences_shared} sharing the prefix" if self.shared_prefix else ""),
                  f"token occupancy at the end: {self.token_occupancy:.1%} of the slots of the blocks held"]
        return "\n".join(lines)


def _span(layers: tuple[int, ...]) -> str:
    """Layer numbers in short: ``0-31``, ``0-40 by 2``, or listed."""
    if len(layers) == 1:
        return str(layers[0])
    step = layers[1] - layers[0]
    if step > 0 and layers == tuple(range(layers[0], layers[-1] + 1, step)):
        return f"{layers[0]}-{layers[-1]}" + (f" by {step}" if step > 1 else "")
    return ",".join(map(str, layers))


def blocks_held(length: int, first_query: int, block_size: int, window: int | None) -> int:
    """Blocks a sequence of ``length`` tokens holds after a step whose first query was at
    ``first_query`` (a sliding group has let go of the blocks before that query's window)."""
    gone = 0 if window is None else max(0, (first_query - window + 1) // block_size)
    return cdiv(length, block_size) - gone


def worst_blocks(max_len: int, chunk: int, block_size: int, window: int | None) -> int:
    """The most blocks one sequence holds at any step of a life of ``max_len`` tokens, with any
    chunks of at most ``chunk`` tokens (a step with its first query at ``a`` holds the blocks up
    to ``a + n``, ``n <= chunk``)."""
    if window is None:
        return cdiv(max_len, block_size)
    worst = 0
    for a in range(max_len):  # every first query; the longest chunk from it holds the most
        worst = max(worst, blocks_held(min(max_len, a + chunk), a, block_size, window))
    return worst


def plan_memory(config: CacheConfig, *, max_model_len: int, max_num_seqs: int = 1, kv_cache_bytes: int | None = None,
                shared_prefix: int = 0, chunk: int | None = None) -> MemoryPlan:
    """Plan a pool of ``config``'s geometry for ``max_num_seqs`` sequences of up to
    ``max_model_len`` tokens (see the module docstring). ``kv_cache_bytes`` sizes the pool
    (as :meth:`CacheConfig.from_memory_budget` does); without it, the pool is what the
    sequences need at their worst. ``chunk``: the most prompt tokens computed in one step
    (the engine's ``max_num_batched_tokens``; default ``max_model_len``)."""
    if not isinstance(config, CacheConfig):
        raise ConfigError(f"plan_memory needs a CacheConfig, got {type(config).__name__}")
    max_model_len = positive_int("max_model_len", max_model_len)
    max_num_seqs = positive_int("max_num_seqs", max_num_seqs)
    chunk = max_model_len if chunk is None else positive_int("chunk", chunk)
    if isinstance(shared_prefix, bool) or not isinstance(shared_prefix, int) or not 0 <= shared_prefix <= max_model_len:
        raise ConfigError(f"shared_prefix must be an integer in 0..max_model_len, got {shared_prefix!r}")
    bs = config.block_size
    groups = []
    for g in config.layer_groups:
        w = g.sliding_window
        worst = worst_blocks(max_model_len, chunk, bs, w)
        at_end = blocks_held(max_model_len, max_model_len - 1, bs, w)
        prefix_blocks = shared_prefix // bs  # its full blocks: what the prefix cache shares
        # a shared block stays shared while it is inside the window (full attention: always)
        kept_from = 0 if w is None else window_start_block(max_model_len - 1, w, bs)
        shared = max(0, prefix_blocks - kept_from)
        in_window = max_model_len if w is None else min(max_model_len, w)
        groups.append(GroupPlan(g.layers, w, at_end, worst, shared, in_window))
    per_seq = sum(g.blocks_worst for g in groups)
    shared_total = sum(g.shared_blocks for g in groups)
    needed = max_num_seqs * per_seq - (max_num_seqs - 1) * shared_total
    if kv_cache_bytes is not None:
        sized = CacheConfig.from_memory_budget(kv_cache_bytes, num_layers=config.num_layers,
                                               num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                                               block_size=bs, dtype=config.dtype, layout=config.layout,
                                               layer_groups=config.layer_groups)
    else:
        sized = replace(config, num_blocks=needed)
    n = sized.num_blocks
    fit = n // per_seq
    fit_shared = 0 if n < per_seq else 1 + (n - per_seq) // max(1, per_seq - shared_total)
    held_end = sum(g.blocks_at_length for g in groups)
    read = sum(g.tokens_in_window for g in groups)
    dense = max_num_seqs * max_model_len * config.bytes_per_token
    return MemoryPlan(sized, sized.bytes_per_block, sized.bytes_per_token, sized.memory_bytes, tuple(groups),
                      max_model_len, max_num_seqs, shared_prefix, chunk, per_seq, needed,
                      needed * sized.bytes_per_block + (sized.memory_bytes - n * sized.bytes_per_block), fit,
                      fit_shared, read / (held_end * bs), dense)
