"""Data movement in 8-byte words: two float32 numbers (four 16-bit, eight 8-bit) per thread and access.

A GPU moves memory fastest in wide, coalesced accesses. Where a pool's
arrangement allows, the cuda backend moves bytes as ``uint64`` words instead of
one number per thread: whole blocks (``copy_blocks``, ``swap_blocks``) of any
storage format whenever a block is a whole number of words, and the rows of a
float32 pool (``write``, ``read``, ``gather``) whenever a head's row of ``D``
numbers is (``D`` even). The arithmetic is :mod:`pagedkv.geometry.layout`'s unchanged:
it runs on :func:`word_strides`, the pool's strides counted in words, over
``uint64`` views of the pool and of the token arrays (no copy). A token array
that does not start on an 8-byte boundary (a torch or CuPy view at an odd
offset) is moved number by number, as before.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from ...geometry.layout import K, Strides, V
from .kernels import sequence_of, split_element, table_slot, token_base

#: the word the routines move
WORD = np.dtype(np.uint64)


def word_strides(s: Strides, itemsize: int, rows: bool) -> Strides | None:
    """``s`` counted in 8-byte words of elements of ``itemsize`` bytes, or None where it does not
    divide. ``rows=False``: only whole blocks move (the block, K/V and layer strides are in words;
    the rest is not used); ``rows=True``: heads' rows too (``head_dim``, the head and position
    strides in words as well)."""
    per_word = WORD.itemsize // itemsize
    fields = ("block_stride", "kv_stride", "layer_stride") + (("head_dim", "head_stride", "pos_stride") if rows else ())
    if any(getattr(s, f) % per_word for f in fields):
        return None
    return s._replace(**{f: getattr(s, f) // per_word for f in fields})


def aligned(*arrays) -> bool:
    """Whether every device array starts on an 8-byte boundary (the simulator's arrays have no
    device address: they always count as aligned)."""
    for x in arrays:
        interface = getattr(x, "__cuda_array_interface__", None)
        if interface is not None and interface["data"][0] % WORD.itemsize:
            return False
    return True


def as_words(x):
    """A flat C-contiguous array (device or host) viewed as words, no copy."""
    return x.view(WORD)


@cuda.jit(device=True)
def _copy_pair(data, layer, slot, h, d, out_k, out_v, i, s):
    """Word i of the outputs: word d of head h of the token at ``slot``, K and V, as stored."""
    within = h * s.head_stride + d
    out_k[i] = data[token_base(layer, K, slot, s) + within]
    out_v[i] = data[token_base(layer, V, slot, s) + within]


@cuda.jit
def read_words_kernel(data, layer, slots, out_k, out_v, s):
    """Word i of the flat outputs is (token t, head h, word d) of slot ``slots[t]``; 0 for padding
    (``s``: :func:`word_strides` with ``rows=True``)."""
    i = cuda.grid(1)
    if i >= out_k.shape[0]:
        return
    t, h, d = split_element(i, s)
    slot = slots[t]
    if slot < 0:
        out_k[i] = 0
        out_v[i] = 0
        return
    _copy_pair(data, layer, slot, h, d, out_k, out_v, i, s)


@cuda.jit
def gather_words_kernel(data, layer, tables, cu, out_k, out_v, s):
    """Word i of the packed outputs: row r (token ``r - cu[b]`` of sequence b), head h, word d."""
    i = cuda.grid(1)
    if i >= out_k.shape[0]:
        return
    r, h, d = split_element(i, s)
    b = sequence_of(cu, r)
    _copy_pair(data, layer, table_slot(tables, b, r - cu[b], s.block_size), h, d, out_k, out_v, i, s)
