"""The geometry of a pool: where every number lives, and how it is stored.

- :mod:`.layout`: the offset arithmetic of the flat pool (strides, slots, blocks, ragged
  batches), plain functions that the numba and CUDA kernels compile as they are;
- :mod:`.formats`: the storage formats (float32, float16, bfloat16, fp8, int8) and their
  exact codecs;
- :mod:`.config`: :class:`~pagedkv.CacheConfig` and :class:`~pagedkv.LayerGroup`, a pool's
  shape checked once.

Pure arithmetic and descriptions: nothing here holds memory. Imports only :mod:`pagedkv.errors`.
"""
