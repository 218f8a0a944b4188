"""Paged attention on the GPU: one CUDA block per (query row, K/V head), split-K for long contexts.

A block serves every query head of one K/V head's group (grouped-query
attention: ``Hq / H`` heads; a group too large for one block's shared memory
is cut into parts, each a block), so each K and V row is read from memory
once per query row, not once per query head. Per tile of :data:`TILE`
positions:

1. **scores**: each warp takes positions in turn; its lanes split the head
   dimension (consecutive lanes, consecutive ``d``: one coalesced read of the
   K row), each lane sums its share of ``q . k`` for each query head, and a
   warp reduction (:func:`lane_reduce`) adds the shares up;
2. **online softmax**: each warp takes query heads in turn, its lanes the
   tile's positions; warp reductions give the tile's max and sum, and the
   running max, sum and this tile's correction per head go to shared memory;
3. **values**: each thread owns one ``d`` and adds ``weight * v`` for every
   position and head of the tile into the accumulators (shared memory),
   reading each V row once.

**Split-K** (flash-decoding): when a step has too few (row, head) blocks to
fill the GPU and its contexts are long, the positions of each row are cut into
``splits`` ranges of ``split_len``, one CUDA block each (the grid's z); each
writes its unnormalised accumulators with its running max and sum, and
:func:`combine_splits_kernel` rescales them to the common max and adds them
up. With one split the first kernel writes the output itself.

Warp shuffles (``cuda.shfl_xor_sync``) do the reductions on a GPU. numba's
CUDA simulator has no shuffles, so under it :func:`lane_reduce` takes the
same butterfly through shared memory and barriers (which is why every thread
of a block calls it the same number of times, masking what it does not
need); the tests run that path with two-lane "warps", and
``tests/test_cuda_compiles.py`` compiles the shuffle path for a real GPU.
"""

import math

from numba import config, cuda, float32, int64

from ...geometry.layout import K, V
from .kernels import load_value, scale_index, table_slot, token_base, window_start

#: the most query heads one CUDA block serves; a larger group is served by several blocks
MAX_GROUP = 32
#: the most queries x head_dim numbers one block keeps (its queries and its accumulators, in shared memory)
MAX_GROUP_DIM = 4096
#: positions scored per tile (sizes shared arrays, so a constant)
TILE = 32
#: the most threads a block may have (sizes the simulator's reduction scratch)
MAX_THREADS = 256
# the sizes of shared arrays must be constants, not expressions
_WEIGHTS = MAX_GROUP * TILE
_STATE = 3 * MAX_GROUP  # running max, running sum, this tile's correction: per head

SIMULATED = bool(config.ENABLE_CUDASIM)  # type: ignore[attr-defined]  # numba's config is dynamic

if SIMULATED:
    @cuda.jit(device=True)
    def lane_reduce(x, scratch, t, lanes, take_max):
        """The sum (or the max) of ``x`` over the ``lanes`` lanes of thread ``t``'s warp, in
        every lane: the xor butterfly of warp shuffles, through shared memory and barriers."""
        offset = lanes // 2
        while offset > 0:
            cuda.syncthreads()
            scratch[t] = x
            cuda.syncthreads()
            other = scratch[t ^ offset]
            x = max(x, other) if take_max else x + other
            offset //= 2
        return x
else:
    @cuda.jit(device=True)
    def lane_reduce(x, scratch, t, lanes, take_max):
        """The sum (or the max) of ``x`` over the ``lanes`` lanes of thread ``t``'s warp, in
        every lane: an xor butterfly of warp shuffles (``scratch`` and ``t`` unused)."""
        offset = lanes // 2
        while offset > 0:
            other = cuda.shfl_xor_sync(0xFFFFFFFF, x, offset)
            x = max(x, other) if take_max else x + other
            offset //= 2
        return x


