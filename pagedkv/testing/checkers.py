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
    dst)``, ``paged_attention(q, pool, layer, block_tables, context_lens, *,
    scale, query_lens, soft_cap, sliding_window)``.
``"vllm"``, ``"hnd"``, ``"vllm_paged"``, ``"vllm_cpu"``, ``"flashinfer_nhd"``, ``"flashinfer_hnd"``, ``"transformers"``
    each layer's caches in that layout of :mod:`pagedkv.memory.conventions` (``caches``: K and
    V caches, or one K/V tensor): ``write(key, value, *caches, slot_mapping)`` (in place),
    ``read(*caches, slot_mapping) -> (key, value)``, ``gather(*caches, block_tables,
    context_lens) -> (key, value)``, ``copy_blocks(*per-kind lists over layers,
    block_mapping)`` (``block_mapping`` int64 ``[N, 2]`` of (src, dst)),
    ``swap_blocks(src_cache, dst_cache, block_mapping)`` (called for each cache of each
    layer), ``paged_attention(q, *caches, block_tables, context_lens, scale, query_lens, *,
    soft_cap, sliding_window)``.
    ``"transformers"`` (K and V ``[num_blocks * block_size, H, D]``, a row per slot) has no
    block size in its shapes: ``write`` and ``read`` only.
``"flashinfer"``
    vLLM-shaped caches with FlashInfer's page lists: ``gather(key_cache, value_cache,
    kv_indptr, kv_indices, kv_last_page_len)`` and ``paged_attention(q, key_cache,
    value_cache, kv_indptr, kv_indices, kv_last_page_len, scale, *, soft_cap,
    sliding_window)`` (decode).

``soft_cap`` and ``sliding_window`` (each None or a value) are keyword arguments, passed
unless ``check_paged_attention(soft_cap=False, sliding_window=False)``. A function whose
signature cannot take the call gets a :class:`KernelSignatureError` of one line saying the
call; a function that raises gets a :class:`KernelMismatch` with the case it raised on.

Arrays are numpy unless you pass ``to_user`` (numpy -> your array type: a
torch or CuPy converter) and ``from_user`` (back to numpy).

