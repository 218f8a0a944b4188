"""The benchmark harness behind the asv suite: ratio reports, bookkeeping, GPU peers, attention.

Builds on :mod:`pagedkv.tools.bench` (the workloads, CPU peers and timing that
``pagedkv bench`` needs too). Everything here is measured in one process, so
that a ratio compares two timings taken under the same load.

Run the performance record's table from the repository root::

    python -c "from benchmarks.harness import report; print(report())"
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pagedkv import BlockManager, BlockPool, CacheConfig, KVPool, LayerGroup, PagedKVCache, get_backend
from pagedkv.geometry.layout import cdiv, gather_slots, split_slot
from pagedkv.tools.bench import (
    BLOCK_SIZE,
    PEER_ROUTINES,
    SHAPES,
    D,
    H,
    Workload,
    backend_call,
    bytes_moved,
    copy_into_new_memory,
    copy_limit_seconds,
    fastest_copy,
    interleaved_ratio,
    make_workload,
    median_seconds,
    numpy_peer,
    torch_peer,
)


def measure(routine: str, layout: str, shape: str, *, backend: str = "numba") -> dict[str, float | None]:
    """One routine of ``backend`` beside its yardsticks, all timed here and now (medians).

    Returns GB/s and the ratios the performance targets are stated in:
    ``vs_copy`` (bandwidth over the fastest copy of the same bytes, streaming or not, the two timed
    in turns: :func:`~pagedkv.tools.bench.interleaved_ratio`; ``vs_copy_out`` for ``gather``
    into ``out=`` buffers, ``vs_new_copy`` for ``gather``'s new outputs over a copy into
    new memory), ``vs_torch`` (speed over torch CPU indexing; None without torch),
    ``vs_numpy_fancy``, ``vs_numpy`` (over the reference backend) and
    ``call_over_kernel`` (validation's share: whole call over bare kernel).
    """
    w = make_workload(shape, layout)
    n = bytes_moved(w, routine)
    call = backend_call(get_backend(backend), w, routine)
    out_call = backend_call(get_backend(backend), w, "gather_out") if routine == "gather" else call
    t = median_seconds(call)
    t_out = median_seconds(out_call) if routine == "gather" else t
    copy, t_copy = fastest_copy(n)
    torch_call = torch_peer(w, routine)
    t_torch = median_seconds(torch_call) if torch_call else None
    t_fancy = median_seconds(numpy_peer(w, routine))
    t_ref = median_seconds(backend_call(get_backend("numpy"), w, routine), repeat=3)
    t_kernel = median_seconds(bare_kernel(w, routine)) if backend == "numba" else None
    vs_copy = interleaved_ratio(call, copy)
    return {
        "seconds": t,
        "gbps": n / t / 1e9,
        "copy_gbps": n / t_copy / 1e9,
        "vs_copy": vs_copy,
        "vs_copy_out": interleaved_ratio(out_call, copy) if routine == "gather" else vs_copy,
        "vs_new_copy": interleaved_ratio(call, copy_into_new_memory(n)) if routine == "gather" else None,
        "vs_torch": t_torch / t if t_torch else None,
        "vs_numpy_fancy": t_fancy / t,
        "vs_numpy": t_ref / t,
        "call_over_kernel": t_out / t_kernel if t_kernel else None,
    }


def bare_kernel(w: Workload, routine: str) -> Callable[[], object]:
    """The numba kernel alone on already-checked arguments: what validation is measured against."""
    from pagedkv.backends import numba as nb

    s, fmt = w.pool.strides, nb._format_args(w.pool, 0)
    if routine == "write":
        stream = nb.streams_rows(w.pool, w.key.shape[0])
        return lambda: nb.write_kernel(w.pool.data, 0, w.key, w.value, w.slots, stream, s, *fmt)
    if routine == "gather":
        out_k = np.empty((int(w.lens.sum()), H, D), np.float32)
        out_v = np.empty_like(out_k)
        stream = nb.streams_rows(w.pool, out_k.shape[0])
        return lambda: nb.gather_kernel(w.pool.data, 0, w.tables, w.lens, out_k, out_v, stream, s, *fmt)
    if routine == "copy_blocks":
        stream = nb.streams_blocks(w.pool, w.src.shape[0])
        return lambda: nb.move_blocks_kernel(w.pool.data, w.pool.data, w.src, w.dst, stream, s)
    raise ValueError(routine)


def report(shapes=tuple(SHAPES), layouts=("NHD", "HND"), routines=PEER_ROUTINES) -> str:
    """A markdown table of :func:`measure` for every routine, layout and shape (numba backend)."""
    def fmt(x, spec=".2f"):
        return "n/a" if x is None else format(x, spec)

    lines = [
        "| routine | shape | layout | numba GB/s | copy-limit GB/s | x copy | x copy (out=) | x copy into new "
        "| x torch | x numpy fancy | x reference | call / kernel |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for shape in shapes:
        for routine in routines:
            for layout in layouts:
                m = measure(routine, layout, shape)
                out = fmt(m["vs_copy_out"]) if routine == "gather" else ""
                new = fmt(m["vs_new_copy"]) if routine == "gather" else ""
                lines.append(
                    f"| {routine} | {shape} | {layout} | {m['gbps']:.1f} | {m['copy_gbps']:.1f} | "
                    f"{m['vs_copy']:.2f} | {out} | {new} | {fmt(m['vs_torch'])} | {m['vs_numpy_fancy']:.2f} | "
                    f"{m['vs_numpy']:.1f} | {fmt(m['call_over_kernel'])} |"
                )
    return "\n".join(lines)


class DecodeStep:
    """The bookkeeping of one decode step of ``num_seqs`` running sequences, one new token each:
    slot mapping (``append_batch``), padded block tables and context lengths, for each layer
    group (``windows``: None for a full-attention group, W for a sliding one), as
    :meth:`pagedkv.PagedKVCache.begin_step` does it."""

    def __init__(self, num_seqs: int = 256, context: int = 512, block_size: int = BLOCK_SIZE,
                 rewind_every: int = 1024, windows: tuple[int | None, ...] = (None,)) -> None:
        blocks_per_seq = cdiv(context + rewind_every, block_size)
        pool = BlockPool(len(windows) * num_seqs * blocks_per_seq)
        self.managers = [BlockManager(block_size, pool, sliding_window=w) for w in windows]
        self.manager = self.managers[0]
        self.seq_ids = [self.manager.add_sequence() for _ in range(num_seqs)]
        for m in self.managers[1:]:
            for s in self.seq_ids:
                m.add_sequence(s)
        for m in self.managers:
            m.append_batch(self.seq_ids, [context] * num_seqs)
        self.ones = np.ones(num_seqs, dtype=np.int64)
        self.context, self.rewind_every, self.steps = context, rewind_every, 0

    def __call__(self):
        self.steps += 1
        if self.steps % self.rewind_every == 0:  # keep the pool from filling; amortised in the timing
            for m in self.managers:
                for s in self.seq_ids:
                    if m.sliding_window is None:
                        m.truncate(s, self.context)
                    else:  # its early blocks left the window: start the sequence again
                        m.free(s)
                        m.add_sequence(s)
                        m.append(s, self.context)
        steps = [m.append_batch(self.seq_ids, self.ones) for m in self.managers]
        lens = self.manager.context_lens(self.seq_ids)  # the same in every group
        tables = [m.block_tables(self.seq_ids) for m in self.managers]
        return steps[0].slots, tables[0], lens


def bookkeeping_vs_write(num_seqs: int = 256, windows: tuple[int | None, ...] = (None,)) -> dict[str, float]:
    """Seconds of one decode step's bookkeeping (every layer group of ``windows``) beside the
    numpy reference writing that step's K/V for one layer (H=8, D=128), and their ratio
    (below 1 is the target)."""
    step = DecodeStep(num_seqs, windows=windows)
    slots, _, _ = step()
    config = CacheConfig(num_layers=1, num_kv_heads=H, head_dim=D,
                         num_blocks=step.manager.block_pool.num_blocks, block_size=BLOCK_SIZE)
    pool = KVPool(config)
    key = np.random.default_rng(0).standard_normal((num_seqs, H, D), dtype=np.float32)
    ref = get_backend("numpy")
    t_book = median_seconds(step)
    t_write = median_seconds(lambda: ref.write(pool, 0, key, key, slots))
    return {"bookkeeping_s": t_book, "numpy_write_s": t_write, "ratio": t_book / t_write}


def window_memory(context: int = 32768, window: int = 1024, sliding: int = 5, full: int = 1,
                  block_size: int = BLOCK_SIZE) -> dict[str, float]:
    """Blocks one sequence of ``context`` tokens holds in a Gemma-3-shaped cache (``sliding``
    layers with a ``window``, ``full`` layers of full attention, a layer group each), after
    its prefill and one decode step through :class:`~pagedkv.PagedKVCache`, against the
    blocks it would hold if the sliding layers kept everything; and the share saved."""
    groups = [LayerGroup((i,), window) for i in range(sliding)] + [LayerGroup((sliding + i,)) for i in range(full)]
    kept = (sliding + full) * cdiv(context, block_size)
    config = CacheConfig(num_layers=sliding + full, num_kv_heads=1, head_dim=1, num_blocks=kept,
                         block_size=block_size, layer_groups=groups)
    cache = PagedKVCache(config, backend="numpy", enable_prefix_caching=False)
    seq = cache.add_sequence().seq_id
    cache.begin_step([seq], [context - 1])
    cache.begin_step([seq], [1])
    cache.end_step()
    held = sum(cache.stats()["blocks_per_group"])
    return {"blocks_freeing": held, "blocks_keeping": kept, "saved": 1 - held / kept}


# ---- the GPU side: the same workloads on the device, and the GPU peers -----------------------

def on_gpu(w: Workload) -> Workload:
    """The workload with its pool and every array moved to the GPU (numba device arrays)."""
    from numba import cuda

    pool = KVPool(w.config, device="cuda")
    pool.data.copy_to_device(w.pool.data)
    dev = cuda.to_device
    return Workload(w.config, pool, dev(w.key), dev(w.value), dev(w.slots), dev(w.tables), dev(w.lens),
                    dev(w.src), dev(w.dst))


def gpu_sync() -> None:
    """Wait for the GPU (a timing must include the kernels, not only their launch)."""
    from numba import cuda

    cuda.synchronize()


def device_copy(nbytes: int) -> Callable[[], None]:
    """A device-to-device copy of ``nbytes / 2`` bytes: the GPU's bandwidth limit."""
    from numba import cuda

    n = max(1, nbytes // 8)
    src = cuda.to_device(np.random.default_rng(1).standard_normal(n, dtype=np.float32))
    dst = cuda.device_array_like(src)
    return lambda: dst.copy_to_device(src)


def step_overhead_calls(backend) -> dict[str, Callable[[], object]]:
    """A tiny decode step on the GPU (2 sequences, 16 tokens, one block each: no work to speak of)
    and its per-layer calls, beside an empty numba-cuda launch of one argument: what each costs is
    the host's checks, numba-cuda's argument marshalling and the launch."""
    from numba import cuda

    config = CacheConfig(num_layers=1, num_kv_heads=8, head_dim=128, num_blocks=2, block_size=16)
    pool = KVPool(config, device="cuda")
    step = backend.plan(pool, slot_mapping=np.array([15, 31]), block_tables=np.array([[0], [1]], np.int32),
                        context_lens=np.array([16, 16], np.int32))
    key = cuda.to_device(np.ones((2, 8, 128), np.float32))
    q = cuda.to_device(np.ones((2, 32, 128), np.float32))

    @cuda.jit
    def empty(x):
        pass

    return {"write_step": lambda: backend.write_step(pool, 0, key, key, step),
            "attention_step": lambda: backend.attention_step(q, pool, 0, step),
            "empty_launch": lambda: empty[1, 1](key)}


def gpu_peer(w: Workload, routine: str, library: str) -> Callable[[], object] | None:
    """The routine with CuPy (``library="cupy"``) or torch CUDA fancy indexing on the device
    pool's own memory; None when that library is missing."""
    try:
        lib = __import__(library)
    except ImportError:
        return None
    if library == "cupy":
        wrap = lib.asarray
    else:
        wrap = lambda x: lib.as_tensor(x, device="cuda")  # noqa: E731
    k, v = wrap(w.pool.k(0)), wrap(w.pool.v(0))
    nhd = w.config.layout == "NHD"
    slots = wrap(w.slots)
    blocks, pos = split_slot(slots, BLOCK_SIZE)
    if routine == "write":
        key, value = wrap(w.key), wrap(w.value)
        def f():
            if nhd:
                k[blocks, pos] = key
                v[blocks, pos] = value
            else:
                k[blocks, :, pos] = key
                v[blocks, :, pos] = value
        return f
    if routine == "gather":
        g = wrap(gather_slots(w.tables.copy_to_host(), w.lens.copy_to_host(), BLOCK_SIZE))
        gb, gp = split_slot(g, BLOCK_SIZE)
        if nhd:
            return lambda: (k[gb, gp], v[gb, gp])
        return lambda: (k[gb, :, gp], v[gb, :, gp])
    if routine == "copy_blocks":
        src, dst = wrap(w.src), wrap(w.dst)
        def f():
            k[dst] = k[src]
            v[dst] = v[src]
        return f
    raise ValueError(routine)


@dataclass
class AttentionWorkload:
    """Decode attention: ``batch`` sequences of ``context`` tokens in random block order."""

    pool: KVPool
    q: np.ndarray
    tables: np.ndarray
    lens: np.ndarray
    dense_k: np.ndarray  # [B, H, L, D]: the same K/V held contiguously (torch's input)
    dense_v: np.ndarray

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V the attention must read."""
        return 2 * int(self.lens.sum()) * self.pool.config.num_kv_heads * self.pool.config.head_dim * 4


def make_attention_workload(batch: int = 32, context: int = 2048, q_heads: int = 32, heads: int = H,
                            head_dim: int = D, layout: str = "NHD", seed: int = 0,
                            dtype: str = "float32") -> AttentionWorkload:
    """The decode shape of the attention targets (B=32, context 2048, Hq=32, H=8, D=128), with
    K/V stored as ``dtype``."""
    rng = np.random.default_rng(seed)
    per_seq = cdiv(context, BLOCK_SIZE)
    config = CacheConfig(num_layers=1, num_kv_heads=heads, head_dim=head_dim, num_blocks=batch * per_seq,
                         block_size=BLOCK_SIZE, layout=layout, dtype=dtype)
    pool = KVPool(config)
    tables = rng.permutation(config.num_blocks).reshape(batch, per_seq).astype(np.int32)
    lens = np.full(batch, context, dtype=np.int32)
    dense_k = rng.standard_normal((batch, heads, context, head_dim), dtype=np.float32)
    dense_v = rng.standard_normal((batch, heads, context, head_dim), dtype=np.float32)
    slots = gather_slots(tables, lens, BLOCK_SIZE)
    as_tokens = lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(-1, heads, head_dim))  # noqa: E731
    get_backend("auto").write(pool, 0, as_tokens(dense_k), as_tokens(dense_v), slots)
    q = rng.standard_normal((batch, q_heads, head_dim), dtype=np.float32)
    return AttentionWorkload(pool, q, tables, lens, dense_k, dense_v)


def attention_call(backend, w: AttentionWorkload) -> Callable[[], object]:
    """One decode ``paged_attention`` call of ``backend``."""
    return lambda: backend.paged_attention(w.q, w.pool, 0, w.tables, w.lens)


def torch_sdpa(w: AttentionWorkload) -> Callable[[], object] | None:
    """torch CPU ``scaled_dot_product_attention`` on the dense copy (GQA), or None without torch."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    q = torch.from_numpy(w.q)[:, :, None, :]  # [B, Hq, 1, D]
    k, v = torch.from_numpy(w.dense_k), torch.from_numpy(w.dense_v)
    return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def measure_attention(layout: str = "NHD") -> dict[str, float | None]:
    """numba decode attention beside the copy limit and torch SDPA (medians, one process)."""
    w = make_attention_workload(layout=layout)
    t = median_seconds(attention_call(get_backend("numba"), w), repeat=5)
    t_copy = copy_limit_seconds(w.kv_bytes * 2)  # a copy that reads as many bytes (and writes them)
    sdpa = torch_sdpa(w)
    t_torch = median_seconds(sdpa, repeat=5) if sdpa else None
    return {
        "seconds": t,
        "gbps": w.kv_bytes / t / 1e9,
        "copy_read_gbps": w.kv_bytes / t_copy / 1e9,
        "vs_copy": t_copy / t,
        "vs_torch_sdpa": t_torch / t if t_torch else None,
    }


def measure_prefill(context: int = 2048, q_heads: int = 32, heads: int = H, head_dim: int = D,
                    layout: str = "NHD") -> dict[str, float | None]:
    """Causal prefill of one ``context``-token sequence (every position a query, Hq=32, H=8,
    D=128, blocks in random order): numba's tiled attention beside torch CPU
    ``scaled_dot_product_attention(is_causal=True)`` on a dense copy of the same K/V (medians)."""
    rng = np.random.default_rng(0)
    config = CacheConfig(num_layers=1, num_kv_heads=heads, head_dim=head_dim, num_blocks=cdiv(context, BLOCK_SIZE),
                         block_size=BLOCK_SIZE, layout=layout)
    pool = KVPool(config)
    tables = rng.permutation(config.num_blocks).astype(np.int32)[None]
    lens = np.array([context], np.int32)
    k = rng.standard_normal((context, heads, head_dim), dtype=np.float32)
    v = rng.standard_normal((context, heads, head_dim), dtype=np.float32)
    numba = get_backend("numba")
    numba.write(pool, 0, k, v, gather_slots(tables, lens, BLOCK_SIZE))
    q = rng.standard_normal((context, q_heads, head_dim), dtype=np.float32)
    t = median_seconds(lambda: numba.paged_attention(q, pool, 0, tables, lens, query_lens=lens), repeat=3)
    t_torch = None
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        pass
    else:
        dense = [torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2)))[None] for x in (q, k, v)]
        t_torch = median_seconds(lambda: F.scaled_dot_product_attention(*dense, is_causal=True, enable_gqa=True),
                                 repeat=3)
    return {"seconds": t, "torch_seconds": t_torch, "vs_torch_sdpa": t_torch / t if t_torch else None}


