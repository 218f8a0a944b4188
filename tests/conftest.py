"""Shared test setup: hypothesis profiles, the backend fixture, pool helpers.

The numba.cuda kernels run under numba's CUDA simulator unless a real NVIDIA
GPU is present; the simulator must be switched on before numba is imported,
which is why this happens first.
"""

import os
import shutil
import sys

if "NUMBA_ENABLE_CUDASIM" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if SIMULATED:
    # The simulator's block manager busy-polls its threads while holding the GIL, so each
    # __syncthreads() waits out Python's thread switch interval (5 ms): shortened, so they wait less.
    sys.setswitchinterval(0.0005)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import pagedkv  # noqa: E402
from pagedkv import KVPool  # noqa: E402


def pytest_configure(config):
    # The notice pagedkv.backends.numba.codecs and _numba_decode silence for users (pytest resets
    # filters per test). Added here, not in pyproject.toml: naming the warning class imports
    # numba, which must wait until NUMBA_ENABLE_CUDASIM is set above.
    config.addinivalue_line(
        "filterwarnings",
        "ignore:variable '_((store|decode)_row|stage_heads)__locals__:numba.core.errors.NumbaIRAssumptionWarning")


# deadline=None: a first call compiles a kernel, which takes far longer than 200 ms.
# function_scoped_fixture: the backend fixtures return stateless modules.
_common = dict(deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=60, derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", max_examples=60, **_common)
settings.register_profile("thorough", max_examples=1000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# Adding a backend to pagedkv adds it here, and so to every agreement and error test.
BACKENDS = list(pagedkv.BACKENDS)
_AVAILABLE = pagedkv.available_backends()


def _backend(request, monkeypatch):
    reason = _AVAILABLE[request.param]
    if reason is not None:
        pytest.skip(reason)
    backend = pagedkv.get_backend(request.param)
    if request.param == "cuda":
        request.applymarker(pytest.mark.cuda)
        if SIMULATED:
            shrink_cuda_launches(backend, monkeypatch)
    return backend


def record_launches(monkeypatch) -> list:
    """From now on (until the monkeypatch is undone), every CUDA kernel launch under the simulator
    as (module, kernel name, argument types), in order."""
    import numba
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    from numba.cuda.simulator.kernel import FakeCUDAKernel, _get_kernel_context

    seen: list = []
    launch = FakeCUDAKernel.__call__

    def recorded(self, *args):
        if not self._device and _get_kernel_context() is None:
            types = tuple(numba.typeof(a._ary if isinstance(a, FakeCUDAArray) else a) for a in args)
            seen.append((self.fn.__module__, self.fn.__name__, types))
        return launch(self, *args)

    monkeypatch.setattr(FakeCUDAKernel, "__call__", recorded)
    return seen


def shrink_cuda_launches(backend, monkeypatch) -> None:
    """Tiny CUDA blocks (restored after the test), so that tiny cases still span several of them."""
    monkeypatch.setattr(backend, "THREADS_PER_BLOCK", 32)
    monkeypatch.setattr(backend, "ATTENTION_THREADS", 8)
    monkeypatch.setattr(backend, "LANES", 2)  # four "warps" of two lanes: the reductions and the warps' turns
    monkeypatch.setattr(backend, "SPLIT_POSITIONS", 16)  # contexts over 16 positions take the split-K path
    monkeypatch.setattr(backend, "SPLIT_BELOW_BLOCKS", 10**9)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Every backend in turn; one that cannot run here is skipped with its reason."""
    return _backend(request, monkeypatch)


@pytest.fixture(params=[b for b in BACKENDS if b != "numpy"])
def fast_backend(request, monkeypatch):
    """Every backend but the reference, to be compared with it."""
    return _backend(request, monkeypatch)


def on_device(host_pool: KVPool, backend) -> KVPool:
    """A pool for ``backend`` holding a copy of ``host_pool``'s numbers (and scales)."""
    pool = KVPool(host_pool.config, device=backend.DEVICE)
    if backend.DEVICE == "cpu":
        pool.data[:] = host_pool.data
        if host_pool.scales is not None:
            pool.host_scales[:] = host_pool.host_scales
    else:
        pool.data.copy_to_device(host_pool.data)
        if host_pool.scales is not None:
            pool.scales.copy_to_device(host_pool.host_scales)
    scales = host_pool.kv_scales
    for layer in range(len(scales) if scales is not None else 0):
        pool.set_kv_scales(layer, *scales[layer])
    return pool


def pool_bytes(pool: KVPool) -> np.ndarray:
    """Every byte a pool holds: its elements, then its int8 scales and fp8 k/v scales, if any
    (so that a comparison is bit for bit, NaNs included)."""
    parts = [host(pool).view(np.uint8)]
    if pool.scales is not None:
        parts.append(host(pool.scales).view(np.uint8))
    if pool.kv_scales is not None:
        parts.append(pool.kv_scales.view(np.uint8).ravel())
    return np.concatenate(parts)


def bits(x) -> np.ndarray:
    """An array's bytes, for bit-exact comparison of results that may hold NaN."""
    return np.ascontiguousarray(host(x)).view(np.uint8)


#: every storage format: each backend runs all of them, on the CPU and on a GPU
ALL_FORMATS = tuple(pagedkv.geometry.formats.FORMATS)


def device_empty(backend, shape) -> object:
    """An uninitialised float32 array where ``backend`` keeps its outputs."""
    if backend.DEVICE == "cpu":
        return np.full(shape, np.nan, dtype=np.float32)  # NaN: a row left unwritten shows
    from numba import cuda

    return cuda.to_device(np.full(shape, np.nan, dtype=np.float32))


def host(x) -> np.ndarray:
    """Any array or pool as a numpy array (copied from the GPU when needed)."""
    if isinstance(x, KVPool):
        return x.to_host().copy()
    return pagedkv.memory.device.host_array(x, "result").copy()


#: how a peer may hand pagedkv an array: as numpy does, as a strided view of a larger array (vLLM's
#: and FlashInfer's ``key = kv[:, 0]``), through the buffer protocol, or as a CPU torch tensor
INPUT_KINDS = ("numpy", "strided", "memoryview", "torch")


def as_input(x: np.ndarray, kind: str):
    """``x``'s numbers, handed over as ``kind`` (:data:`INPUT_KINDS`; "torch" only where torch is)."""
    if kind == "strided":
        both = np.empty((x.shape[0], 2, *x.shape[1:]), x.dtype)
        both[:, 0] = x
        both[:, 1] = np.nan if x.dtype.kind == "f" else -7  # numbers a kernel reading them would show
        return both[:, 0]
    if kind == "memoryview":
        return memoryview(np.ascontiguousarray(x))
    if kind == "torch":
        torch = pytest.importorskip("torch")
        return torch.from_numpy(x.copy())
    return x