Storage formats (``dtype=``, names of :data:`pagedkv.geometry.formats.FORMATS`): every stored
byte is compared, so truncation instead of round-to-nearest-even is found and named.
float16 and bfloat16 caches work in every convention, and fp8 too, with vLLM's scale
convention: a per-layer, per-tensor ``k_scale`` and ``v_scale`` (stored = fp8(x / scale)),
passed to your function as two more arguments, floats, after the others, to ``write``,
``read``, ``gather`` and ``paged_attention`` (``copy_blocks`` and ``swap_blocks`` move
bytes and take none). int8 stores a float32 scale per token and head (x = int8 * scale,
scale = max|x| / 127 over the head's row): in the layout conventions, each layer's caches
are followed by two more, ``k_scales`` and ``v_scales`` ``[num_blocks, block_size, H]``,
which your kernels write, read and copy like the caches (a scale applied twice, or left
behind by ``copy_blocks``, is found and named in every convention).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..backends import reference as ref
from ..errors import PagedKVError, ShapeError
from ..geometry.config import CacheConfig
from ..geometry.formats import get_format
from ..geometry.layout import K, V, page_lists, scale_index
from ..memory.conventions import CONVENTIONS as LAYOUT_CONVENTIONS
from ..memory.conventions import from_convention, to_convention
from ..memory.pool import KVPool
from . import strategies as pst
from .compare import KernelMismatch, compare_pool, compare_rows, row_in_sequence
from .tolerance import RTOL, attention_atol, score_bound

__all__ = [
    "KernelMismatch", "KernelSignatureError", "check_write", "check_read", "check_gather", "check_copy_blocks",
    "check_swap_blocks", "check_paged_attention",
]

#: pagedkv's own, "flashinfer" (page lists over vLLM-shaped caches), and the layouts of pagedkv.memory.conventions;
#: transformers' rows per slot carry no block size, which block tables and block copies need: write and read only
CONVENTIONS = ("pagedkv", "flashinfer", *LAYOUT_CONVENTIONS)
SLOT_ONLY = ("transformers",)


def _identity(x):
    return x


def _layouts(convention: str):
    # The pool's layout shows only in the pagedkv convention; the others convert from either.
    return {"vllm": ("NHD",), "hnd": ("HND",), "flashinfer": ("NHD",)}.get(convention, ("NHD", "HND"))


def _configs(convention: str, dtype: str | Sequence[str] = "float32", routine: str = "", **sizes):
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if convention in SLOT_ONLY and routine not in ("write", "read"):
        raise ValueError(f"convention {convention!r} (a row per slot, no block size) checks write and read only, "
                         f"not {routine}")
    formats = [get_format(d) for d in ((dtype,) if isinstance(dtype, str) else dtype)]
    limits = dict(max_layers=2, max_kv_heads=3, max_head_dim=8, max_blocks=6, max_block_size=4)
    limits.update(sizes)
    configs = pst.configs(layouts=_layouts(convention), dtypes=tuple(f.name for f in formats), **limits)
    if convention == "vllm_paged":  # 16 bytes of dims packed together: head_dim a multiple of that
        configs = configs.filter(lambda c: c.head_dim % (16 // c.storage_dtype.itemsize) == 0)
    return configs


class KernelSignatureError(TypeError):
    """Your function cannot be called the way its routine's checker calls it (one line: the
    call the checker makes and what your signature says)."""


def _run(test, max_examples: int) -> None:
    """Run a checker's hypothesis test; a failure comes out as one exception for the smallest
    failing case (not a group of every distinct failure found, not hypothesis' report)."""
    try:
        settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
                 report_multiple_bugs=False, suppress_health_check=list(HealthCheck))(test)()
    except KernelSignatureError as e:
        raise KernelSignatureError(str(e)) from None
    except KernelMismatch as e:
        raise KernelMismatch(e.message, e.case, e.where) from e.__cause__


def _call(fn: Callable, routine: str, call: str, case: dict, *args, **kwargs):
    """``fn(*args, **kwargs)``: the user's function, called as ``routine(call)`` says. A signature
    that cannot take those arguments is a KernelSignatureError saying so; an exception the
    function raises is a KernelMismatch with the case it raised on."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without one: the call itself will tell
        signature = None
    if signature is not None:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as e:
            name = getattr(fn, "__qualname__", type(fn).__name__)
            raise KernelSignatureError(f"{routine}: {name}{signature} cannot be called as the checker calls it, "
                                       f"{routine}({call}): {e}") from None
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        raise KernelMismatch(f"{routine}: your function raised {type(e).__name__}: {e}", case, {}) from e


def _case(config: CacheConfig, **extra) -> dict:
    out = dict(layout=config.layout, num_layers=config.num_layers, num_blocks=config.num_blocks,
               block_size=config.block_size, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim)
    out.update({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in extra.items()})
    return out


# ---- the user's view of a pool -----------------------------------------------------------------

def _layout_of(convention: str) -> str:
    return "vllm" if convention == "flashinfer" else convention


def _scale_views(pool: KVPool, layer: int) -> tuple[np.ndarray, ...]:
    """int8: views of the layer's K and V scales as ``[num_blocks, block_size, H]`` (the pool
    keeps them ``[layer][K, V][slot][head]``); other formats: none."""
    if pool.scales is None:
        return ()
    s = pool.strides
    n = s.num_blocks * s.block_size * s.num_kv_heads
    return tuple(pool.host_scales[base:base + n].reshape(s.num_blocks, s.block_size, s.num_kv_heads)
                 for base in (scale_index(layer, kv, 0, 0, s) for kv in (K, V)))


def _caches(pool: KVPool, to_user, convention: str) -> list[tuple]:
    """Each layer's caches in ``convention``'s shapes (see :mod:`pagedkv.memory.conventions`): copies,
    as the user's arrays, a tuple per layer (K and V caches, or one K/V tensor; int8: then
    its K and V scales)."""
    return [tuple(to_user(c.copy()) for c in (*to_convention(pool, _layout_of(convention), i), *_scale_views(pool, i)))
            for i in range(pool.config.num_layers)]


def _flat(config: CacheConfig, caches: list[tuple], from_user, convention: str,
          case: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """The user's per-layer caches back into a pool's flat elements, and int8's scales (a
    KernelMismatch if the function left them in other shapes or dtypes)."""
    pool = KVPool(config)
    for layer, per_layer in enumerate(caches):
        arrays = [np.asarray(from_user(c)) for c in per_layer]
        scales = _scale_views(pool, layer)
        try:
            if scales and any(a.shape != v.shape or a.dtype != v.dtype for a, v in zip(arrays[-2:], scales,
                                                                                        strict=True)):
                raise ShapeError(f"scales must stay float32 {scales[0].shape}")
            for view, got in zip(scales, arrays[len(arrays) - len(scales):], strict=True):
                view[...] = got
            from_convention(pool, _layout_of(convention), layer, tuple(arrays[:len(arrays) - len(scales)]))
        except PagedKVError as e:
            raise KernelMismatch(f"the caches of layer {layer} came back changed in shape or dtype: {e}", case, {}) \
                from None
    return pool.host, pool.scales if pool.scales is None else pool.host_scales


def _names(pool: KVPool, convention: str) -> str:
    """The names of one layer's caches in ``convention``, for a message."""
    caches = "kv_cache" if convention in ("flashinfer_nhd", "flashinfer_hnd", "vllm_cpu") else "key_cache, value_cache"
    return caches + (", k_scales, v_scales" if pool.scales is not None else "")


