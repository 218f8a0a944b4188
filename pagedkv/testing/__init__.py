"""Test tooling for paged-KV kernels (needs ``pip install "pagedkv[verify]"``: hypothesis).

- :mod:`pagedkv.testing.strategies`: hypothesis strategies for cache geometries,
  slot mappings with padding, block tables with shared and repeated blocks,
  block-copy lists, and whole workloads.
- :mod:`pagedkv.testing.checkers`: ``check_write``, ``check_read``, ``check_gather``,
  ``check_copy_blocks``, ``check_swap_blocks``, ``check_paged_attention``: point
  them at your kernel to learn whether it agrees with pagedkv's exact reference,
  and if not, which element of which case is wrong.
- :mod:`pagedkv.testing.tolerance`: the stated float32 attention tolerance.
- :mod:`pagedkv.testing.manager_check`: a model checker for anyone's block manager
  (``check_block_manager``) and the peers' bug classes as named scenarios.
- ``pagedkv verify`` (:mod:`pagedkv.testing.verify`): the checkers from the command line.
"""

from . import strategies, tolerance
from .checkers import (
    KernelMismatch,
    KernelSignatureError,
    check_copy_blocks,
    check_gather,
    check_paged_attention,
    check_read,
    check_swap_blocks,
    check_write,
)

__all__ = [
    "strategies", "tolerance", "KernelMismatch", "KernelSignatureError", "check_write", "check_read", "check_gather",
    "check_copy_blocks", "check_swap_blocks", "check_paged_attention",
]
