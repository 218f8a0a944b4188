"""The GPU table of the kernels, in one short run on a machine with a real GPU.

    python -m benchmarks.gpu_report benchmarks/results/gpu-<device>.md

Measures, with the GPU synchronised around every timing (medians):

* each routine of the cuda backend at the decode and prefill shapes, both layouts, in GB/s
  (bytes read plus written) against a device-to-device copy of the same bytes, and against
  the same operation as CuPy and torch CUDA fancy indexing on the pool's own memory;
* decode paged attention (B=32, context 2048, Hq=32, H=8, D=128) against a device copy of
  the K/V bytes it reads and against torch ``scaled_dot_product_attention`` on a dense copy;
* the host's cost of a decode step's per-layer calls (``write_step``, ``attention_step``)
  beside an empty numba-cuda launch (item 7).

A measurement that fails is written into the table with its error instead of ending the run,
so that one short device session always brings back a file.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable

import numpy as np

import pagedkv

from . import harness as B

REPEAT = 15


def gpu_seconds(fn: Callable[[], object], repeat: int = REPEAT) -> float:
    """Median seconds of one call, the GPU synchronised before and after each timed batch."""
    fn()
    B.gpu_sync()
    number, times = 1, []
    while True:  # enough calls a batch to be timeable (at least 2 ms)
        start = time.perf_counter()
        for _ in range(number):
            fn()
        B.gpu_sync()
        if time.perf_counter() - start > 2e-3 or number >= 4096:
            break
        number *= 4
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        B.gpu_sync()
        times.append((time.perf_counter() - start) / number)
    return float(np.median(times))


def _cell(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the table says what failed
        print(traceback.format_exc(), file=sys.stderr)
        return f"failed: {type(e).__name__}: {str(e)[:80]}"


def routines_table(backend) -> list[str]:
    rows = ["| routine | shape | layout | GB/s | device copy GB/s | x device copy | x CuPy | x torch |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for shape in B.SHAPES:
        for layout in ("NHD", "HND"):
            w = B.on_gpu(B.make_workload(shape, layout))
            for routine in ("write", "gather", "gather_out", "copy_blocks", "swap_blocks"):
                def one(routine=routine, w=w):
                    nbytes = B.bytes_moved(w, routine)
                    t = gpu_seconds(B.backend_call(backend, w, routine))
                    t_copy = gpu_seconds(B.device_copy(nbytes))
                    peers = [_cell(lambda lib=lib: _peer_ratio(w, routine, lib, t)) for lib in ("cupy", "torch")]
                    return (f"{nbytes / t / 1e9:.1f} | {nbytes / t_copy / 1e9:.1f} | {t_copy / t:.2f} | "
                            f"{peers[0]} | {peers[1]}")
                rows.append(f"| {routine} | {shape} | {layout} | {_cell(one)} |")
    return rows


def _peer_ratio(w, routine: str, lib: str, t: float) -> str:
    """How many times faster pagedkv's ``t`` is than ``lib``'s indexing ("" where it has none)."""
    base = routine.removesuffix("_out")
    call = B.gpu_peer(w, base, lib) if base in B.PEER_ROUTINES else None
    return f"{gpu_seconds(call) / t:.2f}" if call is not None else ""


def attention_table(backend) -> list[str]:
    rows = ["| layout | ms | K/V GB/s | x device copy | x torch SDPA (dense) |", "| --- | ---: | ---: | ---: | ---: |"]
    for layout in ("NHD", "HND"):
        def one(layout=layout):
            w = B.make_attention_workload(layout=layout)
            dev = B.on_gpu_attention(w)
            t = gpu_seconds(B.attention_call(backend, dev))
            t_copy = gpu_seconds(B.device_copy(2 * w.kv_bytes))
            sdpa = ""
            try:
                import torch
                import torch.nn.functional as F
            except ImportError:
                pass
            else:
                q = torch.as_tensor(w.q, device="cuda")[:, :, None, :]
                k, v = (torch.as_tensor(x, device="cuda") for x in (w.dense_k, w.dense_v))
                sdpa = f"{gpu_seconds(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)) / t:.2f}"
            return f"{t * 1e3:.3f} | {w.kv_bytes / t / 1e9:.0f} | {t_copy / t:.2f} | {sdpa}"
        rows.append(f"| {layout} | {_cell(one)} |")
    return rows


def overhead_table(backend) -> list[str]:
    names = {"write_step": "write_step (1 launch)", "attention_step": "attention_step (1 launch)",
             "empty_launch": "empty kernel, 1 argument"}
    rows = ["| call (2 sequences, 16 tokens) | us |", "| --- | ---: |"]
    for name, call in B.step_overhead_calls(backend).items():
        rows.append(f"| {names[name]} | {_cell(lambda call=call: f'{gpu_seconds(call) * 1e6:.1f}')} |")
    return rows


def main(path: str) -> None:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        raise SystemExit("the GPU report needs a real GPU, not the simulator")
    from numba import cuda

    backend = pagedkv.get_backend("cuda")
    device = cuda.get_current_device()
    name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
    lines = [f"# pagedkv's cuda backend on {name}", "",
             f"`python -m benchmarks.gpu_report`, {time.strftime('%Y-%m-%d')}; pagedkv {pagedkv.__version__}, "
             f"numba-cuda {_version('numba_cuda')}, CuPy {_version('cupy')}, torch {_version('torch')}. "
             "Medians; GB/s counts bytes read plus written.", "",
             "## Routines", "", *routines_table(backend), "",
             "## Decode attention (B=32, context 2048, Hq=32, H=8, D=128)", "", *attention_table(backend), "",
             "## Host cost of a decode step's per-layer calls", "", *overhead_table(backend), ""]
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(text)


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception:  # noqa: BLE001 - missing or without a version
        return "absent"


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/gpu.md")
