"""The memory a pool's numbers live in.

- :mod:`.device`: host arrays (aligned) and GPU arrays, and telling them apart;
- :mod:`.pool`: :class:`~pagedkv.KVPool`, one flat array of blocks (and its int8 or fp8
  scales) shaped by a :class:`~pagedkv.CacheConfig`;
- :mod:`.conventions`: exact converters between a pool and the cache layouts of other
  engines (vLLM, FlashInfer, transformers).

Imports only from :mod:`pagedkv.geometry` and below.
"""
