"""Where every number of the KV cache lives in the one flat pool.

This module is the only place that knows the arithmetic; the reference, the
numba kernels and the CUDA kernels all call the functions below (compiled for
their target) and receive the strides as plain integers.

The pool is one 1-D float32 array. Every layer has a K half and a V half, each
``num_blocks`` blocks long, and every block holds ``block_size`` token positions
of ``num_kv_heads`` heads of ``head_dim`` numbers::

    pool.data (float32, 1-D)
    |<------------- layer 0 ------------->|<------------- layer 1 ------------->| ...
    |<------ K ------->|<------ V ------->|<------ K ------->|<------ V ------->|
    | b0 | b1 | ... bN | b0 | b1 | ... bN | b0 | b1 | ... bN | b0 | b1 | ... bN |
                 |
                 v  one block = block_stride = block_size * H * D floats
    layout "NHD":  [pos 0: h0 d0..dD | h1 d0..dD | ...][pos 1: h0 ... ] ...
                   one token's heads side by side: a write is one contiguous run
    layout "HND":  [h0: pos 0 d0..dD | pos 1 d0..dD | ...][h1: pos 0 ... ] ...
                   one head's tokens side by side: attention reads contiguous runs

    offset(layer, kv, block, pos, head, d)
        = layer * layer_stride + kv * kv_stride + block * block_stride   # the block
        + pos * pos_stride + head * head_stride + d                      # inside it

    kv_stride    = num_blocks * block_stride          (kv: 0 = K, 1 = V)
    layer_stride = 2 * kv_stride
    NHD: pos_stride = H * D,  head_stride = D
    HND: pos_stride = D,      head_stride = block_size * D

A token is addressed by its *slot*: ``slot = block * block_size + pos``. So the
slot mapping of a write says, for each token, which block and which position
inside the block its keys and values go to.

The functions are plain Python on integers; they work unchanged on numpy
integer arrays (the reference uses them that way) and compile with
``numba.njit`` and ``numba.cuda.jit(device=True)`` (the kernels use them so).
"""

from __future__ import annotations

from typing import NamedTuple

K = 0  #: index of the key half of a layer
V = 1  #: index of the value half of a layer

LAYOUTS = ("NHD", "HND")


class Strides(NamedTuple):
    """The integers that place every element of a pool (see the module docstring)."""

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
    layout: str

    @property
    def token_args(self) -> tuple[int, ...]:
        """The trailing integer arguments of every token kernel (numba and CUDA), in their order."""
        return (self.num_kv_heads, self.head_dim, self.block_size, self.layer_stride, self.kv_stride,
                self.block_stride, self.pos_stride, self.head_stride)

    @property
    def size(self) -> int:
        """Number of float32 elements in the whole pool."""
        return self.num_layers * self.layer_stride


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
    return Strides(
        num_layers, num_blocks, block_size, num_kv_heads, head_dim,
        2 * kv_stride, kv_stride, block_stride, pos_stride, head_stride, layout,
    )


def block_base(layer, kv, block, layer_stride, kv_stride, block_stride):
    """Offset of the first element of ``block`` in the K (kv=0) or V (kv=1) half of ``layer``."""
    return layer * layer_stride + kv * kv_stride + block * block_stride


def token_base(layer, kv, slot, block_size, layer_stride, kv_stride, block_stride, pos_stride):
    """Offset of (head 0, dim 0) of the token stored at ``slot`` (``slot >= 0``).

    Add ``head * head_stride + d`` for one number of that token.
    """
    block = slot // block_size
    pos = slot - block * block_size
    # block_base() spelled out: each helper here compiles on its own for numba and CUDA
    return layer * layer_stride + kv * kv_stride + block * block_stride + pos * pos_stride


def table_slot(block, position, block_size):
    """Slot of a sequence's token ``position`` when its block table holds ``block`` there.

    The block is ``block_table[position // block_size]``; the caller looks it up.
    """
    return block * block_size + position % block_size


def element_offset(s: Strides, layer, kv, block, pos, head, d):
    """Offset of one number: ``layer``, K or V, ``block``, position, head, dim."""
    return (
        block_base(layer, kv, block, s.layer_stride, s.kv_stride, s.block_stride)
        + pos * s.pos_stride + head * s.head_stride + d
    )


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
