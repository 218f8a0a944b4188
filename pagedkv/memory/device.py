"""Where arrays live: the host (numpy) or a CUDA GPU (numba device arrays).

The only module below the backends that touches ``numba.cuda``, and only when
asked for the GPU: ``import pagedkv`` never needs it.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from ..errors import BackendUnavailableError, DTypeError

DEVICES = ("cpu", "cuda")


class DeviceArray(Protocol):
    """What pagedkv uses of a GPU array (numba's ``DeviceNDArray``)."""

    shape: tuple[int, ...]
    size: int
    dtype: Any

    def copy_to_host(self) -> np.ndarray: ...

    def copy_to_device(self, ary: Any) -> None: ...

    def reshape(self, *shape: int) -> Any: ...

    def __getitem__(self, index: Any) -> Any: ...


#: an array of a pool or a kernel: numpy on the host, a device array on a GPU
Array = np.ndarray | DeviceArray


def cuda_module() -> Any:
    """``numba.cuda``, or a BackendUnavailableError saying what is missing."""
    try:
        from numba import cuda
    except ImportError as e:  # numba-cuda missing or broken
        raise BackendUnavailableError(f"backend 'cuda' needs numba-cuda (pip install 'pagedkv[gpu]'): {e}") from e
    if not cuda.is_available():
        raise BackendUnavailableError(
            "backend 'cuda' found no usable GPU (numba.cuda.is_available() is False); "
            "on a machine without one, NUMBA_ENABLE_CUDASIM=1 runs the kernels on numba's simulator"
        )
    return cuda


HOST_ALIGNMENT = 64  #: bytes: where host pools and the CPU backends' large new outputs begin (one cache line)


def host_aligned(shape: int | tuple[int, ...], dtype: Any, *, zero: bool = False) -> np.ndarray:
    """A new C-contiguous numpy array whose first element lies on a :data:`HOST_ALIGNMENT`
    boundary (numpy's own start 16 bytes into a page), zeroed if ``zero``.

    Rows of 128 float32 numbers then fill whole cache lines, which streaming stores need
    to write a line at once (:mod:`pagedkv.backends.numba.stream`). The array is a view
    into a buffer ``HOST_ALIGNMENT`` bytes longer.
    """
    dtype = np.dtype(dtype)
    count = math.prod(shape) if isinstance(shape, tuple) else shape
    make = np.zeros if zero else np.empty
    buffer = make(count * dtype.itemsize + HOST_ALIGNMENT, dtype=np.uint8)
    start = -buffer.ctypes.data % HOST_ALIGNMENT
    return buffer[start:start + count * dtype.itemsize].view(dtype).reshape(shape)


def zeros(n: int, dtype: np.dtype, device: str) -> Array:
    """``n`` zeroed elements of ``dtype``: a numpy array on ``"cpu"`` (:func:`host_aligned`),
    a device array on ``"cuda"``."""
    if device == "cpu":
        return host_aligned(n, dtype, zero=True)
    cuda = cuda_module()
    data = cuda.device_array(n, dtype=dtype)
    if n:
        from ._cuda_fill import fill

        threads = 256
        fill[(n + threads - 1) // threads, threads](data, 0)
    return data


def is_device_array(a: object) -> bool:
    """Whether ``a`` is a numba device array."""
    return hasattr(a, "copy_to_host")


def host_view(a: object, name: str) -> np.ndarray | None:
    """``a`` as a numpy array without a copy if it is a host array of any library: numpy as is;
    anything with ``__array_interface__`` or the buffer protocol (``memoryview``, ``array``);
    anything that exports a CPU DLPack tensor (a CPU torch tensor, a JAX CPU array). None for
    anything else (a GPU array, a list).

    Raises:
        DTypeError: a DLPack producer numpy cannot view (a bfloat16 torch tensor: pass
            ``t.view(torch.uint16)``, which pagedkv reads as bfloat16 bits; a tensor that
            requires grad: pass ``t.detach()``).
    """
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "__cuda_array_interface__") or is_device_array(a):
        return None
    if hasattr(a, "__array_interface__"):
        return np.asarray(a)
    if hasattr(a, "__dlpack__"):
        try:
            return np.from_dlpack(a)
        except (BufferError, RuntimeError, TypeError, ValueError) as e:
            hint = " (for bfloat16 pass t.view(torch.uint16), read as bfloat16 bits)" if "dtype" in str(e) else ""
            raise DTypeError(f"{name}: numpy cannot view this {type(a).__name__}: {e}{hint}") from None
    try:
        return np.asarray(memoryview(a))  # type: ignore[arg-type]
    except TypeError:
        return None


def host_array(a: object, name: str) -> np.ndarray:
    """``a`` as a numpy array: a host array of any library viewed (:func:`host_view`), a GPU
    array copied to the host.

    Accepts numpy arrays and host arrays of other libraries, numba device arrays, CuPy arrays
    and any object with ``__cuda_array_interface__`` (torch CUDA tensors).
    """
    view = host_view(a, name)
    if view is not None:
        return view
    if is_device_array(a):
        return a.copy_to_host()  # type: ignore[attr-defined]
    if hasattr(a, "__cuda_array_interface__"):  # CuPy, torch CUDA tensors
        from numba import cuda

        if hasattr(cuda, "as_cuda_array"):  # absent under the CUDA simulator
            return cuda.as_cuda_array(a).copy_to_host()
    raise DTypeError(f"{name} must be an array, got {type(a).__name__}")


def byte_bounds(a: object) -> tuple[bool, int, int] | None:
    """``(on_gpu, low, high)``: the addresses ``[low, high)`` that an array's elements span,
    from its ``__cuda_array_interface__`` (GPU arrays) or ``__array_interface__`` (numpy, and
    the CUDA simulator's arrays); None for an empty array or an object with neither."""
    iface = getattr(a, "__cuda_array_interface__", None)
    on_gpu = iface is not None
    if iface is None:
        iface = getattr(a, "__array_interface__", None)
    if not isinstance(iface, dict) or 0 in iface["shape"]:
        return None
    shape, itemsize = iface["shape"], int(iface["typestr"][2:])
    strides = iface.get("strides") or tuple(math.prod(shape[i + 1:]) * itemsize for i in range(len(shape)))
    low = high = int(iface["data"][0])
    for n, stride in zip(shape, strides, strict=True):
        if stride < 0:
            low += (n - 1) * stride
        else:
            high += (n - 1) * stride
    return on_gpu, low, high + itemsize


def overlap(a: object, b: object) -> bool:
    """Whether arrays ``a`` and ``b`` may share memory (their address ranges meet, on the same side)."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return bool(np.may_share_memory(a, b))  # the same test, in C: a decode step calls this per layer
    x, y = byte_bounds(a), byte_bounds(b)
    return x is not None and y is not None and x[0] == y[0] and x[1] < y[2] and y[1] < x[2]