def _fp8(pool: KVPool) -> str:
    """``", k_scale, v_scale"`` where fp8's per-tensor scales follow the arguments, for a message."""
    return ", k_scale, v_scale" if pool.kv_scales is not None else ""


def _scales(pool: KVPool, layer: int) -> tuple[float, ...]:
    """fp8: the layer's ``(k_scale, v_scale)`` as floats, the extra arguments of a layout
    convention's kernels; other formats: none."""
    scales = pool.kv_scales
    return () if scales is None else (float(scales[layer, 0]), float(scales[layer, 1]))


def _user_pool(pool: KVPool, from_user) -> tuple[np.ndarray, np.ndarray | None]:
    """A pagedkv-convention pool's elements and int8 scales, through ``from_user``."""
    return (np.asarray(from_user(pool.data)),
            None if pool.scales is None else np.asarray(from_user(pool.scales)))


# ---- checkers ----------------------------------------------------------------------------------

def check_write(fn: Callable, *, convention: str = "pagedkv", dtype: str | Sequence[str] = "float32",
                max_examples: int = 100,
                to_user: Callable = _identity, from_user: Callable = _identity) -> None:
    """Check a ``write`` / ``reshape_and_cache`` kernel: every byte of the cache afterwards,
    with padding (negative) slots mixed in anywhere."""
    @given(_configs(convention, dtype, "write"), st.data(), st.integers(0, 2**32 - 1))
    def test(config, data, seed):
        expected = pst.filled_pool(config, seed)
        slots = data.draw(pst.slot_mappings(config, max_tokens=10), label="slot_mapping")
        layer = data.draw(st.integers(0, config.num_layers - 1), label="layer")
        key, value = pst.token_arrays(config, len(slots), seed + 1)
        case = _case(config, layer=layer, slot_mapping=slots)
        if convention == "pagedkv":
            actual = pst.filled_pool(config, seed)
            _call(fn, "write", "pool, layer, key, value, slot_mapping", case, actual, layer, to_user(key),
                  to_user(value), to_user(slots))
            got, scales = _user_pool(actual, from_user)
        else:
            caches = _caches(expected, to_user, convention)
            _call(fn, "write", f"key, value, {_names(expected, convention)}, slot_mapping{_fp8(expected)}", case,
                  to_user(key), to_user(value), *caches[layer], to_user(slots), *_scales(expected, layer))
            got, scales = _flat(config, caches, from_user, convention, case)
        ref.write(expected, layer, key, value, slots)
        compare_pool("write", expected, got, case, scales)
    _run(test, max_examples)