@cuda.jit(device=True)
def _scores(data, layer, qs, tables, b, tile, n, h, ng, w, v_at, v_si, scratch, t, lanes, scale, cap, s, decode,
            k_table, scales):
    """Step 1: ``w[g * TILE + j]`` = the (capped) score of query head g at position ``tile + j``;
    also where each position's V row and scale are (``v_at``, ``v_si``) for step 3."""
    warps = cuda.blockDim.x // lanes
    warp = t // lanes
    lane = t - warp * lanes
    head_dim = s.head_dim
    for first in range(0, n, warps):  # the same trip count in every warp (n is the block's): lane_reduce has barriers
        j = first + warp
        valid = j < n
        at = int64(0)
        si = int64(0)
        if valid:
            slot = table_slot(tables, b, tile + j, s.block_size)
            at = token_base(layer, K, slot, s) + h * s.head_stride
            si = scale_index(layer, K, slot, h, s)
            if lane == 0:
                v_at[j] = token_base(layer, V, slot, s) + h * s.head_stride
                v_si[j] = scale_index(layer, V, slot, h, s)
        for g in range(ng):
            dot = float32(0.0)
            if valid:
                for d in range(lane, head_dim, lanes):
                    dot += qs[g * head_dim + d] * load_value(data, at + d, decode, k_table, scales, si)
            dot = lane_reduce(dot, scratch, t, lanes, False)
            if valid and lane == 0:
                x = dot * scale
                if cap > 0:
                    x = cap * math.tanh(x / cap)
                w[g * TILE + j] = x


@cuda.jit(device=True)
def _softmax(w, n, ng, ml, scratch, t, lanes):
    """Step 2: the tile's scores become weights ``exp(score - m)`` against each head's new running
    max m; ``ml`` holds per head the running max, the running sum and this tile's correction."""
    warps = cuda.blockDim.x // lanes
    warp = t // lanes
    lane = t - warp * lanes
    for first in range(0, ng, warps):  # the same trip count in every warp
        g = first + warp
        x = float32(-math.inf)
        if g < ng:
            for j in range(lane, n, lanes):
                x = max(x, w[g * TILE + j])
        m_new = lane_reduce(x, scratch, t, lanes, True)
        total = float32(0.0)
        if g < ng:
            m_new = max(m_new, ml[g])
            for j in range(lane, n, lanes):
                e = math.exp(w[g * TILE + j] - m_new)
                w[g * TILE + j] = e
                total += e
        total = lane_reduce(total, scratch, t, lanes, False)
        if g < ng and lane == 0:
            correction = math.exp(ml[g] - m_new)
            ml[MAX_GROUP + g] = ml[MAX_GROUP + g] * correction + total
            ml[g] = m_new
            ml[2 * MAX_GROUP + g] = correction


