"""Every routine that moves numbers in and out of a pool, written once.

Each function here is a routine's front door: its documentation, every check of its
arguments (:mod:`.validate`, :mod:`.plan`) before any kernel runs, then the kernels of one
backend (:class:`~.base.Kernels`). A backend module binds them to its kernels with
:func:`bind`, so ``get_backend("numba").write`` is :func:`write` run by numba's kernels, with
the same checks and the same errors as every other backend's.

The one-shot routines (:func:`write`, :func:`read`, :func:`gather`, :func:`copy_blocks`,
:func:`swap_blocks`, :func:`paged_attention`) and the step API a decode loop uses:
:func:`plan` once per step, then :func:`write_step` and :func:`attention_step` per layer
(see :mod:`.plan`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

from ..geometry import layout
from ..memory.pool import KVPool
from . import validate
from .base import Kernels
from .plan import Plan, check_attention, check_window, check_write, make_plan

# ---- the step API: plan once, run per layer -----------------------------------------------------


def plan(kernels: Kernels, pool: KVPool, *, slot_mapping: Any = None, block_tables: Any = None,
         context_lens: Any = None, query_lens: Any = None, sliding_window: Any = None) -> Plan:
    """Validate a step's index arrays once, for every layer of the step (see
    :func:`pagedkv.ops.plan.make_plan`); the plan holds them where the backend's kernels read
    them (a GPU backend: on the GPU, the caller's device arrays where given), so that the
    layers of a step check and upload nothing of them again."""
    p = make_plan(pool, kernels.DEVICE, slot_mapping=slot_mapping, block_tables=block_tables,
                  context_lens=context_lens, query_lens=query_lens, sliding_window=sliding_window)
    return kernels.on_device(p, slot_mapping, block_tables)


def write_step(kernels: Kernels, pool: KVPool, layer: int, key: Any, value: Any, plan: Plan) -> None:
    """:func:`write` with the slot mapping of a :class:`~pagedkv.ops.plan.Plan`."""
    key, value = kernels.to_tokens(key, "key"), kernels.to_tokens(value, "value")
    layer, w = check_write(plan, pool, layer)
    validate.step_tokens(pool, key, value, w.slot_mapping.shape[0])
    if w.slot_mapping.shape[0]:
        kernels.store(pool, layer, key, value, w)


def attention_step(kernels: Kernels, q: Any, pool: KVPool, layer: int, plan: Plan, *, scale: float | None = None,
                   sliding_window: int | None = None, soft_cap: float | None = None) -> Any:
    """:func:`paged_attention` with the block tables and query rows of a :class:`~pagedkv.ops.plan.Plan`.

    The reference does the plain math in float64 on a gathered copy and rounds the result to
    float32 once; the fast backends stream over the blocks in float32
    (:mod:`pagedkv.testing.tolerance` states the tolerance between them).
    """
    q = kernels.to_queries(q)
    layer, a = check_attention(plan, pool, layer)
    validate.queries(pool, q, a.num_rows, a.query_lens is None)
    opt = validate.attention_options(pool, scale, sliding_window, soft_cap)
    check_window(a, opt.window)
    return kernels.attend(q, pool, layer, a, opt)


# ---- one-shot routines --------------------------------------------------------------------------

def write(kernels: Kernels, pool: KVPool, layer: int, key: Any, value: Any, slot_mapping: Any) -> None:
    """Store ``key[t]`` and ``value[t]`` at slot ``slot_mapping[t]`` of ``layer`` (reshape_and_cache).

    Args:
        pool: a :class:`~pagedkv.KVPool` on the backend's device.
        layer: ``0 <= layer < num_layers``.
        key, value: float32 ``[T, H, D]``, C-contiguous, stored in the pool's format. float16
            and bfloat16 are taken too (widened exactly first, see
            :func:`pagedkv.geometry.formats.widen_input`): numpy float16, ml_dtypes bfloat16, or
            uint16 arrays of bfloat16 bit patterns (torch: ``t.view(torch.uint16)``).
        slot_mapping: int64 ``[T]``; a negative slot marks padding and its token is skipped.

    Raises:
        PagedKVError: a wrong dtype, shape or contiguity, a slot outside the
            pool, or two tokens aimed at one slot. The pool is then unchanged.
    """
    write_step(kernels, pool, layer, key, value, plan(kernels, pool, slot_mapping=slot_mapping))


def read(kernels: Kernels, pool: KVPool, layer: int, slot_mapping: Any, *, out: Any = None, raw: bool = False):
    """Load the keys and values stored at ``slot_mapping`` (the inverse of :func:`write`).

    Args:
        slot_mapping: int64 ``[T]``; a slot may repeat; a negative slot gives zeros.
        out: optional ``(key, value)`` float32 ``[T, H, D]`` arrays to fill
            instead of allocating (a decode loop reuses them).
        raw: return the stored elements (and int8 scales) undecoded, as a
            :class:`~pagedkv.geometry.formats.RawKV`; padding rows are zero bits.

    Returns:
        ``(key, value)``, float32 ``[T, H, D]`` each, decoded from the pool's
        format (``out`` itself if given); or a ``RawKV`` with ``raw=True``.
    """
    if raw:
        validate.no_out_with_raw(out)
    out = kernels.to_outputs(out)
    layer, slots = validate.read_args(pool, layer, slot_mapping, out, kernels.DEVICE)
    if raw:
        return kernels.load_raw(pool, layer, slots)
    out_k, out_v = kernels.new_outputs(pool, slots.shape[0], out)
    if slots.shape[0]:
        kernels.load(pool, layer, slots, kernels.to_index(slot_mapping, slots), out_k, out_v)
    return out_k, out_v


def gather(kernels: Kernels, pool: KVPool, layer: int, block_tables: Any, context_lens: Any, *, out: Any = None,
           raw: bool = False):
    """Copy each sequence's keys and values, in token order, into packed buffers.

    Args:
        block_tables: int32 ``[B, max_blocks]``: sequence b's token p lives in
            block ``block_tables[b, p // block_size]``. Entries past a
            sequence's length are never read; a block may repeat.
        context_lens: int32 ``[B]``, tokens cached per sequence (0 allowed).
        out: optional ``(key, value)`` float32 ``[sum(context_lens), H, D]``
            arrays to fill instead of allocating.
        raw: return ``(RawKV, cu_seqlens)``: the stored elements (and int8
            scales) undecoded, as :func:`read` does.

    Returns:
        ``(key, value, cu_seqlens)``: float32 ``[sum(context_lens), H, D]``
        twice, decoded, and int32 ``[B + 1]`` (on the host) with sequence b at rows
        ``cu_seqlens[b]:cu_seqlens[b + 1]``.
    """
    if raw:
        validate.no_out_with_raw(out)
    out = kernels.to_outputs(out)
    layer, tables, lens, total = validate.gather_args(pool, layer, block_tables, context_lens, out, kernels.DEVICE)
    if raw:
        slots = layout.gather_slots(tables, lens, pool.config.block_size)
        return kernels.load_raw(pool, layer, slots), layout.cu_seqlens(lens)
    out_k, out_v = kernels.new_outputs(pool, total, out)
    if not total:
        return out_k, out_v, layout.cu_seqlens(lens)
    cu = kernels.gather_rows(pool, layer, tables, kernels.to_index(block_tables, tables), lens, out_k, out_v)
    return out_k, out_v, cu


def copy_blocks(kernels: Kernels, pool: KVPool, src: Any, dst: Any) -> None:
    """Copy whole blocks ``src[i] -> dst[i]``, every layer, K and V (copy-on-write, fork).

    Args:
        src, dst: int64 ``[N]`` block ids. The copies happen as if at once, so
            no block may be copied onto itself, be the destination of two
            copies, or be both a source and a destination.
    """
    src_host, dst_host = validate.copy_args(pool, pool, src, dst, kernels.DEVICE, kernels.DEVICE)
    if src_host.size:
        kernels.move_blocks(pool, pool, src, dst, src_host, dst_host)


def swap_blocks(kernels: Kernels, src_pool: KVPool, dst_pool: KVPool, src: Any, dst: Any) -> None:
    """Copy blocks ``src[i]`` of ``src_pool`` to ``dst[i]`` of ``dst_pool`` (offload, reload).

    The pools must have the same geometry; destinations must be distinct. With
    one pool as both, the rules of :func:`copy_blocks` apply. A GPU backend swaps
    between a host pool and a GPU pool in either direction, in one transfer.
    """
    src_device, dst_device = kernels.swap_devices(src_pool, dst_pool)
    src_host, dst_host = validate.copy_args(src_pool, dst_pool, src, dst, src_device, dst_device)
    if src_host.size:
        kernels.move_blocks(src_pool, dst_pool, src, dst, src_host, dst_host)


def paged_attention(kernels: Kernels, q: Any, pool: KVPool, layer: int, block_tables: Any, context_lens: Any, *,
                    scale: float | None = None, sliding_window: int | None = None, soft_cap: float | None = None,
                    query_lens: Any = None) -> Any:
    """Attention of new queries over each sequence's cached keys and values, straight from the blocks.

    For each query row, at position ``pos`` of sequence b::

        s_i   = scale * q . K_i                    for the visible positions i
        s_i   = cap * tanh(s_i / cap)              with soft_cap (Gemma 2)
        out   = sum_i softmax(s)_i * V_i

    where position i is visible if ``i <= pos`` (causal) and, with a
    sliding window W, ``i > pos - W``.

    Non-finite K/V (an fp8_e4m3 pool stores NaN, a model may write inf), the same in every
    backend: a position a query does not see contributes nothing, whatever it holds; a
    visible NaN in K makes that query head's whole output row NaN, and a visible NaN in V
    the output numbers it is weighted into (every query head of its K/V head, in that
    dimension). A visible infinity is carried by IEEE arithmetic (``inf - inf`` is NaN).

    Args:
        q: float32 ``[B, Hq, D]`` (decode: row b is the newest token of
            sequence b, whose own K/V is already written, at position
            ``context_lens[b] - 1``), or ``[sum(query_lens), Hq, D]`` with
            ``query_lens``. ``Hq`` is a multiple of the cache's ``H``; query
            head ``hq`` reads K/V head ``hq // (Hq // H)`` (grouped-query
            attention; MQA and MHA are the edge cases).
        block_tables, context_lens: as for :func:`gather`.
        scale: defaults to ``1 / sqrt(D)``.
        sliding_window: keep only the last W positions (the query's own included). Table
            entries wholly before the window of a sequence's first query are not read and
            may be -1 (blocks a sliding-window layer group freed).
        soft_cap: apply ``cap * tanh(s / cap)`` to the scaled scores.
        query_lens: int32 ``[B]``: sequence b's queries are its last
            ``query_lens[b]`` positions, each attending causally (prefill,
            chunked prefill, speculative verification).

    Returns:
        float32 ``[rows, Hq, D]``; zeros for a sequence with no context.
    """
    p = plan(kernels, pool, block_tables=block_tables, context_lens=context_lens, query_lens=query_lens,
             sliding_window=sliding_window)
    return attention_step(kernels, q, pool, layer, p, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)


# ---- binding -------------------------------------------------------------------------------------

class Routines(NamedTuple):
    """The routines bound to one backend's kernels (what :func:`bind` returns)."""

    write: Callable[..., Any]
    read: Callable[..., Any]
    gather: Callable[..., Any]
    copy_blocks: Callable[..., Any]
    swap_blocks: Callable[..., Any]
    paged_attention: Callable[..., Any]
    plan: Callable[..., Any]
    write_step: Callable[..., Any]
    attention_step: Callable[..., Any]


def _bound(routine: Callable[..., Any], kernels: Kernels, module: str) -> Callable[..., Any]:
    """``routine`` with its first argument fixed to ``kernels``: the same name, documentation
    and signature (less that argument), as a function of the backend's module."""
    @functools.wraps(routine)
    def bound(*args, **kwargs):
        return routine(kernels, *args, **kwargs)

    signature = inspect.signature(routine)
    bound.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])  # type: ignore[attr-defined]
    bound.__module__ = module
    return bound


def bind(kernels: Kernels) -> Routines:
    """The routines, each running on ``kernels`` (a backend module meeting :class:`~.base.Kernels`).

    A backend module ends with ``write, read, ... = bind(sys.modules[__name__])``; its
    kernels are looked up on the module at each call, so a test may replace one.
    """
    module = getattr(kernels, "__name__", type(kernels).__name__)
    return Routines(*(_bound(globals()[name], kernels, module) for name in Routines._fields))
