"""What ``pagedkv bench`` needs: workloads, the peers pagedkv is measured against, timing.

A workload is one routine's inputs at a decode-sized or prefill-sized shape;
a peer is what a user would write instead: numpy fancy indexing on the 4-D
views, torch CPU indexing on the same memory (when torch is installed), and
a contiguous copy of the same number of bytes, the memory-bandwidth limit.
The asv suite in ``benchmarks/`` builds on these (its ``harness`` module
adds the ratio reports, the GPU peers, attention and bookkeeping).

Bytes moved count what is read plus what is written, so that a routine and a
plain copy of the same bytes compare directly as GB/s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..backends.numba.stream import store_fence, stream_copy
from ..geometry.config import CacheConfig
from ..geometry.layout import cdiv, gather_slots, split_slot
from ..memory.device import host_aligned, host_array
from ..memory.pool import KVPool

H, D, BLOCK_SIZE = 8, 128, 16
ROUTINES = ("write", "read", "gather", "gather_out", "copy_blocks", "swap_blocks")
PEER_ROUTINES = ("write", "gather", "copy_blocks")
SHAPES = {"decode": 64, "prefill": 8192}  # tokens per call
NUM_BLOCKS = 1024  # one layer, 128 MiB: room for the prefill shape twice over


@dataclass
class Workload:
    """Inputs of every routine at one shape (a CPU pool; see :func:`on_gpu` for a GPU copy)."""

    config: CacheConfig
    pool: KVPool
    key: np.ndarray
    value: np.ndarray
    slots: np.ndarray  # write/read: distinct slots, scattered (decode) or whole blocks (prefill)
    tables: np.ndarray  # gather
    lens: np.ndarray
    src: np.ndarray  # copy_blocks / swap_blocks
    dst: np.ndarray

    @property
    def token_bytes(self) -> int:
        """Bytes of K plus V of the tokens written, read or gathered."""
        return 2 * self.key.nbytes

    @property
    def copy_bytes(self) -> int:
        """Bytes of the blocks copied, every layer, K and V."""
        return self.src.size * self.config.bytes_per_block


def make_workload(shape: str, layout: str = "NHD", seed: int = 0, *, tokens: int | None = None,
                  heads: int = H, head_dim: int = D, num_blocks: int = NUM_BLOCKS) -> Workload:
    """A workload of ``SHAPES[shape]`` tokens, H=8, D=128, block_size=16, in ``layout``.

    The keyword arguments shrink it (tests run the GPU paths on the simulator that way).
    """
    t = SHAPES[shape] if tokens is None else tokens
    rng = np.random.default_rng(seed)
    config = CacheConfig(num_layers=1, num_kv_heads=heads, head_dim=head_dim, num_blocks=num_blocks,
                         block_size=BLOCK_SIZE, layout=layout)
    pool = KVPool(config)
    pool.host[:] = rng.standard_normal(pool.host.size, dtype=np.float32)
    key, value = (rng.standard_normal((t, heads, head_dim), dtype=np.float32) for _ in range(2))
    blocks = rng.permutation(num_blocks)
    if shape == "decode":  # one new token for each of t sequences: scattered slots
        slots = rng.choice(config.num_slots, size=t, replace=False)
        num_seqs = 4
    else:  # prompts: whole blocks, in random block order
        slots = (blocks[: t // BLOCK_SIZE, None] * BLOCK_SIZE + np.arange(BLOCK_SIZE)).ravel()
        num_seqs = 8
    # gather: the t tokens as num_seqs sequences of whole blocks, in random block order
    num_seqs = max(1, min(num_seqs, t // BLOCK_SIZE))
    per_seq = t // num_seqs
    tables = blocks[: num_seqs * cdiv(per_seq, BLOCK_SIZE)].reshape(num_seqs, -1).astype(np.int32)
    lens = np.full(num_seqs, per_seq, dtype=np.int32)
    n_copy = max(1, t // BLOCK_SIZE)
    return Workload(config, pool, key, value, slots.astype(np.int64), tables, lens,
                    blocks[:n_copy].astype(np.int64), blocks[n_copy:2 * n_copy].astype(np.int64))


def median_seconds(fn: Callable[[], object], *, repeat: int = 7, min_time: float = 0.02) -> float:
    """Median over ``repeat`` runs of the time of one call, each run long enough to time."""
    fn()  # warm up (and compile)
    number, t = 1, 0.0
    while True:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        t = time.perf_counter() - start
        if t >= min_time or number >= 1 << 16:
            break
        number *= 2
    times = [t / number]
    for _ in range(repeat - 1):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number)
    return float(np.median(times))


# ---- peers ----------------------------------------------------------------------------------

@njit(parallel=True, cache=True)
def _parallel_copy(out, x, chunks):
    """Copy x into out in ``chunks`` contiguous pieces, in parallel."""
    step = (x.size + chunks - 1) // chunks
    for c in prange(chunks):
        out[c * step:min(x.size, (c + 1) * step)] = x[c * step:min(x.size, (c + 1) * step)]


@njit(parallel=True, cache=True)
def _streaming_copy(out, x, chunks):
    """:func:`_parallel_copy` with streaming stores (as the kernels' large calls make)."""
    step = (x.size + chunks - 1) // chunks
    for c in prange(chunks):
        first = np.int64(c) * step
        stream_copy(out, first, x, first, max(0, min(x.size, first + step) - first))
        store_fence()


def _copy_source(n: int) -> np.ndarray:
    """``n`` random float32 numbers on a cache line: what the yardstick copies read."""
    src = host_aligned(n, np.float32)
    src[:] = np.random.default_rng(1).standard_normal(n, dtype=np.float32)
    return src


def contiguous_copies(nbytes: int) -> dict[str, Callable[[], object]]:
    """Contiguous copies of ``nbytes / 2`` bytes (each reads and writes ``nbytes`` in all).

    ``np.copyto`` (one thread), a parallel numba slice copy, the same with
    streaming stores (which the numba kernels use from 16 MiB up: see
    :mod:`pagedkv.backends.numba.stream`), and torch's ``copy_`` when torch
    is installed: the memory-bandwidth limit is the fastest of them on the
    machine at hand. Both arrays start on a cache line, as pools do.
    """
    src = _copy_source(max(1, nbytes // 8))
    dst = host_aligned(src.size, np.float32)
    copies: dict[str, Callable[[], object]] = {"numpy": lambda: np.copyto(dst, src)}
    copies["numba"] = lambda: _parallel_copy(dst, src, 64)
    copies["numba streaming"] = lambda: _streaming_copy(dst, src, 64)
    try:
        import torch
    except ImportError:
        pass
    else:
        ts, td = torch.from_numpy(src), torch.from_numpy(dst)
        copies["torch"] = lambda: td.copy_(ts)
    return copies


def fastest_copy(nbytes: int) -> tuple[Callable[[], object], float]:
    """The fastest of :func:`contiguous_copies` here and now, and its median time."""
    timed = [(f, median_seconds(f)) for f in contiguous_copies(nbytes).values()]
    return min(timed, key=lambda pair: pair[1])


def copy_limit_seconds(nbytes: int) -> float:
    """Median time of the fastest copy of the same bytes (see :func:`contiguous_copies`)."""
    return fastest_copy(nbytes)[1]


def copy_into_new_memory(nbytes: int) -> Callable[[], object]:
    """A copy of ``nbytes / 2`` bytes into two new arrays of half that each, as a routine
    returning two new outputs makes (``gather`` without ``out=``): the fastest of
    ``np.copy`` and the parallel copies of :func:`contiguous_copies` into
    :func:`~pagedkv.memory.device.host_aligned` arrays. New memory costs its page faults (the
    kernel zeroes every page it maps) whoever fills it; this is the yardstick that pays
    them too."""
    n = max(2, nbytes // 8)
    src = _copy_source(n)
    halves = src[:n // 2], src[n // 2:]
    copies: list[Callable[[], object]] = [lambda: [h.copy() for h in halves]]
    for copy in (_parallel_copy, _streaming_copy):
        def into_new(copy=copy):
            for h in halves:
                copy(host_aligned(h.size, np.float32), h, 64)
        copies.append(into_new)
    return min(copies, key=median_seconds)


def interleaved_ratio(fn: Callable[[], object], peer: Callable[[], object], *, rounds: int = 15,
                      min_time: float = 0.02) -> float:
    """Median over ``rounds`` of (time of ``peer``) / (time of ``fn``), the two timed back to
    back in each round: a shared machine's load moves both alike, so the ratio is steadier
    than a ratio of two medians taken one after the other."""
    fn()
    peer()
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        if time.perf_counter() - start >= min_time or number >= 1 << 16:
            break
        number *= 2
    ratios = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        middle = time.perf_counter()
        for _ in range(number):
            peer()
        ratios.append((time.perf_counter() - middle) / (middle - start))
    return float(np.median(ratios))


def _block_pos(w: Workload) -> tuple[np.ndarray, np.ndarray]:
    return split_slot(w.slots, BLOCK_SIZE)


def numpy_peer(w: Workload, routine: str) -> Callable[[], object]:
    """The routine written with numpy fancy indexing on ``pool.k()`` / ``pool.v()``."""
    k, v = w.pool.k(0), w.pool.v(0)
    blocks, pos = _block_pos(w)
    nhd = w.config.layout == "NHD"
    if routine == "write":
        if nhd:
            def f():
                k[blocks, pos] = w.key
                v[blocks, pos] = w.value
        else:
            def f():
                k[blocks, :, pos] = w.key
                v[blocks, :, pos] = w.value
        return f
    if routine == "gather":
        gb, gp = split_slot(gather_slots(w.tables, w.lens, BLOCK_SIZE), BLOCK_SIZE)
        if nhd:
            return lambda: (k[gb, gp], v[gb, gp])
        return lambda: (k[gb, :, gp], v[gb, :, gp])
    if routine == "copy_blocks":
        def f():
            k[w.dst] = k[w.src]
            v[w.dst] = v[w.src]
        return f
    raise ValueError(routine)


def torch_peer(w: Workload, routine: str) -> Callable[[], object] | None:
    """The routine with torch CPU ``index_copy_`` / ``index_select`` on the same memory, or None."""
    try:
        import torch
    except ImportError:
        return None
    k, v = torch.from_numpy(w.pool.k(0)), torch.from_numpy(w.pool.v(0))
    blocks, pos = (torch.from_numpy(a) for a in _block_pos(w))
    nhd = w.config.layout == "NHD"
    if routine == "write":
        key, value = torch.from_numpy(w.key), torch.from_numpy(w.value)
        if nhd:
            flat_k, flat_v = k.view(-1, H, D), v.view(-1, H, D)
            slots = torch.from_numpy(w.slots)
            def f():
                flat_k.index_copy_(0, slots, key)
                flat_v.index_copy_(0, slots, value)
        else:
            def f():
                k[blocks, :, pos] = key
                v[blocks, :, pos] = value
        return f
    if routine == "gather":
        gathered = gather_slots(w.tables, w.lens, BLOCK_SIZE)
        if nhd:
            flat_k, flat_v = k.view(-1, H, D), v.view(-1, H, D)
            idx = torch.from_numpy(gathered)
            return lambda: (flat_k.index_select(0, idx), flat_v.index_select(0, idx))
        gb, gp = (torch.from_numpy(a) for a in split_slot(gathered, BLOCK_SIZE))
        return lambda: (k[gb, :, gp], v[gb, :, gp])
    if routine == "copy_blocks":
        src, dst = torch.from_numpy(w.src), torch.from_numpy(w.dst)
        def f():
            k.index_copy_(0, dst, k.index_select(0, src))
            v.index_copy_(0, dst, v.index_select(0, src))
        return f
    raise ValueError(routine)


def backend_call(backend, w: Workload, routine: str) -> Callable[[], object]:
    """One call of ``backend``'s routine on the workload, validation included."""
    if routine == "write":
        return lambda: backend.write(w.pool, 0, w.key, w.value, w.slots)
    if routine == "read":
        return lambda: backend.read(w.pool, 0, w.slots)
    if routine == "gather":
        return lambda: backend.gather(w.pool, 0, w.tables, w.lens)
    if routine == "gather_out":  # reusing output buffers, as a decode loop does
        out = backend.new_outputs(w.pool, int(host_array(w.lens, "lens").sum()))
        return lambda: backend.gather(w.pool, 0, w.tables, w.lens, out=out)
    if routine == "copy_blocks":
        return lambda: backend.copy_blocks(w.pool, w.src, w.dst)
    if routine == "swap_blocks":  # to a second pool in host memory (an offload, for the GPU)
        other = KVPool(w.config)
        return lambda: backend.swap_blocks(w.pool, other, w.src, w.dst)
    raise ValueError(routine)


def bytes_moved(w: Workload, routine: str) -> int:
    """Bytes read plus written by one call of ``routine``."""
    return 2 * (w.copy_bytes if routine in ("copy_blocks", "swap_blocks") else w.token_bytes)
