"""What only the cuda backend does: host <-> device swaps, device inputs, its unavailability error.

These run under numba's CUDA simulator on a machine without a GPU, and on the
real device when there is one.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pagedkv
from pagedkv import KVPool
from pagedkv.testing import strategies as pst

from .conftest import SIMULATED, host, on_device, record_launches, shrink_cuda_launches

pytestmark = pytest.mark.cuda
ref = pagedkv.get_backend("numpy")


@pytest.fixture
def gpu(monkeypatch):
    reason = pagedkv.available_backends()["cuda"]
    if reason is not None:
        pytest.skip(reason)
    backend = pagedkv.get_backend("cuda")
    if SIMULATED:
        shrink_cuda_launches(backend, monkeypatch)
    return backend


small = pst.configs(max_layers=2, max_kv_heads=2, max_head_dim=4, max_blocks=5, max_block_size=3)


@given(small, st.data(), st.integers(0, 2**32 - 1), st.booleans())
def test_offload_and_reload_match_the_reference(gpu, config, data, seed, offload):
    """swap_blocks between a host pool and a device pool, either way."""
    src_host = pst.filled_pool(config, seed)
    dst_host = pst.filled_pool(config, seed + 1)
    src, dst = data.draw(pst.block_copies(config, same_pool=False))
    expected = pst.filled_pool(config, seed + 1)
    ref.swap_blocks(src_host, expected, src, dst)
    if offload:  # device -> host
        gpu.swap_blocks(on_device(src_host, gpu), dst_host, src, dst)
        np.testing.assert_array_equal(dst_host.data, expected.data)
    else:  # host -> device
        dst_dev = on_device(dst_host, gpu)
        gpu.swap_blocks(src_host, dst_dev, src, dst)
        np.testing.assert_array_equal(host(dst_dev), expected.data)


def test_device_inputs_and_index_arrays_are_taken_as_they_are(gpu):
    from numba import cuda

    config = pagedkv.CacheConfig(num_layers=1, num_kv_heads=2, head_dim=3, num_blocks=3, block_size=2)
    pool = KVPool(config, device="cuda")
    key, value = pst.token_arrays(config, 3, 0)
    slots = np.array([4, -1, 1])
    gpu.write(pool, 0, cuda.to_device(key), cuda.to_device(value), cuda.to_device(slots))
    k, v = gpu.read(pool, 0, cuda.to_device(slots))
    np.testing.assert_array_equal(host(k)[[0, 2]], key[[0, 2]])
    assert not host(k)[1].any()
    np.testing.assert_array_equal(pool.k(0).copy_to_host()[2, 0], key[0])  # a device view
    tables, lens = cuda.to_device(np.array([[2, 0]], np.int32)), cuda.to_device(np.array([3], np.int32))
    k, v, cu = gpu.gather(pool, 0, tables, lens)
    np.testing.assert_array_equal(host(k), host(gpu.read(pool, 0, np.array([4, 5, 0]))[0]))
    gpu.copy_blocks(pool, cuda.to_device(np.array([2])), cuda.to_device(np.array([1])))
    np.testing.assert_array_equal(pool.k(0).copy_to_host()[1], pool.k(0).copy_to_host()[2])


def test_swap_between_two_host_pools_is_refused(gpu):
    config = pagedkv.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=1, num_blocks=2, block_size=1)
    with pytest.raises(pagedkv.PoolMismatchError, match="both pools are on the CPU"):
        gpu.swap_blocks(KVPool(config), KVPool(config), np.array([0]), np.array([1]))


def test_without_a_gpu_the_backend_says_what_is_missing():
    """A fresh process with no simulator and no GPU: pagedkv imports, and cuda is refused clearly."""
    if pagedkv.backends.cuda.cuda.is_available() and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        pytest.skip("a real GPU is present")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    code = (
        "import pagedkv\n"
        "try:\n"
        "    pagedkv.get_backend('cuda')\n"
        "except pagedkv.BackendUnavailableError as e:\n"
        "    print('refused:', e)\n"
        "print(pagedkv.get_backend('auto').NAME)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: backend 'cuda'" in out.stdout
    assert "NUMBA_ENABLE_CUDASIM" in out.stdout  # says how to run without a GPU
    assert out.stdout.strip().endswith("numba")


def test_gpu_benchmark_workloads_run(gpu):
    """The GPU benchmarks' code paths, at a size the simulator can run (no timing)."""
    from benchmarks import harness as bench

    for layout in ("NHD", "HND"):
        w = bench.on_gpu(bench.make_workload("prefill", layout, tokens=32, heads=2, head_dim=4, num_blocks=8))
        for routine in ("write", "gather", "gather_out", "copy_blocks", "swap_blocks"):
            bench.backend_call(gpu, w, routine)()
        bench.device_copy(64)()
        bench.gpu_sync()


