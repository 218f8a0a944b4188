"""The bookkeeping of blocks: which sequence holds which block, and which blocks hold a prefix.

- :mod:`.block_pool`: free blocks, reference counts and the prefix-cache index, with
  :mod:`.retention` (the order in which cached blocks are evicted) and :mod:`.events`
  (what was stored and removed, for an external index);
- :mod:`.block_table`: the int32 rows a kernel reads;
- :mod:`.prefix_key`: the chained keys of full blocks; :mod:`.prefix_cache` finds and
  registers them;
- :mod:`.sequence` and :mod:`.manager`: :class:`~pagedkv.BlockManager`, sequences, forks,
  appends, copy-on-write, preemption, and the views of a sequence that kernels read (block
  tables, lengths, page lists); :class:`~pagedkv.SlidingWindowManager`, the manager of a
  sliding-window layer group, which lets go of the blocks that leave the window.

Pure Python over integers: no numbers of the pool pass through here. Imports only from
:mod:`pagedkv.geometry` and below.
"""
