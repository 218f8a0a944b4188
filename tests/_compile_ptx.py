"""Compile recorded CUDA kernel launches to PTX with the real numba-cuda compiler (no GPU needed).

Run by ``tests/test_cuda_compiles.py`` in a process of its own, without
``NUMBA_ENABLE_CUDASIM`` (the simulator never types or compiles a kernel, so a
kernel it runs may still be one that numba-cuda refuses). Reads a pickle of
``[(module, kernel name, argument types)]``; prints one JSON line: the
kernels compiled, or the first error of each that failed, or why nothing could
be compiled here (no NVVM or NVRTC).
"""

import importlib
import json
import os
import pickle
import sys

assert os.environ.get("NUMBA_ENABLE_CUDASIM", "0") != "1", "run without the CUDA simulator"

#: the compute capability compiled for: sm_90, the H100 and H200 this project's GPU checks run on
CC = (9, 0)


class _Target:
    """Stands in for the current device where numba-cuda asks for one while compiling (its device
    functions are compiled for ``get_current_device().compute_capability``); no driver is loaded."""

    compute_capability = CC


def main(path: str) -> None:
    from numba import cuda
    from numba.cuda import dispatcher

    dispatcher.get_current_device = _Target  # type: ignore[assignment]

    with open(path, "rb") as f:
        launches = pickle.load(f)
    done, failed = [], {}
    for module, name, argtypes in launches:
        kernel = getattr(importlib.import_module(module), name)
        label = f"{module}.{name}{tuple(str(t) for t in argtypes)}"
        try:
            cuda.compile_ptx(kernel.py_func, tuple(argtypes), cc=CC)
        except Exception as e:  # noqa: BLE001 - each kernel's error is the report
            text = f"{type(e).__name__}: {e}"
            if "NVVM" in text or "nvrtc" in text.lower() or "libnvvm" in text:
                print(json.dumps({"unavailable": text[:500]}))
                return
            failed[label] = text[:4000]
        else:
            done.append(label)
    print(json.dumps({"compiled": done, "failed": failed}))


if __name__ == "__main__":
    main(sys.argv[1])
