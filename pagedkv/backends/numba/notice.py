"""One line on standard error when pagedkv's numba kernels compile, and how long each took.

Kernels compile on first use (seconds each) and are cached on disk, so only a first run (or a
first run after an upgrade) waits; without a word it looks hung. This listener of numba's
``numba:compile`` event (loading a kernel from the disk cache fires none) says so once, then
names each kernel with its compile time. ``PAGEDKV_QUIET=1`` silences it; ``pagedkv warmup``
compiles everything ahead of time (for a container image, say).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from numba.core import event


class CompileNotice(event.Listener):
    """Says when pagedkv's kernels compile (see the module docstring); ``seconds`` adds them up."""

    def __init__(self) -> None:
        self.depth = 0
        self.started = 0.0
        self.said = False
        self.seconds = 0.0

    @staticmethod
    def _ours(e: Any) -> str | None:
        dispatcher = e.data.get("dispatcher") if isinstance(e.data, dict) else None
        func = getattr(dispatcher, "py_func", None)
        module = getattr(func, "__module__", "") or ""
        return func.__name__ if func is not None and module.startswith("pagedkv.") else None

    def on_start(self, e: Any) -> None:
        if self._ours(e) is None:
            return
        if self.depth == 0:
            self.started = time.perf_counter()
            if not self.said and os.environ.get("PAGEDKV_QUIET") != "1":
                self.said = True
                print("pagedkv: compiling numba kernels on first use (once: they are cached on disk)...",
                      file=sys.stderr, flush=True)
        self.depth += 1

    def on_end(self, e: Any) -> None:
        name = self._ours(e)
        if name is None:
            return
        self.depth -= 1
        if self.depth == 0:
            took = time.perf_counter() - self.started
            self.seconds += took
            if os.environ.get("PAGEDKV_QUIET") != "1":
                print(f"pagedkv:   {name}: {took:.1f} s", file=sys.stderr, flush=True)


#: the process's listener (registered once, when the numba backend is imported)
NOTICE = CompileNotice()
event.register("numba:compile", NOTICE)
