"""JIT warm-up: how long the numba backend's first call of each routine takes in a new process
with an empty kernel cache, per storage element type (docs/performance.md's "JIT warm-up" figures).

numba compiles a kernel once per argument types, so a pool of each element type (float32;
uint16 for bfloat16 and float16; uint8 for the fp8 formats; int8) compiles its own kernels.
Each format runs in a process of its own with a fresh ``NUMBA_CACHE_DIR``, so nothing is
loaded from an earlier run's cache; the geometry is tiny, so the time is the compilation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

ROUTINES = ["write", "read", "gather", "copy_blocks", "paged_attention"]
DTYPES = ["float32", "bfloat16", "fp8_e4m3", "int8"]  # one format per storage element type

# run in the child process: each routine's first call on a tiny pool of the given format
_CHILD = """
import json, sys, time
import numpy as np
from pagedkv import CacheConfig, KVPool, get_backend
be = get_backend("numba")
pool = KVPool(CacheConfig(num_layers=1, num_kv_heads=2, head_dim=8, num_blocks=6, block_size=4, dtype=sys.argv[1]))
x = np.random.default_rng(0).standard_normal((24, 2, 8), dtype=np.float32)
tables, lens = np.array([[0, 1], [2, 3]], np.int32), np.array([5, 8], np.int32)
calls = {
    "write": lambda: be.write(pool, 0, x, x, np.arange(24)),
    "read": lambda: be.read(pool, 0, np.arange(4)),
    "gather": lambda: be.gather(pool, 0, tables, lens),
    "copy_blocks": lambda: be.copy_blocks(pool, np.array([0]), np.array([5])),
    "paged_attention": lambda: be.paged_attention(np.ones((2, 4, 8), np.float32), pool, 0, tables, lens),
}
seconds = {}
for name, call in calls.items():
    start = time.perf_counter()
    call()
    seconds[name] = time.perf_counter() - start
print(json.dumps(seconds))
"""


def first_call_seconds(dtype: str) -> dict[str, float]:
    """Seconds of each routine's first call on a ``dtype`` pool, in a new process with an
    empty numba cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        env.pop("NUMBA_ENABLE_CUDASIM", None)
        run = subprocess.run([sys.executable, "-c", _CHILD, dtype], env=env, capture_output=True, text=True,
                             timeout=600, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


class JitWarmup:
    """First-call seconds of each routine, per storage element type (lower is better)."""

    params = (ROUTINES, DTYPES)
    param_names = ["routine", "dtype"]
    number = 1
    repeat = 1
    timeout = 1800

    def setup_cache(self):
        return {dtype: first_call_seconds(dtype) for dtype in DTYPES}

    def track_first_call_seconds(self, seconds, routine, dtype):
        return seconds[dtype][routine]

    track_first_call_seconds.unit = "seconds (compilation, empty cache)"
