"""Test tooling for paged-KV kernels: hypothesis strategies (needs ``pagedkv[test]``).

:mod:`pagedkv.testing.strategies` draws cache geometries, slot mappings with
padding, block tables with shared and repeated blocks and block-copy lists:
the inputs pagedkv's own agreement tests run every backend on.
"""

from . import strategies

__all__ = ["strategies"]
