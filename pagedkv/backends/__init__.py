"""Backends: the same routines, with the same signatures, on different machinery.

Each backend is a module with ``NAME``, ``DEVICE`` (``"cpu"`` or ``"cuda"``,
where its pools live) and the routines ``write``, ``read``, ``gather``,
``copy_blocks``, ``swap_blocks`` and ``paged_attention``. They validate their
inputs with :mod:`pagedkv.validate` before any kernel runs.

========  ==========================================  ===================
name      what                                        needs
========  ==========================================  ===================
numpy     the exact reference, plain numpy            numpy
numba     parallel CPU kernels (``numba.njit``)       numba
cuda      GPU kernels (``numba.cuda``)                numba-cuda and a GPU
                                                      (or the simulator)
========  ==========================================  ===================
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import BackendUnavailableError

#: backend name -> module inside this package
_MODULES = {"numpy": "reference", "numba": "numba_cpu", "cuda": "cuda"}

BACKENDS = tuple(_MODULES)


def get_backend(name: str = "auto") -> ModuleType:
    """The backend module called ``name``: ``"numpy"``, ``"numba"``, ``"cuda"`` or ``"auto"``.

    ``"auto"`` is the fastest CPU backend present (numba, else numpy); a GPU
    backend is chosen by asking for ``"cuda"``, since its pools live on the GPU.

    Raises:
        BackendUnavailableError: an unknown name, or a backend that cannot run
            here (the message says what is missing).
    """
    if name == "auto":
        try:
            return get_backend("numba")
        except BackendUnavailableError:
            return get_backend("numpy")
    if name not in _MODULES:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {BACKENDS} or 'auto'")
    try:
        module = importlib.import_module(f".{_MODULES[name]}", __name__)
    except ImportError as e:
        raise BackendUnavailableError(f"backend {name!r} needs a package that is missing: {e}") from e
    check = getattr(module, "check_available", None)
    if check is not None:
        check()
    return module


def available_backends() -> dict[str, str | None]:
    """Each backend name mapped to ``None`` if it runs here, else the reason it does not."""
    out: dict[str, str | None] = {}
    for name in BACKENDS:
        try:
            get_backend(name)
            out[name] = None
        except BackendUnavailableError as e:
            out[name] = str(e)
    return out
