"""Blocks outside the pool: stored, found again, shared between processes.

- :mod:`.stored_block`: one block's bytes as a self-describing value (header, payload,
  checksum) and the checks that refuse any value this pool did not write;
- :mod:`.stores`: where values go (host memory, a directory, Redis);
- :mod:`.tiers`: the stores behind the prefix cache, asked in order, written behind.

Imports only from :mod:`pagedkv.blocks` and below.
"""