@cuda.jit
def attention_kernel(data, layer, q, tables, row_seq, row_pos, window, scale, cap, s, decode, k_table, v_table, scales,
                     group, lanes, split_len, out, part_acc, part_ml):
    """Block (r, y, z): query row r, K/V head ``y // parts`` with the ``group`` query heads of part
    ``y % parts`` of its group, positions ``[first + z * split_len, ...)`` of the row's range.

    One split (``gridDim.z == 1``): the normalised result goes to ``out[r, hq, :]``. More: the
    accumulators to ``part_acc[r, z, hq, :]``, the running max and sum to ``part_ml[r, z, hq, :]``,
    for :func:`combine_splits_kernel`. Padding rows (``row_pos < 0``) give zeros.
    """
    r = cuda.blockIdx.x
    split = cuda.blockIdx.z
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    head_dim = s.head_dim
    per_head = q.shape[1] // s.num_kv_heads
    parts = (per_head + group - 1) // group
    h = cuda.blockIdx.y // parts
    first_q = h * per_head + (cuda.blockIdx.y - h * parts) * group  # this block's first query head
    ng = min(group, h * per_head + per_head - first_q)
    qs = cuda.shared.array(MAX_GROUP_DIM, float32)
    acc = cuda.shared.array(MAX_GROUP_DIM, float32)
    w = cuda.shared.array(_WEIGHTS, float32)
    ml = cuda.shared.array(_STATE, float32)
    v_at = cuda.shared.array(TILE, int64)
    v_si = cuda.shared.array(TILE, int64)
    scratch = cuda.shared.array(MAX_THREADS, float32)
    for i in range(t, ng * head_dim, threads):
        g = i // head_dim
        qs[i] = q[r, first_q + g, i - g * head_dim]
        acc[i] = 0.0
    for g in range(t, ng, threads):
        ml[g] = -math.inf
        ml[MAX_GROUP + g] = 0.0
    cuda.syncthreads()
    pos = row_pos[r]
    start = window_start(pos, window) + split * split_len
    stop = min(pos + 1, start + split_len)  # empty for padding rows and for splits past the row's end
    b = row_seq[r]
    for tile in range(start, stop, TILE):  # the same for the whole block, so the barriers inside are safe
        n = min(TILE, stop - tile)
        _scores(data, layer, qs, tables, b, tile, n, h, ng, w, v_at, v_si, scratch, t, lanes, scale, cap, s, decode,
                k_table, scales)
        cuda.syncthreads()
        _softmax(w, n, ng, ml, scratch, t, lanes)
        cuda.syncthreads()
        for d in range(t, head_dim, threads):  # step 3: each V number read once, for every head
            for g in range(ng):
                acc[g * head_dim + d] *= ml[2 * MAX_GROUP + g]
            for j in range(n):
                v = load_value(data, v_at[j] + d, decode, v_table, scales, v_si[j])
                for g in range(ng):
                    acc[g * head_dim + d] += w[g * TILE + j] * v
        cuda.syncthreads()
    for i in range(t, ng * head_dim, threads):
        g = i // head_dim
        d = i - g * head_dim
        if cuda.gridDim.z == 1:
            out[r, first_q + g, d] = acc[i] / ml[MAX_GROUP + g] if pos >= 0 else float32(0.0)
        else:
            part_acc[r, split, first_q + g, d] = acc[i]
            if d == 0:
                part_ml[r, split, first_q + g, 0] = ml[g]
                part_ml[r, split, first_q + g, 1] = ml[MAX_GROUP + g]


@cuda.jit
def combine_splits_kernel(part_acc, part_ml, row_pos, out):
    """Block (r, hq): ``out[r, hq, :]`` from the splits' accumulators, each rescaled from its own
    running max to the largest, over the sum of their rescaled sums (empty splits add nothing)."""
    r = cuda.blockIdx.x
    hq = cuda.blockIdx.y
    t = cuda.threadIdx.x
    splits = part_ml.shape[1]
    if row_pos[r] < 0:  # a padding row: every split was empty
        for d in range(t, out.shape[2], cuda.blockDim.x):
            out[r, hq, d] = 0.0
        return
    m = float32(-math.inf)
    for k in range(splits):
        m = max(m, part_ml[r, k, hq, 0])
    total = float32(0.0)
    for k in range(splits):
        total += part_ml[r, k, hq, 1] * math.exp(part_ml[r, k, hq, 0] - m)
    for d in range(t, out.shape[2], cuda.blockDim.x):
        a = float32(0.0)
        for k in range(splits):
            a += part_acc[r, k, hq, d] * math.exp(part_ml[r, k, hq, 0] - m)
        out[r, hq, d] = a / total


def split_positions(longest: int, window: int, blocks: int, at_least: int, below: int) -> tuple[int, int]:
    """(On the host.) ``(splits, split_len)``: how many parts attention cuts each row's positions
    into (split-K) and how many positions a part takes: parts of at least ``at_least`` positions,
    as many as bring the step's ``blocks`` (row, K/V head) CUDA blocks up to ``below``, and none
    (one part) when there are that many blocks already or no row is longer than ``at_least``.
    ``longest``: the most positions a row attends to (:class:`pagedkv.ops.plan.AttentionPlan`'s, found
    once a step); ``window``: 0 or a sliding window."""
    if window > 0:
        longest = min(longest, window)
    if blocks >= below or longest <= at_least:
        return 1, longest
    splits = min(-(-longest // at_least), -(-below // blocks))
    return splits, -(-longest // splits)
