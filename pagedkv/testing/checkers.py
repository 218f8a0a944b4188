"""Check anyone's paged-KV kernel against pagedkv's exact reference, in one call.

Each ``check_*`` function runs your function on cases drawn by hypothesis,
compares what it did with the numpy reference, and on a mismatch raises
:class:`KernelMismatch` (an ``AssertionError``) for the smallest failing case
hypothesis finds, naming the first wrong element by its coordinates::

    write: first difference at layer 0, V, block 2, position 1 (slot 9), head 0, dim 3:
    expected 0.25, got -1.5 (12 elements differ)
    case: {'layout': 'NHD', 'num_blocks': 3, 'block_size': 4, ..., 'slot_mapping': [9, -1]}

Conventions (``convention=``), the shapes your function receives:

``"pagedkv"``
    pagedkv's own signatures on a :class:`~pagedkv.KVPool` (both layouts):
    ``write(pool, layer, key, value, slot_mapping)``, ``read(pool, layer,
    slot_mapping)``, ``gather(pool, layer, block_tables, context_lens)`` (returning
    key and value, and, as pagedkv's does, ``cu_seqlens``, which is checked too),
    ``copy_blocks(pool, src, dst)``, ``swap_blocks(src_pool, dst_pool, src,
    dst)``, ``paged_attention(q, pool, layer, block_tables, context_lens,
    scale=..., query_lens=...)``.
``"vllm"`` / ``"hnd"``
    separate K and V caches per layer, ``[num_blocks, block_size, H, D]``
    (vLLM's flash layout) or ``[num_blocks, H, block_size, D]``:
    ``write(key, value, key_cache, value_cache, slot_mapping)`` (in place),
    ``read(key_cache, value_cache, slot_mapping) -> (key, value)``,
    ``gather(key_cache, value_cache, block_tables, context_lens) -> (key, value)``,
    ``copy_blocks(key_caches, value_caches, block_mapping)`` (lists over
    layers; ``block_mapping`` int64 ``[N, 2]`` of (src, dst)),
    ``swap_blocks(src_cache, dst_cache, block_mapping)`` (called for each
    layer's K and V cache), ``paged_attention(q, key_cache, value_cache,
    block_tables, context_lens, scale, query_lens) -> out``.
``"flashinfer"``
    vLLM-shaped caches with FlashInfer's page lists: ``gather(key_cache,
    value_cache, kv_indptr, kv_indices, kv_last_page_len) -> (key, value)``
    and ``paged_attention(q, key_cache, value_cache, kv_indptr, kv_indices,
    kv_last_page_len, scale) -> out`` (decode).

Arrays are numpy unless you pass ``to_user`` (numpy -> your array type: a
torch or CuPy converter) and ``from_user`` (back to numpy).

Storage formats (``dtype=``, a name or a list of names of
:data:`pagedkv.formats.FORMATS`): in the ``"pagedkv"`` convention the pool
carries the format, its raw elements and its scales (fp8's per-layer
``kv_scales``, int8's per-(token, head) ``scales``); every stored byte and
scale is compared, so truncation instead of round-to-nearest-even, a scale
applied twice or a scale left behind by ``copy_blocks`` is found and named.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..backends import reference as ref
from ..config import CacheConfig
from ..formats import get_format
from ..layout import decode_offset, page_lists
from ..pool import KVPool
from . import strategies as pst
from .tolerance import RTOL, attention_atol, score_bound

__all__ = [
    "KernelMismatch", "check_write", "check_read", "check_gather", "check_copy_blocks",
    "check_swap_blocks", "check_paged_attention",
]

CONVENTIONS = ("pagedkv", "vllm", "hnd", "flashinfer")


class KernelMismatch(AssertionError):
    """A kernel disagreed with the reference.

    Attributes:
        case: the (smallest) failing case, as a dict of plain values.
        where: coordinates of the first wrong element (``layer``, ``kv``, ``block``,
            ``pos``, ``head``, ``dim``, ``slot`` for the pool; ``row``, ``head``,
            ``dim`` and, where known, ``sequence`` and ``pos`` for an output).
    """

    def __init__(self, message: str, case: dict, where: dict) -> None:
        super().__init__(f"{message}\ncase: {case}")
        self.case, self.where = case, where


def _identity(x):
    return x


def _layouts(convention: str):
    return {"pagedkv": ("NHD", "HND"), "vllm": ("NHD",), "hnd": ("HND",), "flashinfer": ("NHD",)}[convention]


def _configs(convention: str, dtype: str | Sequence[str] = "float32", **sizes):
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    dtypes = tuple(get_format(d).name for d in ((dtype,) if isinstance(dtype, str) else dtype))
    if convention != "pagedkv" and dtypes != ("float32",):
        raise ValueError(f"dtype={dtype!r}: storage formats other than float32 are checked in the 'pagedkv' "
                         "convention (the pool carries the scales); other conventions take float32 caches")
    limits = dict(max_layers=2, max_kv_heads=3, max_head_dim=8, max_blocks=6, max_block_size=4)
    limits.update(sizes)
    return pst.configs(layouts=_layouts(convention), dtypes=dtypes, **limits)


def _run(test, max_examples: int) -> None:
    settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
             suppress_health_check=list(HealthCheck))(test)()


def _case(config: CacheConfig, **extra) -> dict:
    out = dict(layout=config.layout, num_layers=config.num_layers, num_blocks=config.num_blocks,
               block_size=config.block_size, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim)
    out.update({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in extra.items()})
    return out


# ---- the user's view of a pool -----------------------------------------------------------------

def _caches(pool: KVPool, to_user) -> tuple[list, list]:
    """Per-layer K and V caches (copies, in the pool's layout) as the user's arrays."""
    return ([to_user(np.array(pool.k(i))) for i in range(pool.config.num_layers)],
            [to_user(np.array(pool.v(i))) for i in range(pool.config.num_layers)])


def _flat(config: CacheConfig, k_caches, v_caches, from_user) -> np.ndarray:
    """Per-layer caches back into the flat pool order: layer by layer, K then V."""
    parts = []
    for k, v in zip(k_caches, v_caches, strict=True):
        parts += [np.asarray(from_user(k), dtype=np.float32).reshape(-1),
                  np.asarray(from_user(v), dtype=np.float32).reshape(-1)]
    return np.concatenate(parts)


def _same(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Elementwise equality, a NaN equal to a NaN (float arrays)."""
    if expected.dtype.kind != "f":
        return actual == expected
    return (actual == expected) | (np.isnan(actual) & np.isnan(expected))


def _compare_pool(what: str, expected: KVPool, actual: np.ndarray, case: dict, scales=None) -> None:
    """The pool's elements (in its storage dtype) and, for int8, ``scales``, against the reference."""
    if actual.shape != expected.host.shape:
        raise KernelMismatch(f"{what}: the pool has {actual.size} elements, expected {expected.host.size}", case, {})
    if actual.dtype != expected.host.dtype:
        raise KernelMismatch(f"{what}: the pool holds {actual.dtype}, expected {expected.host.dtype}", case, {})
    bad = np.flatnonzero(~_same(actual, expected.host))
    if not bad.size and expected.scales is not None:
        _compare_scales(what, expected, np.asarray(scales), case)
    if bad.size:
        i = int(bad[0])
        w = decode_offset(expected.strides, i)
        raise KernelMismatch(
            f"{what}: first difference at layer {w['layer']}, {w['kv']}, block {w['block']}, position {w['pos']} "
            f"(slot {w['slot']}), head {w['head']}, dim {w['dim']}: expected {float(expected.host[i]):.9g}, "
            f"got {float(actual[i]):.9g} ({bad.size} elements differ)", case, w)


def _compare_scales(what: str, expected: KVPool, actual: np.ndarray, case: dict) -> None:
    bad = np.flatnonzero(~_same(actual, expected.host_scales))
    if bad.size:
        i, s = int(bad[0]), expected.strides
        per_kv = s.num_blocks * s.block_size * s.num_kv_heads
        layer_kv, rest = divmod(i, per_kv)
        slot, head = divmod(rest, s.num_kv_heads)
        w = {"layer": layer_kv // 2, "kv": "KV"[layer_kv % 2], "slot": slot, "head": head}
        raise KernelMismatch(
            f"{what}: first difference at layer {w['layer']}, {w['kv']}, slot {slot}, head {head} (its int8 scale): "
            f"expected {float(expected.host_scales[i]):.9g}, got {float(actual[i]):.9g} "
            f"({bad.size} scales differ)", case, w)


def _user_pool(pool: KVPool, from_user) -> tuple[np.ndarray, np.ndarray | None]:
    """A pagedkv-convention pool's elements and int8 scales, through ``from_user``."""
    return (np.asarray(from_user(pool.data)),
            None if pool.scales is None else np.asarray(from_user(pool.scales)))


def _compare_rows(what: str, expected: np.ndarray, actual, case: dict, rows: Callable[[int], dict] | None,
                  rtol: float = 0.0, atol=0.0) -> None:
    actual = np.asarray(actual)
    if actual.shape != expected.shape:
        raise KernelMismatch(f"{what}: result has shape {list(actual.shape)}, expected {list(expected.shape)}",
                             case, {})
    close = np.isclose(actual, expected, rtol=rtol, atol=atol) if (rtol or np.any(atol)) else actual == expected
    bad = np.argwhere(~close)
    if bad.size:
        r, h, d = (int(x) for x in bad[0])
        where = {"row": r, "head": h, "dim": d, **(rows(r) if rows else {})}
        place = ", ".join(f"{k} {v}" for k, v in where.items())
        raise KernelMismatch(
            f"{what}: first difference at {place}: expected {float(expected[r, h, d]):.9g}, "
            f"got {float(actual[r, h, d]):.9g} "
            f"({len(bad)} elements differ{'' if not rtol else f', rtol={rtol:.1e}'})", case, where)


def _row_in_sequence(lens: np.ndarray, query_lens: np.ndarray | None = None, *, decode: bool = False):
    """Map an output row to its (sequence, position): packed by ``lens`` (gather), by
    ``query_lens`` (variable-length attention), or one row a sequence (``decode``)."""
    if decode:
        return lambda r: {"sequence": r, "pos": int(lens[r]) - 1}
    counts = lens if query_lens is None else query_lens
    cu = np.concatenate([[0], np.cumsum(counts)])

    def where(r):
        b = int(np.searchsorted(cu, r, side="right") - 1)
        pos = r - int(cu[b]) if query_lens is None else int(lens[b] - query_lens[b] + r - cu[b])
        return {"sequence": b, "pos": pos}
    return where


# ---- checkers ----------------------------------------------------------------------------------

def check_write(fn: Callable, *, convention: str = "pagedkv", dtype: str | Sequence[str] = "float32",
                max_examples: int = 100,
                to_user: Callable = _identity, from_user: Callable = _identity) -> None:
    """Check a ``write`` / ``reshape_and_cache`` kernel: every byte of the cache afterwards,
    with padding (negative) slots mixed in anywhere."""
    @given(_configs(convention, dtype), st.data(), st.integers(0, 2**32 - 1))
    def test(config, data, seed):
        expected = pst.filled_pool(config, seed)
        slots = data.draw(pst.slot_mappings(config, max_tokens=10), label="slot_mapping")
        layer = data.draw(st.integers(0, config.num_layers - 1), label="layer")
        key, value = pst.token_arrays(config, len(slots), seed + 1)
        case = _case(config, layer=layer, slot_mapping=slots)
        if convention == "pagedkv":
            actual = pst.filled_pool(config, seed)
            fn(actual, layer, to_user(key), to_user(value), to_user(slots))
            got, scales = _user_pool(actual, from_user)
        else:
            ks, vs = _caches(expected, to_user)
            fn(to_user(key), to_user(value), ks[layer], vs[layer], to_user(slots))
            got, scales = _flat(config, ks, vs, from_user), None
        ref.write(expected, layer, key, value, slots)
        _compare_pool("write", expected, got, case, scales)
    _run(test, max_examples)


def check_read(fn: Callable, *, convention: str = "pagedkv", dtype: str | Sequence[str] = "float32",
               max_examples: int = 100,
               to_user: Callable = _identity, from_user: Callable = _identity) -> None:
    """Check a ``read`` kernel (slots may repeat; padding must read as zeros)."""
    @given(_configs(convention, dtype), st.data(), st.integers(0, 2**32 - 1))
    def test(config, data, seed):
        pool = pst.filled_pool(config, seed)
        slots = data.draw(pst.slot_mappings(config, max_tokens=10, unique=False), label="slot_mapping")
        layer = data.draw(st.integers(0, config.num_layers - 1), label="layer")
        case = _case(config, layer=layer, slot_mapping=slots)
        if convention == "pagedkv":
            got = fn(pool, layer, to_user(slots))
        else:
            ks, vs = _caches(pool, to_user)
            got = fn(ks[layer], vs[layer], to_user(slots))
        for name, want, g in zip(("K", "V"), ref.read(pool, layer, slots), got, strict=True):
            _compare_rows(f"read ({name})", want, from_user(g), case,
                          lambda r: {"slot": int(slots[r])})
    _run(test, max_examples)


def check_gather(fn: Callable, *, convention: str = "pagedkv", dtype: str | Sequence[str] = "float32",
                 max_examples: int = 100,
                 to_user: Callable = _identity, from_user: Callable = _identity) -> None:
    """Check a ``gather`` kernel: block tables with shared and repeated blocks, empty sequences."""
    @given(_configs(convention, dtype), st.data(), st.integers(0, 2**32 - 1))
    def test(config, data, seed):
        pool = pst.filled_pool(config, seed)
        tables, lens = data.draw(pst.block_tables(config, max_seqs=3, max_blocks_per_seq=3), label="tables")
        layer = 0 if convention == "flashinfer" else data.draw(st.integers(0, config.num_layers - 1))
        case = _case(config, layer=layer, block_tables=tables, context_lens=lens)
        if convention == "pagedkv":
            got = fn(pool, layer, to_user(tables), to_user(lens))
        elif convention == "flashinfer":
            ks, vs = _caches(pool, to_user)
            indptr, indices, last = page_lists(tables, lens, config.block_size)
            got = fn(ks[0], vs[0], to_user(indptr), to_user(indices), to_user(last))
        else:
            ks, vs = _caches(pool, to_user)
            got = fn(ks[layer], vs[layer], to_user(tables), to_user(lens))
        want_k, want_v, want_cu = ref.gather(pool, layer, tables, lens)
        got = list(got)
        if convention == "pagedkv" and len(got) == 3:  # pagedkv's own gather returns cu_seqlens too
            if not np.array_equal(np.asarray(from_user(got[2])), want_cu):
                raise KernelMismatch(f"gather: cu_seqlens {np.asarray(from_user(got[2])).tolist()}, expected "
                                     f"{want_cu.tolist()}", case, {})
            got = got[:2]
        for name, want, g in zip(("K", "V"), (want_k, want_v), got, strict=True):
            _compare_rows(f"gather ({name})", want, from_user(g), case, _row_in_sequence(lens))
    _run(test, max_examples)


def check_copy_blocks(fn: Callable, *, convention: str = "pagedkv", dtype: str | Sequence[str] = "float32",
                      max_examples: int = 100,
                      to_user: Callable = _identity, from_user: Callable = _identity) -> None:
    """Check a ``copy_blocks`` kernel: every layer, K and V, and nothing else touched."""
    @given(_configs(convention, dtype), st.data(), st.integers(0, 2**32 - 1))
    def test(config, data, seed):
        expected = pst.filled_pool(config, seed)
        src, dst = data.draw(pst.block_copies(config), label="copies")
        case = _case(config, src=src, dst=dst)
        if convention == "pagedkv":
            actual = pst.filled_pool(config, seed)
            fn(actual, to_user(src), to_user(dst))
            got, scales = _user_pool(actual, from_user)
        else:
            ks, vs = _caches(expected, to_user)
            fn(ks, vs, to_user(np.stack([src, dst], axis=1)))
            got, scales = _flat(config, ks, vs, from_user), None
        ref.copy_blocks(expected, src, dst)
        _compare_pool("copy_blocks", expected, got, case, scales)
    _run(test, max_examples)


def check_swap_blocks(fn: Callable, *, convention: str = "pagedkv", dtype: str | Sequence[str] = "float32",
                      max_examples: int = 100,
                      to_user: Callable = _identity, from_user: Callable = _identity) -> None:
    """Check a ``swap_blocks`` kernel between two pools (or two caches) of one geometry."""
    @given(_configs(convention, dtype), st.data(), st.integers(0, 2**32 - 1))
    def test(config, data, seed):
        source = pst.filled_pool(config, seed)
        expected = pst.filled_pool(config, seed + 1)
        actual = pst.filled_pool(config, seed + 1)
        for layer in range(config.num_layers if source.kv_scales is not None else 0):
            for pool in (expected, actual):  # fp8 blocks move only between pools of like scales
                pool.set_kv_scales(layer, *source.kv_scales[layer])
        src, dst = data.draw(pst.block_copies(config, same_pool=False), label="copies")
        case = _case(config, src=src, dst=dst)
        scales = None
        if convention == "pagedkv":
            fn(source, actual, to_user(src), to_user(dst))
            got, scales = _user_pool(actual, from_user)
        else:
            sk, sv = _caches(source, to_user)
            dk, dv = _caches(expected, to_user)
            mapping = to_user(np.stack([src, dst], axis=1))
            for s, d in zip(sk + sv, dk + dv, strict=True):
                fn(s, d, mapping)
            got = _flat(config, dk, dv, from_user)
        ref.swap_blocks(source, expected, src, dst)
        _compare_pool("swap_blocks", expected, got, case, scales)
    _run(test, max_examples)


def check_paged_attention(fn: Callable, *, convention: str = "pagedkv", dtype: str | Sequence[str] = "float32",
                          max_examples: int = 100,
                          rtol: float | None = None, atol: float | None = None, varlen: bool = True,
                          to_user: Callable = _identity, from_user: Callable = _identity) -> None:
    """Check a paged attention kernel against the float64 reference.

    Cases cover grouped-query heads (Hq = 1..3 x H), random block tables,
    context lengths from 0 up to several blocks, variable-length causal
    queries (``varlen``; not for ``"flashinfer"``), and inputs large enough to
    overflow a softmax that does not subtract the max. The default tolerance
    is :mod:`pagedkv.testing.tolerance`'s bound for float32 kernels.
    """
    @given(_configs(convention, dtype), st.data(), st.integers(0, 2**32 - 1))
    def test(config, data, seed):
        rng = np.random.default_rng(seed)
        magnitude = data.draw(st.sampled_from([1.0, 1.0, 30.0]), label="magnitude")  # 30: exp overflows unshifted
        pool = pst.filled_pool(config, seed, magnitude)
        tables, lens = data.draw(pst.block_tables(config, max_seqs=3, max_blocks_per_seq=3), label="tables")
        group = data.draw(st.integers(1, 3), label="group")
        layer = 0 if convention != "pagedkv" else data.draw(st.integers(0, config.num_layers - 1))
        query_lens = None
        if varlen and convention != "flashinfer" and data.draw(st.booleans(), label="varlen"):
            query_lens = np.array([data.draw(st.integers(0, min(int(n), 4))) for n in lens], dtype=np.int32)
        rows = len(lens) if query_lens is None else int(query_lens.sum())
        q = (rng.standard_normal((rows, config.num_kv_heads * group, config.head_dim), dtype=np.float32)
             * np.float32(magnitude))
        scale = 1.0 / np.sqrt(config.head_dim)
        case = _case(config, layer=layer, block_tables=tables, context_lens=lens, query_heads=q.shape[1],
                     query_lens=query_lens, magnitude=magnitude)
        if convention == "pagedkv":
            got = fn(to_user(q), pool, layer, to_user(tables), to_user(lens), scale=scale,
                     query_lens=None if query_lens is None else to_user(query_lens))
        elif convention == "flashinfer":
            ks, vs = _caches(pool, to_user)
            indptr, indices, last = page_lists(tables, lens, config.block_size)
            got = fn(to_user(q), ks[0], vs[0], to_user(indptr), to_user(indices), to_user(last), scale)
        else:
            ks, vs = _caches(pool, to_user)
            got = fn(to_user(q), ks[layer], vs[layer], to_user(tables), to_user(lens), scale,
                     None if query_lens is None else to_user(query_lens))
        want = ref.paged_attention(q, pool, layer, tables, lens, scale=scale, query_lens=query_lens)
        kv_max = max(float(np.abs(pool.k_decoded(i)).max()) for i in range(config.num_layers))
        kv_max = max([kv_max] + [float(np.abs(pool.v_decoded(i)).max()) for i in range(config.num_layers)])
        q_max = float(np.abs(q).max(initial=0.0))
        bound = atol if atol is not None else attention_atol(
            int(lens.max(initial=0)), config.head_dim, kv_max, score_bound(config.head_dim, scale, q_max, kv_max))
        _compare_rows("paged_attention", want, from_user(got), case,
                      _row_in_sequence(lens, query_lens, decode=query_lens is None),
                      rtol=RTOL if rtol is None else rtol, atol=max(bound, 1e-30))
    _run(test, max_examples)
