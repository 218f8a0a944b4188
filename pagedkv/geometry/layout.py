"""Where every number of the KV cache lives, and the index arithmetic around it.

This module is the only place that knows the arithmetic; the reference, the
numba kernels, the CUDA kernels, the block manager and the test kit all call
the functions below (compiled for their target where needed).

The pool is one 1-D array. Every layer has a K half and a V half, each
``num_blocks`` blocks long, and every block holds ``block_size`` token positions
of ``num_kv_heads`` heads of ``head_dim`` numbers::

    pool.data (1-D)
    |<------------- layer 0 ------------->|<------------- layer 1 ------------->| ...
    |<------ K ------->|<------ V ------->|<------ K ------->|<------ V ------->|
    | b0 | b1 | ... bN | b0 | b1 | ... bN | b0 | b1 | ... bN | b0 | b1 | ... bN |
                 |
                 v  one block = block_stride = block_size * H * D numbers
    layout "NHD":  [pos 0: h0 d0..dD | h1 d0..dD | ...][pos 1: h0 ... ] ...
                   one token's heads side by side: a write is one contiguous run
    layout "HND":  [h0: pos 0 d0..dD | pos 1 d0..dD | ...][h1: pos 0 ... ] ...
                   one head's tokens side by side: attention reads contiguous runs

    offset(layer, kv, block, pos, head, d)
        = layer * layer_stride + kv * kv_stride + block * block_stride   # the block
        + pos * pos_stride + head * head_stride + d                      # inside it

    kv_stride    = num_blocks * block_stride          (kv: K = 0, V = 1)
    layer_stride = 2 * kv_stride
    NHD: pos_stride = H * D,  head_stride = D
    HND: pos_stride = D,      head_stride = block_size * D

A token is addressed by its *slot*: ``slot = block * block_size + pos``. A
sequence's token ``p`` lives in block ``block_table[p // block_size]``, at
position ``p % block_size`` of it (:func:`table_slot`).

Ragged batches (several sequences' tokens packed one after another) are
described by per-sequence counts; :func:`cu_seqlens` and :func:`ragged_rows`
convert between the two views, as FlashInfer's ``get_seq_lens`` and
``get_batch_indices_positions`` do.

The scalar functions are plain Python on integers and a :class:`Strides`
tuple; they work unchanged on numpy integer arrays (the reference uses them
that way) and compile with ``numba.njit`` and ``numba.cuda.jit(device=True)``
(the kernels use them so, with the strides tuple as one argument).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import ContextLengthError

INT32_MAX = 2**31 - 1  #: the largest block id, context length or packed row count (int32 arrays)
INT64_MAX = 2**63 - 1  #: the largest flat offset or slot

K = 0  #: index of the key half of a layer
V = 1  #: index of the value half of a layer

LAYOUTS = ("NHD", "HND")


class Strides(NamedTuple):
    """The integers that place every element of a pool (see the module docstring).

    All fields are integers, so the tuple passes as one argument to numba and
    CUDA kernels.
    """

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    layer_stride: int
    kv_stride: int
    block_stride: int
    pos_stride: int
    head_stride: int

    @property
    def layout(self) -> str:
        """``"NHD"`` or ``"HND"``, read back from the strides (with one head, the two are
        one and the same arrangement, and read as ``"NHD"``)."""
        return "NHD" if self.pos_stride == self.num_kv_heads * self.head_dim else "HND"

    @property
    def size(self) -> int:
        """Number of elements in the whole pool."""
        return self.num_layers * self.layer_stride

    @property
    def num_scales(self) -> int:
        """Number of per-(token, head) scales of an int8 pool of this geometry."""
        return self.num_layers * 2 * self.num_blocks * self.block_size * self.num_kv_heads


def make_strides(
    num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, layout: str
) -> Strides:
    """Compute the strides of a pool geometry in layout ``"NHD"`` or ``"HND"``."""
    block_stride = block_size * num_kv_heads * head_dim
    if layout == "NHD":
        pos_stride, head_stride = num_kv_heads * head_dim, head_dim
    elif layout == "HND":
        pos_stride, head_stride = head_dim, block_size * head_dim
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    kv_stride = num_blocks * block_stride
    return Strides(num_layers, num_blocks, block_size, num_kv_heads, head_dim,
                   2 * kv_stride, kv_stride, block_stride, pos_stride, head_stride)


def cdiv(a, b):
    """Ceiling division for non-negative ``a`` and positive ``b``: blocks needed for ``a`` tokens.

    >>> cdiv(0, 16), cdiv(1, 16), cdiv(16, 16), cdiv(17, 16)
    (0, 1, 1, 2)
    """
    return (a + b - 1) // b


def window_start(position, window):
    """The first position a query at ``position`` sees: 0 under full attention (``window`` None
    or 0), else ``position - window + 1`` (never below 0). Every attention kernel and the
    reference start there; :func:`window_start_block` is its block.

    >>> window_start(40, 16), window_start(40, None), window_start(5, 16)
    (25, 0, 0)
    """
    if not window:
        return 0
    return max(position - window + 1, 0)


def window_start_block(position, window, block_size):
    """The first block a query at ``position`` reads: 0 under full attention (``window`` None
    or 0), else the block of its window's first position ``position - window + 1``; the
    blocks before it are never read again by this or any later query.

    >>> window_start_block(40, 16, 8), window_start_block(40, None, 8), window_start_block(5, 16, 8)
    (3, 0, 0)
    """
    return window_start(position, window) // block_size


# ---- the pool arithmetic (scalar; compiled for numba and CUDA) -----------------------------------

def block_base(layer, kv, block, s):
    """Offset of the first element of ``block`` in the K (``kv=0``) or V (``kv=1``) half of ``layer``."""
    return layer * s.layer_stride + kv * s.kv_stride + block * s.block_stride


def token_base(layer, kv, slot, s):
    """Offset of (head 0, dim 0) of the token stored at ``slot`` (``slot >= 0``).

    Add ``head * head_stride + d`` for one number of that token.
    """
    # split_slot() and block_base() spelled out: each helper here compiles on its own for numba and CUDA
    block = slot // s.block_size
    pos = slot - block * s.block_size
    return layer * s.layer_stride + kv * s.kv_stride + block * s.block_stride + pos * s.pos_stride


def split_slot(slot, block_size):
    """``(block, position inside it)`` of a slot (``slot >= 0``); the inverse of
    ``block * block_size + pos``.

    >>> split_slot(9, 4)
    (2, 1)
    """
    block = slot // block_size
    return block, slot - block * block_size


def table_slot(block_tables, seq, position, block_size):
    """Slot of token ``position`` of sequence ``seq``: ``block_tables[seq, position // block_size]``
    is its block, ``position % block_size`` its place in it.

    >>> tables = np.array([[5, 2], [7, -1]])
    >>> int(table_slot(tables, 0, 5, 4))   # token 5 of sequence 0: block 2, position 1
    9
    >>> table_slot(tables, np.array([0, 1]), np.array([0, 2]), 4).tolist()
    [20, 30]
    """
    return block_tables[seq, position // block_size] * block_size + position % block_size


def scale_index(layer, kv, slot, head, s):
    """Where the scale of (token at ``slot``, ``head``) of an int8 pool lives in ``pool.scales``.

    Scales are laid out ``[layer][K, V][slot][head]``, so one block's scales are one
    contiguous run of ``block_size * H`` (see :func:`block_scale_base`) and move with it.
    """
    return ((layer * 2 + kv) * s.num_blocks * s.block_size + slot) * s.num_kv_heads + head


def block_scale_base(layer, kv, block, s):
    """Index of the first scale of ``block`` in ``pool.scales`` (a run of ``block_size * H``)."""
    return ((layer * 2 + kv) * s.num_blocks + block) * s.block_size * s.num_kv_heads


def element_offset(s: Strides, layer, kv, block, pos, head, d):
    """Offset of one number: ``layer``, K or V, ``block``, position, head, dim."""
    return block_base(layer, kv, block, s) + pos * s.pos_stride + head * s.head_stride + d


def decode_offset(s: Strides, offset: int) -> dict[str, int | str]:
    """Inverse of :func:`element_offset`: name the element stored at a flat ``offset``.

    Returns ``{"layer", "kv" ("K" or "V"), "block", "pos", "head", "dim", "slot"}``,
    the coordinates a kernel author needs to find a wrong element.
    """
    offset = int(offset)
    if not 0 <= offset < s.size:
        raise IndexError(f"offset {offset} is outside the pool of {s.size} elements")
    layer, rest = divmod(offset, s.layer_stride)
    kv, rest = divmod(rest, s.kv_stride)
    block, rest = divmod(rest, s.block_stride)
    if s.layout == "NHD":  # position is the outer index inside a block
        pos, rest = divmod(rest, s.pos_stride)
        head, d = divmod(rest, s.head_stride)
    else:  # HND: head is the outer index
        head, rest = divmod(rest, s.head_stride)
        pos, d = divmod(rest, s.pos_stride)
    return {
        "layer": layer, "kv": "KV"[kv], "block": block, "pos": pos,
        "head": head, "dim": d, "slot": block * s.block_size + pos,
    }


# ---- ragged batches (host side, numpy) -----------------------------------------------------------

def cu_seqlens(counts: np.ndarray) -> np.ndarray:
    """Start of each sequence in a packed batch: int32 ``[B + 1]``; sequence b owns rows
    ``cu[b]:cu[b + 1]`` and the last entry is the total.

    >>> cu_seqlens(np.array([3, 0, 2])).tolist()
    [0, 3, 3, 5]

    Raises:
        ContextLengthError: the total does not fit in int32 (kernels index packed rows with it).
    """
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    if out[-1] > INT32_MAX:
        raise ContextLengthError(f"{int(out[-1])} packed rows do not fit in int32")
    return out.astype(np.int32)


def ragged_rows(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every row of a packed batch: its sequence (int32 ``[N]``) and its index inside
    that sequence (int64 ``[N]``), ``N = sum(counts)``.

    >>> seq, offset = ragged_rows(np.array([3, 0, 2]))
    >>> seq.tolist(), offset.tolist()
    ([0, 0, 0, 2, 2], [0, 1, 2, 0, 1])
    """
    counts = np.asarray(counts, dtype=np.int64)
    seq = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    first = np.cumsum(counts) - counts
    return seq, np.arange(int(counts.sum()), dtype=np.int64) - first[seq]


def query_positions(context_lens: np.ndarray, query_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sequence and position of every query row when sequence b's queries are its last
    ``query_lens[b]`` tokens of ``context_lens[b]``: int32 ``[N]`` and int64 ``[N]``.

    >>> seq, pos = query_positions(np.array([5, 2]), np.array([2, 1]))
    >>> seq.tolist(), pos.tolist()
    ([0, 0, 1], [3, 4, 1])
    """
    seq, offset = ragged_rows(query_lens)
    first = np.asarray(context_lens, dtype=np.int64) - np.asarray(query_lens, dtype=np.int64)
    return seq, first[seq] + offset


def token_slots(block_tables: np.ndarray, starts: np.ndarray, counts: np.ndarray, block_size: int,
                rows: np.ndarray | None = None) -> np.ndarray:
    """Slots of ``counts[b]`` consecutive tokens from position ``starts[b]`` of each sequence,
    sequence after sequence: int64 ``[sum(counts)]`` (a slot mapping). Sequence b's blocks are
    row ``rows[b]`` of ``block_tables`` (row b when ``rows`` is None).

    >>> tables = np.array([[5, 2], [7, -1]], np.int32)
    >>> token_slots(tables, np.array([3, 0]), np.array([2, 1]), 4).tolist()
    [23, 8, 28]
    """
    seq, offset = ragged_rows(counts)
    positions = np.asarray(starts, dtype=np.int64)[seq] + offset
    index = seq if rows is None else np.asarray(rows, dtype=np.intp)[seq]
    return table_slot(block_tables, index, positions, np.int64(block_size))  # int64: no int32 overflow


def page_lists(block_tables: np.ndarray, context_lens: np.ndarray,
               block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block tables in FlashInfer's paged format: int32 ``kv_indptr [B + 1]``, ``kv_indices``
    (sequence b's pages are ``kv_indices[kv_indptr[b]:kv_indptr[b + 1]]``) and
    ``kv_last_page_len [B]`` (tokens in each last page; 0 for an empty sequence).

    >>> indptr, indices, last = page_lists(np.array([[5, 2], [7, -1], [-1, -1]]), np.array([5, 1, 0]), 4)
    >>> indptr.tolist(), indices.tolist(), last.tolist()
    ([0, 2, 3, 3], [5, 2, 7], [1, 1, 0])
    """
    lens = np.asarray(context_lens, dtype=np.int64)
    pages = cdiv(lens, block_size)
    seq, page = ragged_rows(pages)
    indices = np.asarray(block_tables)[seq, page].astype(np.int32)
    last = np.where(lens > 0, lens - (pages - 1) * block_size, 0).astype(np.int32)
    return cu_seqlens(pages), indices, last


def gather_slots(block_tables: np.ndarray, context_lens: np.ndarray, block_size: int) -> np.ndarray:
    """Slots of every cached token, sequence after sequence, in token order: int64 ``[sum(lens)]``.

    >>> gather_slots(np.array([[5, 2], [7, -1]], np.int32), np.array([5, 1]), 4).tolist()
    [20, 21, 22, 23, 8, 28]
    """
    return token_slots(block_tables, np.zeros(len(context_lens), np.int64), context_lens, block_size)
