"""Every CUDA kernel, with the argument types the cuda backend really launches it with,
compiles for a real GPU (sm_90) with numba-cuda's own compiler.

The simulator runs a kernel as Python: it never types or compiles it, so a
kernel that passes every simulated test may still be one numba-cuda refuses (an
unsupported function, a type that does not unify). Here every routine of the
cuda backend runs once under the simulator for every storage format (in one
layout: both give the kernels the same argument types), each launch's argument
types are recorded, and a process without the simulator compiles each kernel
for those types to PTX (``tests/_compile_ptx.py``). That
needs NVVM and NVRTC, which the ``test`` extra installs as NVIDIA's wheels; no
GPU and no driver. Where they are missing the test is skipped, except where
``PAGEDKV_REQUIRE_PTX=1`` (CI) makes that a failure.
"""

import importlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pagedkv
from pagedkv import CacheConfig, KVPool
from pagedkv.geometry.formats import FORMATS

from .conftest import SIMULATED, record_launches, shrink_cuda_launches

pytestmark = pytest.mark.cuda

#: the modules that hold pagedkv's CUDA kernels
KERNEL_MODULES = ("pagedkv.backends.cuda.kernels", "pagedkv.backends.cuda.attention", "pagedkv.backends.cuda.words",
                  "pagedkv.backends.cuda.format_kernels", "pagedkv.memory._cuda_fill")
ROOT = Path(__file__).resolve().parent.parent


def _kernels(module) -> dict:
    """The kernels (not device functions) a module defines, by name."""
    from numba.cuda.simulator.kernel import FakeCUDAKernel

    return {name: k for name, k in vars(module).items()
            if isinstance(k, FakeCUDAKernel) and not k._device and k.fn.__module__ == module.__name__}


def _every_routine(gpu, dtype: str, layout: str, head_dim: int) -> None:
    """Each routine of the cuda backend once, in the ways that launch different kernels (an even
    ``head_dim`` moves float32 rows, and blocks, in 8-byte words; an odd one number by number)."""
    from numba import cuda

    config = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=head_dim, num_blocks=4, block_size=2, dtype=dtype,
                         layout=layout)
    def new_pool(device):
        p = KVPool(config, device=device)
        if p.kv_scales is not None:
            p.set_kv_scales(1, 0.5, 2.0)  # layer 1 divides by its scales; layer 0 keeps 1
        return p

    pool = new_pool("cuda")
    rng = np.random.default_rng(0)
    key, value = (rng.standard_normal((3, 2, head_dim)).astype(np.float32) for _ in range(2))
    slots = np.array([0, 3, -1])
    for layer in (0, 1):
        gpu.write(pool, layer, key, value, slots)
    gpu.write(pool, 0, cuda.to_device(key.astype(np.float16)), cuda.to_device(value.astype(np.float16)), slots)
    bf16 = key.view(np.uint32) >> 16
    gpu.write(pool, 0, cuda.to_device(bf16.astype(np.uint16)), cuda.to_device(bf16.astype(np.uint16)), slots)
    gpu.read(pool, 1, slots)
    gpu.read(pool, 1, slots, raw=True)
    tables, lens = np.array([[0, 1], [3, 2]], np.int32), np.array([3, 2], np.int32)
    gpu.gather(pool, 1, tables, lens)
    gpu.gather(pool, 1, tables, lens, raw=True)
    gpu.copy_blocks(pool, np.array([0]), np.array([2]))
    host_pool = new_pool("cpu")
    gpu.swap_blocks(pool, host_pool, np.array([1]), np.array([0]))
    gpu.swap_blocks(host_pool, pool, np.array([0]), np.array([1]))
    gpu.swap_blocks(pool, new_pool("cuda"), np.array([1]), np.array([0]))
    q = rng.standard_normal((2, 4, head_dim)).astype(np.float32)
    gpu.paged_attention(q, pool, 1, tables, lens)
    gpu.paged_attention(q[:1], pool, 1, tables[:1], np.array([4], np.int32))  # split-K
    gpu.paged_attention(rng.standard_normal((5, 4, head_dim)).astype(np.float32), pool, 1, tables, lens,
                        query_lens=np.array([3, 2], np.int32), sliding_window=2, soft_cap=5.0)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if not SIMULATED:
        pytest.skip("a real GPU is here: the suite itself compiles and runs every kernel")
    reason = pagedkv.available_backends()["cuda"]
    if reason is not None:
        pytest.skip(reason)
    monkeypatch = pytest.MonkeyPatch()
    try:
        gpu = pagedkv.get_backend("cuda")
        shrink_cuda_launches(gpu, monkeypatch)
        monkeypatch.setattr(gpu, "SPLIT_POSITIONS", 3)  # the 4-position call below takes split-K
        seen = record_launches(monkeypatch)
        for dtype in FORMATS:  # a layout changes no argument type (its strides are the same tuple), so NHD only
            for head_dim in (4, 3):
                _every_routine(gpu, dtype, "NHD", head_dim)
    finally:
        monkeypatch.undo()
    launches = sorted(set(seen), key=str)
    # compiled in up to two processes at once (each compile is single-threaded; CI has two cores)
    workers = max(1, min(2, os.cpu_count() or 1))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    runs = []
    for i in range(workers):
        path = tmp_path_factory.mktemp("ptx") / f"launches-{i}.pkl"
        path.write_bytes(pickle.dumps(launches[i::workers]))
        runs.append(subprocess.Popen([sys.executable, "-m", "tests._compile_ptx", str(path)], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    report: dict = {"compiled": [], "failed": {}}
    for run in runs:
        stdout, stderr = run.communicate(timeout=900)
        assert run.returncode == 0, stderr[-4000:]
        part = json.loads(stdout.strip().splitlines()[-1])
        if "unavailable" in part:
            report = part
        elif "unavailable" not in report:
            report["compiled"] += part["compiled"]
            report["failed"].update(part["failed"])
    if "unavailable" in report:
        if os.environ.get("PAGEDKV_REQUIRE_PTX") == "1":
            pytest.fail(f"PAGEDKV_REQUIRE_PTX=1 but numba-cuda cannot compile here: {report['unavailable']}")
        pytest.skip(f"numba-cuda cannot compile here (pip install '.[test]' brings NVVM): {report['unavailable']}")
    return launches, report


def test_every_launched_kernel_compiles_for_sm_90(compiled):
    launches, report = compiled
    assert not report["failed"], "\n\n".join(f"{k}\n{v}" for k, v in report["failed"].items())
    assert len(report["compiled"]) == len(launches)


def test_every_kernel_is_launched_by_some_routine(compiled):
    """No kernel escapes the compile check: each one pagedkv defines was among the launches."""
    launches, _ = compiled
    launched = {(m, n) for m, n, _ in launches}
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        missing = sorted(k for k in _kernels(module) if (name, k) not in launched)
        assert not missing, f"{name}: never launched by the routines above, so never compiled: {missing}"
