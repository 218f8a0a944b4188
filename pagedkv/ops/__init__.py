"""The front door of the routines that move numbers in and out of a pool.

- :mod:`.validate`: every check of a routine's arguments, made before any kernel runs (a
  numba or CUDA kernel has no bounds checks: an unchecked index corrupts memory silently);
- :mod:`.plan`: a step's index arrays checked once and kept for every layer;
- :mod:`.routines`: each public routine (``write``, ``read``, ``gather``, ``copy_blocks``,
  ``swap_blocks``, ``paged_attention`` and the step API), written once: its documentation,
  its checks and its plan, then the kernels of whichever backend it is bound to.

Imports only from :mod:`pagedkv.memory` and below; the backends sit above and bind these
routines to their kernels (:mod:`pagedkv.backends.base` states the contract).
"""