def check_read(fn: Callable, *, convention: str = "pagedkv", dtype: str | Sequence[str] = "float32",
               max_examples: int = 100,
               to_user: Callable = _identity, from_user: Callable = _identity) -> None:
    """Check a ``read`` kernel (slots may repeat; padding must read as zeros)."""
    @given(_configs(convention, dtype, "read"), st.data(), st.integers(0, 2**32 - 1))
    def test(config, data, seed):
        pool = pst.filled_pool(config, seed)
        slots = data.draw(pst.slot_mappings(config, max_tokens=10, unique=False), label="slot_mapping")
        layer = data.draw(st.integers(0, config.num_layers - 1), label="layer")
        case = _case(config, layer=layer, slot_mapping=slots)
        if convention == "pagedkv":
            got = _call(fn, "read", "pool, layer, slot_mapping", case, pool, layer, to_user(slots))
        else:
            got = _call(fn, "read", f"{_names(pool, convention)}, slot_mapping{_fp8(pool)}", case,
                        *_caches(pool, to_user, convention)[layer], to_user(slots), *_scales(pool, layer))
        for name, want, g in zip(("K", "V"), ref.read(pool, layer, slots), got, strict=True):
            compare_rows(f"read ({name})", want, from_user(g), case,
                          lambda r: {"slot": int(slots[r])})
    _run(test, max_examples)


def check_gather(fn: Callable, *, convention: str = "pagedkv", dtype: str | Sequence[str] = "float32",
                 max_examples: int = 100,
                 to_user: Callable = _identity, from_user: Callable = _identity) -> None:
    """Check a ``gather`` kernel: block tables with shared and repeated blocks, empty sequences."""
    @given(_configs(convention, dtype, "gather"), st.data(), st.integers(0, 2**32 - 1))
    def test(config, data, seed):
        pool = pst.filled_pool(config, seed)
        tables, lens = data.draw(pst.block_tables(config, max_seqs=3, max_blocks_per_seq=3), label="tables")
        layer = 0 if convention == "flashinfer" else data.draw(st.integers(0, config.num_layers - 1))
        case = _case(config, layer=layer, block_tables=tables, context_lens=lens)
        if convention == "pagedkv":
            got = _call(fn, "gather", "pool, layer, block_tables, context_lens", case, pool, layer, to_user(tables),
                        to_user(lens))
        elif convention == "flashinfer":
            indptr, indices, last = page_lists(tables, lens, config.block_size)
            got = _call(fn, "gather", f"key_cache, value_cache, kv_indptr, kv_indices, kv_last_page_len{_fp8(pool)}",
                        case, *_caches(pool, to_user, convention)[0], to_user(indptr), to_user(indices),
                        to_user(last), *_scales(pool, 0))
        else:
            got = _call(fn, "gather", f"{_names(pool, convention)}, block_tables, context_lens{_fp8(pool)}", case,
                        *_caches(pool, to_user, convention)[layer], to_user(tables), to_user(lens),
                        *_scales(pool, layer))
        want_k, want_v, want_cu = ref.gather(pool, layer, tables, lens)
        got = list(got)
        if convention == "pagedkv" and len(got) == 3:  # pagedkv's own gather returns cu_seqlens too
            if not np.array_equal(np.asarray(from_user(got[2])), want_cu):
                raise KernelMismatch(f"gather: cu_seqlens {np.asarray(from_user(got[2])).tolist()}, expected "
                                     f"{want_cu.tolist()}", case, {})
            got = got[:2]
        for name, want, g in zip(("K", "V"), (want_k, want_v), got, strict=True):
            compare_rows(f"gather ({name})", want, from_user(g), case, row_in_sequence(lens))
    _run(test, max_examples)


