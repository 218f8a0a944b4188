"""``pagedkv verify MODULE:FUNCTION``: run one checker of the conformance kit on your kernel.

Imports ``FUNCTION`` from ``MODULE`` (the current directory is searched first),
runs the checker of ``--routine`` in ``--convention`` (see
:mod:`pagedkv.testing.checkers` for the signatures each expects), and prints
``PASS`` with the number of calls your function answered correctly, or ``FAIL``
with the smallest failing case hypothesis found and the first wrong element
named by its coordinates. ``--torch`` / ``--cupy`` hand your function torch
tensors (on the GPU when there is one) or CuPy arrays instead of numpy arrays.
"""

from __future__ import annotations

import functools
import importlib
import sys
import traceback
from collections.abc import Callable
from typing import TextIO

import numpy as np

from . import checkers

ROUTINES = ("write", "read", "gather", "copy_blocks", "swap_blocks", "paged_attention")


def load_function(spec: str) -> Callable:
    """``"package.module:name"`` (``name`` may be dotted: ``Class.method``) as the object it names."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:FUNCTION, got {spec!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")  # the user's own modules, where the command runs
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec} is not callable")
    return obj


def converters(kind: str | None) -> tuple[Callable, Callable]:
    """``(to_user, from_user)`` for numpy (None), ``"torch"`` or ``"cupy"`` arrays."""
    if kind is None:
        return (lambda x: x), (lambda x: x)
    if kind == "torch":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return (lambda x: torch.as_tensor(np.asarray(x), device=device)), (lambda t: t.detach().cpu().numpy())
    import cupy

    return (lambda x: cupy.asarray(x)), (lambda a: cupy.asnumpy(a))


def verify(spec: str, routine: str, convention: str, dtype: str = "float32", examples: int = 100,
           arrays: str | None = None, out: TextIO | None = None, *, varlen: bool = True, soft_cap: bool = True,
           sliding_window: bool = True) -> int:
    """Run the check; print PASS or FAIL to ``out`` (standard output by default; see the module
    docstring); return the exit status. ``varlen``, ``soft_cap``, ``sliding_window``: for
    ``paged_attention``, whether the cases draw query lengths, soft caps and windows (False
    for a kernel without them)."""
    out = sys.stdout if out is None else out
    if routine not in ROUTINES:
        raise ValueError(f"routine must be one of {ROUTINES}, got {routine!r}")
    fn = load_function(spec)
    calls = [0]

    @functools.wraps(fn)  # its signature, which the checker compares with its call
    def counted(*args, **kwargs):
        calls[0] += 1
        return fn(*args, **kwargs)

    to_user, from_user = converters(arrays)
    check = getattr(checkers, f"check_{routine}")
    options = dict(varlen=varlen, soft_cap=soft_cap, sliding_window=sliding_window) \
        if routine == "paged_attention" else {}
    title = f"FAIL: {spec} as {routine} ({convention}, {dtype})"
    try:
        check(counted, convention=convention, dtype=dtype, max_examples=examples, to_user=to_user,
              from_user=from_user, **options)
    except checkers.KernelSignatureError as e:
        print(f"{title}\n{e}", file=out)
        return 1
    except checkers.KernelMismatch as e:
        print(f"{title}\n{e}", file=out)
        if e.__cause__ is not None:  # the function raised: where, for that case
            print("".join(traceback.format_exception(e.__cause__)).rstrip(), file=out)
        return 1
    except Exception:  # the checker could not handle what the function returned: the traceback
        print(f"{title} raised\n{traceback.format_exc()}", file=out)
        return 1
    print(f"PASS: {spec} as {routine} ({convention}, {dtype}): {calls[0]} calls, every one equal to the "
          "reference" + (" within the attention tolerance" if routine == "paged_attention" else " bit for bit"),
          file=out)
    return 0
