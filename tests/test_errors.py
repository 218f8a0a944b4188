"""Bad input gets a specific error, with a message that says what was wrong, and changes nothing.

Each case runs on every backend: the same checks guard every kernel.
"""

import copy

import numpy as np
import pytest

import pagedkv as pk
from pagedkv import CacheConfig, KVPool
from pagedkv.testing import strategies as pst

from .conftest import device_empty, host, on_device


def out(backend, tokens):
    """An output buffer of ``tokens`` rows where ``backend`` keeps its outputs."""
    return device_empty(backend, (tokens, 2, 4))


def strided_out(backend):
    """An output buffer of 3 rows whose numbers are every other one of a larger array's: a kernel
    writes its rows densely, so outputs must be C-contiguous (inputs are copied once instead)."""
    return device_empty(backend, (3, 2, 8))[:, :, ::2]

CONFIG = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, num_blocks=4, block_size=4)
OTHER = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, num_blocks=5, block_size=4)
T = 3
KEY = np.ones((T, 2, 4), np.float32)
SLOTS = np.array([0, 5, -1], np.int64)
TABLES = np.array([[0, 1], [2, -1]], np.int32)
LENS = np.array([5, 3], np.int32)
I64 = lambda *x: np.array(x, np.int64)  # noqa: E731
Q = np.ones((2, 4, 4), np.float32)

