"""Plan once per step, run per layer: :class:`Plan`.

A decode step writes and attends in every layer with the same index arrays
(slot mapping, block tables, context lengths, query lengths). Checking them
costs a scan each, and on a GPU an upload each; doing that once per layer
would cost ``num_layers`` times what it must. So a step is *planned* once
(FlashInfer's ``plan()``): the index arrays are validated against the pool's
geometry, each query row is placed in its sequence, and the backend keeps the
arrays where its kernels read them (on the GPU for the cuda backend). Each
layer then *runs* on the plan (``write_step``, ``attention_step``), checking
only what is new in that layer: the layer number and the K/V/q tensors'
dtype and shape (a few attribute comparisons, no scan, no copy).

The one-shot routines (``write``, ``paged_attention``) are a plan followed by
a run, so there is one code path and validation always happens exactly once
before any kernel touches the pool.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..errors import ShapeError, StepError
from ..geometry.layout import Strides, query_positions
from ..memory.pool import KVPool
from . import validate


class WritePlan(NamedTuple):
    """Where a step's new tokens go.

    Attributes:
        slot_mapping: int64 ``[T]`` on the host, checked (negative = padding).
        kernel_slots: the same array where the backend's kernels read it.
    """

    slot_mapping: np.ndarray
    kernel_slots: Any


class AttentionPlan(NamedTuple):
    """Which blocks each sequence reads, and where each query row sits.

    Attributes:
        block_tables: int32 ``[B, max_blocks]``; context_lens: int32 ``[B]`` (host, checked).
        query_lens: int32 ``[B]``, or None for decode (one query a sequence).
        row_seq: int32 ``[N]``, the sequence of each query row.
        row_pos: int64 ``[N]``, the position of each query row in its sequence
            (``-1`` for a sequence with no context).
        kernel_tables, kernel_row_seq, kernel_row_pos: the arrays where the
            backend's kernels read them.
        window: the sliding window the tables were checked for (0: none): entries wholly
            before a sequence's window may be null (-1), so attention on this plan must use
            a window of at most this many positions.
        longest: the most positions a query row attends to (the highest ``row_pos`` plus
            one; at least 1), before any sliding window: how a backend sizes its work
            (the cuda backend's split-K) without scanning ``row_pos`` per layer.
    """

    block_tables: np.ndarray
    context_lens: np.ndarray
    query_lens: np.ndarray | None
    row_seq: np.ndarray
    row_pos: np.ndarray
    kernel_tables: Any
    kernel_row_seq: Any
    kernel_row_pos: Any
    window: int = 0
    longest: int = 1

    @property
    def num_rows(self) -> int:
        """Query rows."""
        return int(self.row_seq.shape[0])


class Plan(NamedTuple):
    """A step's index arrays, validated once against one pool geometry.

    Attributes:
        strides: the geometry the arrays were checked against; a run on a pool
            of another geometry (or device) raises :class:`~pagedkv.StepError`.
        device: where the planned pool lives.
        write: the write part (None: no write planned).
        attention: the attention part (None: no attention planned).
    """

    strides: Strides
    device: str
    write: WritePlan | None
    attention: AttentionPlan | None


def make_plan(pool: KVPool, device: str, *, slot_mapping: Any = None, block_tables: Any = None,
              context_lens: Any = None, query_lens: Any = None, sliding_window: Any = None) -> Plan:
    """Validate a step's index arrays against ``pool`` and place its query rows (host side).

    Any part may be left out: a write-only plan has just ``slot_mapping``; an
    attention-only plan has ``block_tables`` and ``context_lens`` (and
    ``query_lens`` for variable-length queries). With both, the slot mapping
    must have one entry per query row. The kernel arrays are the host arrays;
    a GPU backend replaces them with device copies. With ``sliding_window`` W (the layers
    of a sliding-window group), a table entry whose positions all lie before the window
    of its sequence's first query is not read and may be -1 (a block freed out of the
    window); attention on the plan must then use a window of at most W.

    Raises:
        PagedKVError: the subclass that names what is wrong; nothing is changed.
    """
    validate.pool(pool, device)
    write = attention = None
    if slot_mapping is not None:
        slots = validate.slot_mapping(pool, slot_mapping, None, unique=True)
        write = WritePlan(slots, slots)
    if block_tables is not None or context_lens is not None:
        window, nulls = 0, None
        if sliding_window is not None:
            window = validate.attention_options(pool, None, sliding_window, None).window
            nulls = _null_entries(pool, context_lens, query_lens, window)
        tables, lens = validate.block_tables(pool, block_tables, context_lens, nulls)
        qlens = None
        if query_lens is None:  # decode: row b is the last token of sequence b
            row_seq, row_pos = np.arange(lens.shape[0], dtype=np.int32), lens.astype(np.int64) - 1
        else:
            qlens = validate.query_lens(lens, query_lens)
            row_seq, row_pos = query_positions(lens, qlens)
        if write is not None and write.slot_mapping.shape[0] != row_seq.shape[0]:
            raise ShapeError(f"slot_mapping has {write.slot_mapping.shape[0]} entries for "
                             f"{row_seq.shape[0]} query rows")
        longest = int(row_pos.max(initial=0)) + 1  # a row of no context (-1) reads nothing; 1 at least
        attention = AttentionPlan(tables, lens, qlens, row_seq, row_pos, tables, row_seq, row_pos, window, longest)
    elif query_lens is not None:
        raise ShapeError("query_lens needs block_tables and context_lens")
    return Plan(pool.strides, pool.device, write, attention)


def _null_entries(pool: KVPool, context_lens: Any, query_lens: Any, window: int) -> np.ndarray:
    """int64 ``[B]``: how many leading table entries of each sequence lie wholly before the
    window of its first query (position ``len - query_len``) and so may be null."""
    lens = validate.index_array(context_lens, "context_lens", validate.INT32, 1)
    first = lens.astype(np.int64) - (1 if query_lens is None else validate.query_lens(lens, query_lens))
    return np.maximum(first - window + 1, 0) // pool.config.block_size


def check_window(a: AttentionPlan, window: int) -> None:
    """An attention run's sliding window (0: none) fits the plan: a plan whose tables may hold
    entries freed out of a window W reads only with a window of at most W."""
    if a.window and not 0 < window <= a.window:
        raise StepError(f"this plan's block tables may hold blocks freed out of a sliding window of {a.window}; "
                        f"attention on it needs sliding_window <= {a.window}, got {window or None}")


def _check(plan: object, pool: KVPool, layer: object) -> tuple[Plan, int]:
    if not isinstance(plan, Plan):
        raise StepError(f"expected a Plan, got {type(plan).__name__}")
    validate.pool(pool, plan.device)
    if plan.strides != pool.strides:
        raise StepError(f"the plan was made for a pool of another geometry: {plan.strides} vs {pool.strides}")
    return plan, validate.layer(pool, layer)


def check_write(plan: object, pool: KVPool, layer: object) -> tuple[int, WritePlan]:
    """The per-layer checks of a write run: ``plan`` is a :class:`Plan` with a write part,
    for this pool's geometry and device; returns the layer as an int and the write part."""
    plan, layer = _check(plan, pool, layer)
    if plan.write is None:
        raise StepError("this plan has no slot mapping: plan the step with slot_mapping")
    return layer, plan.write


def check_attention(plan: object, pool: KVPool, layer: object) -> tuple[int, AttentionPlan]:
    """The per-layer checks of an attention run: like :func:`check_write`, for the attention part."""
    plan, layer = _check(plan, pool, layer)
    if plan.attention is None:
        raise StepError("this plan has no block tables: plan the step with block_tables and context_lens")
    return layer, plan.attention
