"""pagedkv in one page: store two sequences' keys and values in blocks, fork one, read them back.

Run:  python examples/quickstart.py
"""

import numpy as np

import pagedkv

config = pagedkv.CacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, num_blocks=8, block_size=4)
pool = pagedkv.KVPool(config)
kv = pagedkv.get_backend("auto")  # numba if installed, else the numpy reference
ref = pagedkv.get_backend("numpy")
print(pool, "| backend:", kv.NAME)

rng = np.random.default_rng(0)
# Sequence A has 6 tokens in blocks 5 and 2; sequence B has 3 tokens in block 7.
tables = np.array([[5, 2], [7, -1]], dtype=np.int32)
lens = np.array([6, 3], dtype=np.int32)
slots = np.array([5 * 4 + 0, 5 * 4 + 1, 5 * 4 + 2, 5 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1,  # A
                  7 * 4 + 0, 7 * 4 + 1, 7 * 4 + 2], dtype=np.int64)                    # B
key = rng.standard_normal((9, 2, 4), dtype=np.float32)
value = rng.standard_normal((9, 2, 4), dtype=np.float32)
for layer in range(config.num_layers):
    kv.write(pool, layer, key, value, slots)

k, v, cu = kv.gather(pool, 0, tables, lens)
print("gathered", k.shape, "cu_seqlens", cu.tolist(), "equal to what was written:", np.array_equal(k, key))

# Fork A: its child shares block 5 and gets a private copy of the partly filled block 2 in block 0.
kv.copy_blocks(pool, np.array([2]), np.array([0]))
child = np.array([[5, 0]], dtype=np.int32)
kc, _, _ = kv.gather(pool, 1, child, np.array([6], dtype=np.int32))
print("child sees the parent's 6 tokens:", np.array_equal(kc, key[:6]))

# Every backend gives the reference's answer, bit for bit.
expected = pagedkv.KVPool(config)
for layer in range(config.num_layers):
    ref.write(expected, layer, key, value, slots)
ref.copy_blocks(expected, np.array([2]), np.array([0]))
print("pool identical to the numpy reference:", np.array_equal(pool.data, expected.data))

try:
    kv.write(pool, 0, key[:1], value[:1], np.array([99], dtype=np.int64))
except pagedkv.SlotIndexError as e:
    print("bad input is refused before any kernel runs:", e)
