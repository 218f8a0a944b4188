"""How the checkers compare a kernel's work with the reference, and name the first wrong element."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..geometry.layout import decode_offset
from ..memory.pool import KVPool


class KernelMismatch(AssertionError):
    """A kernel disagreed with the reference.

    Attributes:
        message: what was wrong, without the case.
        case: the (smallest) failing case, as a dict of plain values.
        where: coordinates of the first wrong element (``layer``, ``kv``, ``block``,
            ``pos``, ``head``, ``dim``, ``slot`` for the pool; ``row``, ``head``,
            ``dim`` and, where known, ``sequence`` and ``pos`` for an output).
    """

    def __init__(self, message: str, case: dict, where: dict) -> None:
        super().__init__(f"{message}\ncase: {case}")
        self.message, self.case, self.where = message, case, where


def _same(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Elementwise equality, a NaN equal to a NaN (float arrays)."""
    if expected.dtype.kind != "f":
        return actual == expected
    return (actual == expected) | (np.isnan(actual) & np.isnan(expected))


def compare_pool(what: str, expected: KVPool, actual: np.ndarray, case: dict, scales=None) -> None:
    """The pool's elements (in its storage dtype) and, for int8, ``scales``, against the reference."""
    if actual.shape != expected.host.shape:
        raise KernelMismatch(f"{what}: the pool has {actual.size} elements, expected {expected.host.size}", case, {})
    if actual.dtype != expected.host.dtype:
        raise KernelMismatch(f"{what}: the pool holds {actual.dtype}, expected {expected.host.dtype}", case, {})
    bad = np.flatnonzero(~_same(actual, expected.host))
    if not bad.size and expected.scales is not None:
        compare_scales(what, expected, np.asarray(scales), case)
    if bad.size:
        i = int(bad[0])
        w = decode_offset(expected.strides, i)
        raise KernelMismatch(
            f"{what}: first difference at layer {w['layer']}, {w['kv']}, block {w['block']}, position {w['pos']} "
            f"(slot {w['slot']}), head {w['head']}, dim {w['dim']}: expected {float(expected.host[i]):.9g}, "
            f"got {float(actual[i]):.9g} ({bad.size} elements differ)", case, w)


def compare_scales(what: str, expected: KVPool, actual: np.ndarray, case: dict) -> None:
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


def compare_rows(what: str, expected: np.ndarray, actual, case: dict, rows: Callable[[int], dict] | None,
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


def row_in_sequence(lens: np.ndarray, query_lens: np.ndarray | None = None, *, decode: bool = False):
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