def check_copy_blocks(fn: Callable, *, convention: str = "pagedkv", dtype: str | Sequence[str] = "float32",
                      max_examples: int = 100,
                      to_user: Callable = _identity, from_user: Callable = _identity) -> None:
    """Check a ``copy_blocks`` kernel: every layer, K and V, and nothing else touched."""
    @given(_configs(convention, dtype, "copy_blocks"), st.data(), st.integers(0, 2**32 - 1))
    def test(config, data, seed):
        expected = pst.filled_pool(config, seed)
        src, dst = data.draw(pst.block_copies(config), label="copies")
        case = _case(config, src=src, dst=dst)
        if convention == "pagedkv":
            actual = pst.filled_pool(config, seed)
            _call(fn, "copy_blocks", "pool, src, dst", case, actual, to_user(src), to_user(dst))
            got, scales = _user_pool(actual, from_user)
        else:
            caches = _caches(expected, to_user, convention)
            _call(fn, "copy_blocks", f"lists over layers of each of {_names(expected, convention)}, block_mapping",
                  case, *[list(per_kind) for per_kind in zip(*caches, strict=True)],
                  to_user(np.stack([src, dst], axis=1)))
            got, scales = _flat(config, caches, from_user, convention, case)
        ref.copy_blocks(expected, src, dst)
        compare_pool("copy_blocks", expected, got, case, scales)
    _run(test, max_examples)


def check_swap_blocks(fn: Callable, *, convention: str = "pagedkv", dtype: str | Sequence[str] = "float32",
                      max_examples: int = 100,
                      to_user: Callable = _identity, from_user: Callable = _identity) -> None:
    """Check a ``swap_blocks`` kernel between two pools (or two caches) of one geometry."""
    @given(_configs(convention, dtype, "swap_blocks"), st.data(), st.integers(0, 2**32 - 1))
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
            _call(fn, "swap_blocks", "src_pool, dst_pool, src, dst", case, source, actual, to_user(src), to_user(dst))
            got, scales = _user_pool(actual, from_user)
        else:
            sources, dests = _caches(source, to_user, convention), _caches(expected, to_user, convention)
            mapping = to_user(np.stack([src, dst], axis=1))
            for s_layer, d_layer in zip(sources, dests, strict=True):
                for s, d in zip(s_layer, d_layer, strict=True):
                    _call(fn, "swap_blocks", "src_cache, dst_cache, block_mapping", case, s, d, mapping)
            got, scales = _flat(config, dests, from_user, convention, case)
        ref.swap_blocks(source, expected, src, dst)
        compare_pool("swap_blocks", expected, got, case, scales)
    _run(test, max_examples)