def on_gpu_attention(w: AttentionWorkload) -> AttentionWorkload:
    """The attention workload with its pool, queries and tables on the GPU."""
    from numba import cuda

    pool = KVPool(w.pool.config, device="cuda")
    pool.data.copy_to_device(w.pool.data)
    return AttentionWorkload(pool, cuda.to_device(w.q), cuda.to_device(w.tables), cuda.to_device(w.lens),
                             w.dense_k, w.dense_v)


def measure_format_attention(dtype: str, layout: str = "NHD") -> dict[str, float]:
    """numba decode attention over a ``dtype`` pool beside the same over a float32 pool, in one
    process (medians): ``vs_float32`` is the ratio of tokens per second (above 1: faster)."""
    backend = get_backend("numba")
    narrow = make_attention_workload(layout=layout, dtype=dtype)
    t = median_seconds(attention_call(backend, narrow), repeat=5)
    t32 = median_seconds(attention_call(backend, make_attention_workload(layout=layout)), repeat=5)
    return {"seconds": t, "float32_seconds": t32, "vs_float32": t32 / t}


def measure_format_routine(routine: str, dtype: str, layout: str = "NHD") -> dict[str, float]:
    """A numba routine at the prefill shape on a ``dtype`` pool, beside a contiguous copy of
    the same stored bytes (read plus written), in one process (medians)."""
    w = make_workload("prefill", layout)
    pool = KVPool(CacheConfig(num_layers=1, num_kv_heads=H, head_dim=D, num_blocks=w.config.num_blocks,
                              block_size=BLOCK_SIZE, layout=layout, dtype=dtype))
    get_backend("numba").write(pool, 0, w.key, w.value, w.slots)  # real numbers in the pool
    w = Workload(pool.config, pool, w.key, w.value, w.slots, w.tables, w.lens, w.src, w.dst)
    # bytes read plus written: float32 tokens in and the stored width out (or back); whole stored blocks
    stored = pool.config.format.itemsize / 4
    n = bytes_moved(w, routine) if routine == "copy_blocks" else int(w.token_bytes * (1 + stored))
    t = median_seconds(backend_call(get_backend("numba"), w, routine))
    t_copy = copy_limit_seconds(n)
    return {"seconds": t, "vs_copy": t_copy / t}
