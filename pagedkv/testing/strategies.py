"""Hypothesis strategies for paged-KV inputs that pass pagedkv's validation.

Every strategy here yields inputs a correct kernel must accept: slots inside
the pool, unique write destinations, block tables whose used entries are real
blocks (unused ones are set to -1, which a kernel must never read), copy lists
whose sources and destinations are disjoint. Sizes default small so that
hundreds of examples run in seconds (and under the CUDA simulator).
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ..geometry import formats
from ..geometry.config import CacheConfig
from ..geometry.layout import LAYOUTS, cdiv
from ..memory.pool import KVPool

__all__ = [
    "configs", "slot_mappings", "block_tables", "block_copies", "token_arrays", "filled_pool", "workloads",
]


@st.composite
def configs(draw, *, max_layers: int = 3, max_kv_heads: int = 4, max_head_dim: int = 8,
            max_blocks: int = 8, max_block_size: int = 8, layouts=LAYOUTS, dtypes=("float32",)) -> CacheConfig:
    """A small :class:`CacheConfig` in one of ``layouts`` and one of the storage formats ``dtypes``
    (``tuple(pagedkv.geometry.formats.FORMATS)`` for all of them)."""
    return CacheConfig(
        dtype=draw(st.sampled_from(dtypes)),
        num_layers=draw(st.integers(1, max_layers)),
        num_kv_heads=draw(st.integers(1, max_kv_heads)),
        head_dim=draw(st.integers(1, max_head_dim)),
        num_blocks=draw(st.integers(1, max_blocks)),
        block_size=draw(st.integers(1, max_block_size)),
        layout=draw(st.sampled_from(layouts)),
    )


@st.composite
def slot_mappings(draw, config: CacheConfig, *, max_tokens: int = 24, padding: bool = True,
                  unique: bool = True) -> np.ndarray:
    """An int64 slot mapping: real slots (distinct if ``unique``) mixed with -1 padding."""
    slot = st.integers(0, config.num_slots - 1)
    real = draw(st.lists(slot, max_size=min(max_tokens, config.num_slots) if unique else max_tokens,
                         unique=unique))
    n_pad = draw(st.integers(0, max(0, max_tokens - len(real)))) if padding else 0
    slots = np.array(real + [-1] * n_pad, dtype=np.int64)
    return draw(st.permutations(slots.tolist()).map(lambda x: np.array(x, dtype=np.int64)))


@st.composite
def block_tables(draw, config: CacheConfig, *, max_seqs: int = 4, max_blocks_per_seq: int = 4,
                 min_len: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(block_tables int32 [B, M], context_lens int32 [B])``.

    Blocks may repeat within and across rows (forks and shared prefixes do
    this); entries past a sequence's length are -1, which must never be read. Lengths are
    drawn anywhere, and often at a last page's edges (full, or holding one token).
    """
    bs = config.block_size
    b = draw(st.integers(1, max_seqs))
    m = draw(st.integers(1, max_blocks_per_seq))
    low = min(min_len, m * bs)
    last_page = st.one_of(st.integers(low, m * bs),  # any length, or a last page full or holding one token
                          st.integers(cdiv(low, bs), m).map(lambda k: k * bs),
                          st.integers(0, m - 1).map(lambda k: k * bs + 1).filter(lambda n: n >= low))
    lens = [draw(last_page) for _ in range(b)]
    tables = np.full((b, m), -1, dtype=np.int32)
    for i, n in enumerate(lens):
        used = cdiv(n, bs)
        tables[i, :used] = draw(st.lists(st.integers(0, config.num_blocks - 1), min_size=used, max_size=used))
    return tables, np.array(lens, dtype=np.int32)


@st.composite
def block_copies(draw, config: CacheConfig, *, same_pool: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(src, dst)`` int64 block lists valid for one call of copy_blocks (or swap_blocks).

    Destinations are distinct; with ``same_pool`` no block is both a source
    and a destination.
    """
    nb = config.num_blocks
    perm = draw(st.permutations(range(nb)))
    k = draw(st.integers(0, nb // 2 if same_pool else nb))
    dst = perm[:k]
    sources = perm[k:] if same_pool else list(range(nb))  # a source may feed several copies
    src = [draw(st.sampled_from(sources)) for _ in dst]
    return np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64)


def token_arrays(config: CacheConfig, num_tokens: int, seed: int, count: int = 2) -> list[np.ndarray]:
    """``count`` float32 ``[num_tokens, H, D]`` arrays of standard normal numbers."""
    rng = np.random.default_rng(seed)
    shape = (num_tokens, config.num_kv_heads, config.head_dim)
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(count)]


def filled_pool(config: CacheConfig, seed: int, magnitude: float = 1.0) -> KVPool:
    """A CPU pool whose every element is a distinct-looking random number: standard normal
    numbers (times ``magnitude``) stored in the pool's format (int8 scales random too; fp8
    layers get random per-layer scales), so that a kernel that moves or decodes a wrong
    element shows."""
    rng = np.random.default_rng(seed)
    pool = KVPool(config)
    fmt = config.format
    values = rng.standard_normal(pool.host.size, dtype=np.float32) * np.float32(magnitude)
    if fmt.is_float32:
        pool.host[:] = values
    elif fmt.codec is not None:
        pool.host[:] = formats.encode(fmt, values)
    else:
        pool.host[:] = rng.integers(-127, 128, pool.host.size, dtype=np.int8)
        pool.host_scales[:] = rng.uniform(0.001, 0.05, pool.host_scales.size).astype(np.float32) * np.float32(magnitude)
    if fmt.scale == "tensor":
        for layer in range(config.num_layers):
            pool.set_kv_scales(layer, *rng.uniform(0.25, 4.0, 2))
    return pool


@st.composite
def workloads(draw, config: CacheConfig, *, max_ops: int = 12):
    """A pool filled by a random life of sequences: appends, forks, truncations and frees
    driven through a :class:`~pagedkv.BlockManager`, with K/V written by the reference at the
    slots it hands out (copy-on-write copies applied first).

    Returns ``(pool, block_tables, context_lens)`` of the live sequences: block tables in
    which forks share blocks, as a serving engine's would be.
    """
    from ..backends import reference as ref
    from ..blocks.manager import BlockManager
    from ..errors import OutOfBlocksError

    pool = KVPool(config)
    m = BlockManager(config.block_size, num_blocks=config.num_blocks)
    seed = draw(st.integers(0, 2**32 - 1))
    for i in range(draw(st.integers(1, max_ops))):
        live = m.seq_ids
        op = draw(st.sampled_from(["add", "append", "fork", "truncate", "free"] if live else ["add"]))
        if op == "add":
            m.add_sequence()
        elif op == "fork":
            m.fork(draw(st.sampled_from(live)))
        elif op == "free":
            m.free(draw(st.sampled_from(live)))
        elif op == "truncate":
            s = draw(st.sampled_from(live))
            m.truncate(s, draw(st.integers(0, m.context_len(s))))
        else:
            s = draw(st.sampled_from(live))
            try:
                slots, src, dst = m.append(s, draw(st.integers(1, 2 * config.block_size)))
            except OutOfBlocksError:
                continue
            ref.copy_blocks(pool, src, dst)
            for layer in range(config.num_layers):
                key, value = token_arrays(config, len(slots), seed + 7 * i + layer)
                ref.write(pool, layer, key, value, slots)
    live = m.seq_ids
    m.check()
    return pool, m.block_tables(live, max_blocks=max(1, max((len(m.block_table(s)) for s in live), default=1))), \
        m.context_lens(live)
