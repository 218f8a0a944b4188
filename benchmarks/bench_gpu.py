"""asv benchmarks of the cuda backend on a real GPU, beside CuPy and torch CUDA indexing and a
device-to-device copy of the same bytes. Skipped (NotImplementedError in setup) without a GPU,
and under the CUDA simulator, which measures nothing of interest."""

import os

import pagedkv

from . import harness as B

LAYOUTS = ["NHD", "HND"]
SHAPES = list(B.SHAPES)
GPU_ROUTINES = ["write", "gather", "gather_out", "copy_blocks", "swap_blocks"]


def _gpu():
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        raise NotImplementedError("the CUDA simulator is not benchmarked")
    try:
        return pagedkv.get_backend("cuda")
    except pagedkv.BackendUnavailableError as e:
        raise NotImplementedError(str(e)) from e


class GpuRoutines:
    params = (GPU_ROUTINES, LAYOUTS, SHAPES)
    param_names = ["routine", "layout", "shape"]
    timeout = 600

    def setup(self, routine, layout, shape):
        w = B.on_gpu(B.make_workload(shape, layout))
        self.call = B.backend_call(_gpu(), w, routine)
        self.call()
        B.gpu_sync()

    def time_routine(self, *_):
        self.call()
        B.gpu_sync()


class GpuPeers:
    params = (["cupy", "torch"], B.PEER_ROUTINES, LAYOUTS, SHAPES)
    param_names = ["peer", "routine", "layout", "shape"]
    timeout = 600

    def setup(self, peer, routine, layout, shape):
        _gpu()
        w = B.on_gpu(B.make_workload(shape, layout))
        self.call = B.gpu_peer(w, routine, peer)
        if self.call is None:
            raise NotImplementedError(f"{peer} is not installed")
        self.call()
        B.gpu_sync()

    def time_peer(self, *_):
        self.call()
        B.gpu_sync()


class GpuCopyLimit:
    params = (["write", "copy_blocks"], SHAPES)
    param_names = ["bytes_of", "shape"]

    def setup(self, bytes_of, shape):
        _gpu()
        self.copy = B.device_copy(B.bytes_moved(B.make_workload(shape), bytes_of))

    def time_device_copy(self, *_):
        self.copy()
        B.gpu_sync()


class GpuAttention:
    """Decode paged attention on the GPU (target: >= 0.5x the device copy bandwidth)."""

    params = [["NHD", "HND"]]
    param_names = ["layout"]
    timeout = 900

    def setup(self, layout):
        backend = _gpu()
        w = B.make_attention_workload(layout=layout)
        dev = B.on_gpu_attention(w)
        self.call = B.attention_call(backend, dev)
        self.call()
        B.gpu_sync()
        self.copy = B.device_copy(2 * w.kv_bytes)

    def time_paged_attention(self, *_):
        self.call()
        B.gpu_sync()

    def time_device_copy_of_kv(self, *_):
        self.copy()
        B.gpu_sync()


class GpuStepOverhead:
    """Issue 16, item 7: the host's cost of one layer's calls in a decode step, beside numba-cuda's
    launch of an empty kernel of one argument. The step is tiny (2 sequences, 16 tokens, one block
    each) so that the GPU has nothing to do and the time is the call's own: checks, argument
    marshalling (numba-cuda converts every argument on every launch) and the launch. Each layer
    launches two kernels (``tests/test_cuda.py`` counts them): write and attention."""

    params = [["write_step", "attention_step", "empty_launch"]]
    param_names = ["call"]

    def setup(self, call):
        self.call = B.step_overhead_calls(_gpu())[call]
        self.call()
        B.gpu_sync()

    def time_call(self, call):
        for _ in range(100):
            self.call()
        B.gpu_sync()