def check_paged_attention(fn: Callable, *, convention: str = "pagedkv", dtype: str | Sequence[str] = "float32",
                          max_examples: int = 100,
                          rtol: float | None = None, atol: float | None = None, varlen: bool = True,
                          soft_cap: bool = True, sliding_window: bool = True,
                          to_user: Callable = _identity, from_user: Callable = _identity) -> None:
    """Check a paged attention kernel against the float64 reference.

    Cases draw every argument the kernel takes: grouped-query heads (Hq = 1..3 x H); block
    sizes from 1 to 16; random block tables, blocks repeated within and across sequences;
    context lengths from 0 up to several blocks, last pages full or holding one token;
    ``scale`` (1/sqrt(head_dim) or far from it: a kernel that hard-codes 1/sqrt(D) fails);
    variable-length causal queries (``varlen``; not for ``"flashinfer"``); a ``soft_cap``
    (``cap * tanh(s / cap)`` of the scaled scores) and a ``sliding_window`` (each query sees
    its last W positions, its own included), each None or a value, passed as keyword
    arguments (``soft_cap=False`` / ``sliding_window=False``: never passed, for kernels
    without them); fp8 layers with random per-tensor scales; and inputs large enough to
    overflow a softmax that does not subtract the max. The default tolerance is
    :mod:`pagedkv.testing.tolerance`'s bound for float32 kernels.
    """
    @given(_configs(convention, dtype, "paged_attention", max_block_size=16), st.data(), st.integers(0, 2**32 - 1))
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
        default_scale = float(1.0 / np.sqrt(config.head_dim))
        scale = data.draw(st.one_of(st.just(default_scale), st.sampled_from([0.05, 0.5, 1.0, 2.0]),
                                    st.floats(0.01, 3.0)), label="scale")
        options: dict = {}
        if soft_cap:
            options["soft_cap"] = data.draw(st.one_of(st.none(), st.sampled_from([0.5, 2.0, 10.0]),
                                                      st.floats(0.1, 50.0)), label="soft_cap")
        if sliding_window:
            options["sliding_window"] = data.draw(st.one_of(st.none(), st.integers(1, 12)), label="sliding_window")
        rows = len(lens) if query_lens is None else int(query_lens.sum())
        q = (rng.standard_normal((rows, config.num_kv_heads * group, config.head_dim), dtype=np.float32)
             * np.float32(magnitude))
        case = _case(config, layer=layer, block_tables=tables, context_lens=lens, query_heads=q.shape[1],
                     query_lens=query_lens, scale=scale, **options, magnitude=magnitude)
        keywords = "".join(f", {k}" for k in options)
        if convention == "pagedkv":
            got = _call(fn, "paged_attention", f"q, pool, layer, block_tables, context_lens, *, scale, query_lens"
                        f"{keywords}", case, to_user(q), pool, layer, to_user(tables), to_user(lens), scale=scale,
                        query_lens=None if query_lens is None else to_user(query_lens), **options)
        elif convention == "flashinfer":
            indptr, indices, last = page_lists(tables, lens, config.block_size)
            got = _call(fn, "paged_attention", f"q, key_cache, value_cache, kv_indptr, kv_indices, kv_last_page_len, "
                        f"scale{_fp8(pool)}{', *' + keywords if keywords else ''}", case, to_user(q),
                        *_caches(pool, to_user, convention)[0], to_user(indptr), to_user(indices), to_user(last),
                        scale, *_scales(pool, 0), **options)
        else:
            got = _call(fn, "paged_attention", f"q, {_names(pool, convention)}, block_tables, context_lens, scale, "
                        f"query_lens{_fp8(pool)}{', *' + keywords if keywords else ''}", case, to_user(q),
                        *_caches(pool, to_user, convention)[layer], to_user(tables), to_user(lens), scale,
                        None if query_lens is None else to_user(query_lens), *_scales(pool, layer), **options)
        want = ref.paged_attention(q, pool, layer, tables, lens, scale=scale, query_lens=query_lens, **options)
        kv_max = max(float(np.abs(pool.k_decoded(i)).max()) for i in range(config.num_layers))
        kv_max = max([kv_max] + [float(np.abs(pool.v_decoded(i)).max()) for i in range(config.num_layers)])
        q_max = float(np.abs(q).max(initial=0.0))
        bound = atol if atol is not None else attention_atol(
            int(lens.max(initial=0)), config.head_dim, kv_max, score_bound(config.head_dim, scale, q_max, kv_max))
        compare_rows("paged_attention", want, from_user(got), case,
                      row_in_sequence(lens, query_lens, decode=query_lens is None),
                      rtol=RTOL if rtol is None else rtol, atol=max(bound, 1e-30))
    _run(test, max_examples)