# name: (call(backend, pool, other_pool), exception, words the message must contain)
CASES = {
    "write key float64": (lambda b, p, o: b.write(p, 0, KEY.astype(np.float64), KEY, SLOTS), pk.DTypeError, "float32"),
    "write key a list": (lambda b, p, o: b.write(p, 0, KEY.tolist(), KEY, SLOTS), pk.DTypeError, "array"),
    "write key 2-D": (lambda b, p, o: b.write(p, 0, KEY[0], KEY[0], SLOTS), pk.ShapeError, "[T, 2, 4]"),
    "write key wrong heads": (lambda b, p, o: b.write(p, 0, np.ones((T, 3, 4), np.float32), KEY, SLOTS),
                              pk.ShapeError, "[T, 2, 4]"),
    "write value fewer tokens": (lambda b, p, o: b.write(p, 0, KEY, KEY[:2], SLOTS), pk.ShapeError, "expected 3"),
    "read out not contiguous": (lambda b, p, o: b.read(p, 0, SLOTS, out=(strided_out(b), out(b, 3))),
                                pk.ContiguityError, "C-contiguous"),
    "write slots int32": (lambda b, p, o: b.write(p, 0, KEY, KEY, SLOTS.astype(np.int32)), pk.DTypeError, "int64"),
    "write slots a list": (lambda b, p, o: b.write(p, 0, KEY, KEY, [0, 1, 2]), pk.DTypeError, "slot_mapping"),
    "write slots 2-D": (lambda b, p, o: b.write(p, 0, KEY, KEY, SLOTS[None]), pk.ShapeError, "dimension"),
    "write slots too few": (lambda b, p, o: b.write(p, 0, KEY, KEY, SLOTS[:2]), pk.ShapeError, "2 entries for 3"),
    "write slot past the pool": (lambda b, p, o: b.write(p, 0, KEY, KEY, I64(0, 16, 1)), pk.SlotIndexError, "slot 16"),
    "write duplicate slot": (lambda b, p, o: b.write(p, 0, KEY, KEY, I64(7, -1, 7)), pk.DuplicateSlotError, "slot 7"),
    "write layer too big": (lambda b, p, o: b.write(p, 2, KEY, KEY, SLOTS), pk.LayerIndexError, "layer 2"),
    "write layer negative": (lambda b, p, o: b.write(p, -1, KEY, KEY, SLOTS), pk.LayerIndexError, "layer -1"),
    "write layer not int": (lambda b, p, o: b.write(p, 0.0, KEY, KEY, SLOTS), pk.LayerIndexError, "integer"),
    "write not a pool": (lambda b, p, o: b.write(p.data, 0, KEY, KEY, SLOTS), pk.PoolMismatchError, "KVPool"),
    "read slot past the pool": (lambda b, p, o: b.read(p, 0, I64(99)), pk.SlotIndexError, "slot 99"),
    "read slots float": (lambda b, p, o: b.read(p, 0, np.zeros(2)), pk.DTypeError, "int64"),
    "gather tables int64": (lambda b, p, o: b.gather(p, 0, TABLES.astype(np.int64), LENS), pk.DTypeError, "int32"),
    "gather lens int64": (lambda b, p, o: b.gather(p, 0, TABLES, LENS.astype(np.int64)), pk.DTypeError, "int32"),
    "gather tables 1-D": (lambda b, p, o: b.gather(p, 0, TABLES[0], LENS), pk.ShapeError, "dimension"),
    "gather lens mismatch": (lambda b, p, o: b.gather(p, 0, TABLES, LENS[:1]), pk.ShapeError, "1 entries for 2"),
    "gather negative len": (lambda b, p, o: b.gather(p, 0, TABLES, np.array([1, -2], np.int32)),
                            pk.ContextLengthError, "negative"),
    "gather len past table": (lambda b, p, o: b.gather(p, 0, TABLES, np.array([9, 0], np.int32)),
                              pk.ContextLengthError, "context_lens[0] = 9"),
    "gather padding block used": (lambda b, p, o: b.gather(p, 0, TABLES, np.array([1, 5], np.int32)),
                                  pk.BlockIndexError, "block_tables[1, 1] = -1"),
    "gather block past the pool": (lambda b, p, o: b.gather(p, 0, np.array([[4]], np.int32), np.array([1], np.int32)),
                                   pk.BlockIndexError, "= 4"),
    "gather out too short": (lambda b, p, o: b.gather(p, 0, TABLES, LENS, out=(out(b, 7), out(b, 7))),
                             pk.ShapeError, "expected 8"),
    "read out not a pair": (lambda b, p, o: b.read(p, 0, SLOTS, out=out(b, 3)), pk.ShapeError, "pair"),
    "read out the same array twice": (lambda b, p, o: (lambda x: b.read(p, 0, SLOTS, out=(x, x)))(out(b, 3)),
                                      pk.ShapeError, "overlap"),
    "copy src past the pool": (lambda b, p, o: b.copy_blocks(p, I64(4), I64(0)), pk.BlockIndexError, "block 4"),
    "copy dst negative": (lambda b, p, o: b.copy_blocks(p, I64(0), I64(-1)), pk.BlockIndexError, "block -1"),
    "copy lengths differ": (lambda b, p, o: b.copy_blocks(p, I64(0, 1), I64(2)), pk.ShapeError, "src has 2"),
    "copy onto itself": (lambda b, p, o: b.copy_blocks(p, I64(1, 2), I64(3, 2)), pk.BlockCopyError, "onto itself"),
    "copy two into one": (lambda b, p, o: b.copy_blocks(p, I64(0, 1), I64(3, 3)), pk.BlockCopyError, "more than one"),
    "copy chain": (lambda b, p, o: b.copy_blocks(p, I64(0, 1), I64(1, 2)), pk.BlockCopyError, "both a source"),
    "copy int32 ids": (lambda b, p, o: b.copy_blocks(p, np.array([0], np.int32), I64(1)), pk.DTypeError, "int64"),
    "swap geometry differs": (lambda b, p, o: b.swap_blocks(o, p, I64(0), I64(1)), pk.PoolMismatchError, "geometry"),
    # front-door holes: each used to reach a kernel or escape as a builtin error
    "read out inside the pool": (lambda b, p, o: b.read(p, 0, SLOTS, out=(p.data[24:48].reshape(3, 2, 4), out(b, 3))),
                                 pk.ArgumentError, "overlaps the pool's memory"),
    "gather out inside the pool": (lambda b, p, o: b.gather(p, 0, TABLES, LENS,
                                                            out=(out(b, 8), p.data[:64].reshape(8, 2, 4))),
                                   pk.ArgumentError, "out[1] overlaps the pool's memory"),
    "read outs overlap in part": (lambda b, p, o: (lambda x: b.read(p, 0, SLOTS, out=(x[0:3], x[2:5])))(out(b, 6)),
                                  pk.ShapeError, "overlap"),
    "swap pools sharing one buffer": (lambda b, p, o: b.swap_blocks(p, copy.copy(p), I64(1, 2), I64(2, 3)),
                                      pk.BlockCopyError, "both a source"),
    "attention scale past float64": (lambda b, p, o: b.paged_attention(Q, p, 0, TABLES, LENS, scale=10**400),
                                     pk.ArgumentError, "outside float32"),
    "attention soft_cap past float64": (lambda b, p, o: b.paged_attention(Q, p, 0, TABLES, LENS, soft_cap=-10**400),
                                        pk.ArgumentError, "outside float32"),
    "attention window past int64": (lambda b, p, o: b.paged_attention(Q, p, 0, TABLES, LENS, sliding_window=10**30),
                                    pk.ArgumentError, "sliding_window must be an integer in 1..2147483647"),
    "attention window uint64": (lambda b, p, o: b.paged_attention(Q, p, 0, TABLES, LENS,
                                                                  sliding_window=np.uint64(2**64 - 1)),
                                pk.ArgumentError, "sliding_window"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_rejected_and_changes_nothing(backend, case):
    call, error, words = CASES[case]
    pool = on_device(pst.filled_pool(CONFIG, 1), backend)
    other = on_device(pst.filled_pool(OTHER, 2), backend)
    before, other_before = host(pool), host(other)
    with pytest.raises(error) as info:
        call(backend, pool, other)
    assert words in str(info.value)
    assert isinstance(info.value, pk.PagedKVError)
    np.testing.assert_array_equal(host(pool), before)
    np.testing.assert_array_equal(host(other), other_before)


def test_swap_into_one_destination_twice(backend):
    src = on_device(pst.filled_pool(CONFIG, 1), backend)
    dst = on_device(pst.filled_pool(CONFIG, 2), backend)
    before = host(dst)
    with pytest.raises(pk.BlockCopyError, match="more than one"):
        backend.swap_blocks(src, dst, I64(0, 1), I64(2, 2))
    np.testing.assert_array_equal(host(dst), before)


@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_a_read_only_out_is_refused(name):
    pool = pst.filled_pool(CONFIG, 1)
    before = host(pool)
    k, v = np.zeros((3, 2, 4), np.float32), np.zeros((3, 2, 4), np.float32)
    v.flags.writeable = False
    with pytest.raises(pk.ArgumentError, match=r"out\[1\] is read-only"):
        pk.get_backend(name).read(pool, 0, SLOTS, out=(k, v))
    np.testing.assert_array_equal(host(pool), before)


def test_strided_index_arrays_give_the_result_of_their_values(backend):
    """A sliced (strided or reversed) index array is taken for its values on every backend;
    the cuda backend used to let numpy's ValueError about non-contiguous buffers escape."""
    slots = I64(9, 0, 6, 0, 3)[::2]  # 9, 6, 3
    tables = np.array([[3, 0, 1, 0], [2, 0, 0, 0]], np.int32)[:, ::2]  # [[3, 1], [2, 0]]
    want = pst.filled_pool(CONFIG, 1)
    ref = pk.get_backend("numpy")
    ref.write(want, 1, KEY, 2 * KEY, np.ascontiguousarray(slots))
    pool = on_device(pst.filled_pool(CONFIG, 1), backend)
    backend.write(pool, 1, KEY, 2 * KEY, slots)
    np.testing.assert_array_equal(host(pool), host(want))
    backend.write(pool, 0, KEY, KEY, slots[::-1].copy()[::-1])  # reversed twice: a negative-stride view
    ref.write(want, 0, KEY, KEY, np.ascontiguousarray(slots))
    np.testing.assert_array_equal(host(pool), host(want))
    got = backend.gather(pool, 1, tables, LENS)
    expected = ref.gather(want, 1, np.ascontiguousarray(tables), LENS)
    for g, e in zip(got[:2], expected[:2], strict=True):
        np.testing.assert_array_equal(host(g), e)


def test_errors_are_also_builtin_kinds():
    assert issubclass(pk.SlotIndexError, IndexError)
    assert issubclass(pk.DTypeError, TypeError)
    assert issubclass(pk.ShapeError, ValueError)
    assert issubclass(pk.UnknownSequenceError, KeyError)
    assert str(pk.UnknownSequenceError("no sequence 3")) == "no sequence 3"


def test_unknown_backend():
    with pytest.raises(pk.BackendUnavailableError, match="unknown backend"):
        pk.get_backend("fortran")


def test_cuda_backend_wants_device_outputs():
    backend = pytest.importorskip("pagedkv.backends.cuda")
    if pk.available_backends()["cuda"] is not None:
        pytest.skip("no GPU and no simulator")
    pool = KVPool(CONFIG, device="cuda")
    with pytest.raises(pk.DTypeError, match="device arrays"):
        backend.read(pool, 0, SLOTS, out=(np.empty((3, 2, 4), np.float32), np.empty((3, 2, 4), np.float32)))


def test_a_cpu_backend_refuses_a_gpu_pool_and_back():
    if pk.available_backends()["cuda"] is not None:
        pytest.skip("no GPU and no simulator")
    with pytest.raises(pk.PoolMismatchError, match="needs a pool on 'cpu'"):
        pk.get_backend("numba").write(KVPool(CONFIG, device="cuda"), 0, KEY, KEY, SLOTS)
    with pytest.raises(pk.PoolMismatchError, match="needs a pool on 'cuda'"):
        pk.get_backend("cuda").write(KVPool(CONFIG), 0, KEY, KEY, SLOTS)


def test_the_pool_array_cannot_be_replaced():
    """Kernels trust the pool's size and dtype: the attribute is read-only, and a pool whose
    array was reshaped behind its back is refused before any kernel runs."""
    pool = KVPool(CONFIG)
    with pytest.raises(AttributeError):
        pool.data = np.zeros(3, np.float32)
    pool.data.shape = (2, -1)  # reshaped in place
    with pytest.raises(pk.PoolMismatchError, match="the pool's data"):
        pk.get_backend("numba").write(pool, 0, KEY, KEY, SLOTS)


def test_index_totals_that_overflow_int32_are_refused_before_any_allocation():
    """context_lens adding up past 2**31 would wrap cu_seqlens; the check comes first (and no
    gigabytes are allocated to find out)."""
    config = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=1, num_blocks=1, block_size=2**20)
    pool = KVPool(config)  # 8 MiB
    tables = np.zeros((3, 2**11), np.int32)  # every used entry is block 0
    lens = np.full(3, 2**30, np.int32)
    for name in ("numpy", "numba"):
        with pytest.raises(pk.ContextLengthError, match="more than int32"):
            pk.get_backend(name).gather(pool, 0, tables, lens)
    with pytest.raises(pk.ConfigError, match="int32"):
        CacheConfig(num_layers=1, num_kv_heads=1, head_dim=1, num_blocks=2**31, block_size=1)
    with pytest.raises(pk.ConfigError, match="int64"):
        CacheConfig(num_layers=2**20, num_kv_heads=2**10, head_dim=2**10, num_blocks=2**20, block_size=2**10)
    with pytest.raises(pk.ContextLengthError, match="int32"):
        pk.layout.cu_seqlens(np.array([2**31 - 1, 1]))