def test_gpu_attention_benchmark_runs(gpu):
    from benchmarks import harness as bench
    from pagedkv.testing.tolerance import assert_attention_close

    cpu = bench.make_attention_workload(batch=2, context=5, q_heads=4, heads=2, head_dim=4)
    out = bench.attention_call(gpu, bench.on_gpu_attention(cpu))()
    expected = pagedkv.get_backend("numpy").paged_attention(cpu.q, cpu.pool, 0, cpu.tables, cpu.lens)
    assert_attention_close(host(out), expected, 5, 4, float(np.abs(cpu.pool.data).max()))


@pytest.mark.parametrize("split_positions, max_group", [(3, 32), (2, 2), (10**9, 1)])
def test_attention_paths_agree_with_the_reference(gpu, monkeypatch, split_positions, max_group):
    """Split-K or one pass; a group of query heads served by one CUDA block, or cut into parts of
    ``max_group`` heads (the last one short): attention within the float32 tolerance of the reference,
    a padding row of zeros, windows and caps included."""
    from pagedkv.testing.tolerance import assert_attention_close, score_bound

    monkeypatch.setattr(gpu, "SPLIT_POSITIONS", split_positions)
    monkeypatch.setattr(gpu, "GROUP_HEADS", max_group)
    config = pagedkv.CacheConfig(num_layers=1, num_kv_heads=2, head_dim=3, num_blocks=8, block_size=2)
    host_pool = pst.filled_pool(config, 7)
    tables = np.array([[3, 0, 6, 1], [2, 5, 7, 4]], np.int32)
    rng = np.random.default_rng(3)
    for lens, query_lens, window, cap in [([7, 4], None, None, None), ([0, 6], None, 2, None), ([8, 1], [3, 0], 3, 5.0),
                                          ([5, 6], [2, 4], None, None)]:
        lens = np.array(lens, np.int32)
        qlens = None if query_lens is None else np.array(query_lens, np.int32)
        rows = len(lens) if qlens is None else int(qlens.sum())
        q = rng.standard_normal((rows, 6, 3)).astype(np.float32)  # 3 query heads per K/V head
        options = dict(query_lens=qlens, sliding_window=window, soft_cap=cap)
        expected = ref.paged_attention(q, host_pool, 0, tables, lens, **options)
        actual = host(gpu.paged_attention(q, on_device(host_pool, gpu), 0, tables, lens, **options))
        if lens[0] == 0:
            assert not actual[0].any()  # a sequence with no context: a padding row of zeros
        largest = float(max(np.abs(host_pool.k(0)).max(), np.abs(host_pool.v(0)).max()))
        assert_attention_close(actual, expected, int(lens.max()), 3, largest,
                               score_bound(3, 1 / np.sqrt(3), float(np.abs(q).max()), largest))


@pytest.mark.parametrize("split", [False, True])
def test_a_decode_step_launches_two_kernels_a_layer(gpu, monkeypatch, split):
    """Launches per decode step, counted: planning the step launches nothing;
    each layer launches one write and one attention kernel (three with split-K: the combine)."""
    monkeypatch.setattr(gpu, "SPLIT_POSITIONS", 3 if split else 10**9)
    layers = 3
    config = pagedkv.CacheConfig(num_layers=layers, num_kv_heads=2, head_dim=4, num_blocks=6, block_size=2)
    pool = KVPool(config, device="cuda")
    tables, lens = np.array([[0, 1, 2], [3, 4, 5]], np.int32), np.array([5, 2], np.int32)
    slots = np.array([4, 7])  # each sequence's newest token
    key, value = pst.token_arrays(config, 2, 0)
    q = np.random.default_rng(0).standard_normal((2, 4, 4)).astype(np.float32)
    launched = record_launches(monkeypatch)
    step = gpu.plan(pool, slot_mapping=slots, block_tables=tables, context_lens=lens)
    assert launched == []
    for layer in range(layers):
        gpu.write_step(pool, layer, key, value, step)
        gpu.attention_step(q, pool, layer, step)
    per_layer = ["write_kernel", "attention_kernel"] + (["combine_splits_kernel"] if split else [])
    assert [name for _, name, _ in launched] == per_layer * layers
