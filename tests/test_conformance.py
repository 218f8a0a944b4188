"""pagedkv.testing's checkers: pagedkv's own backends pass them, correct user kernels in other
conventions pass them, and planted bugs are caught with the wrong element named."""

import numpy as np
import pytest

import pagedkv
from pagedkv.testing import (
    KernelMismatch,
    KernelSignatureError,
    check_copy_blocks,
    check_gather,
    check_paged_attention,
    check_read,
    check_swap_blocks,
    check_write,
)

from .conftest import host, on_device

N = 40  # examples per check: each is a full hypothesis run


# ---- dogfooding: pagedkv's own backends through the kit -----------------------------------------

def adapt(backend):
    """pagedkv-convention functions on host pools for ``backend`` (a GPU copy for cuda)."""
    if backend.DEVICE == "cpu":
        return backend

    class OnDevice:
        @staticmethod
        def write(pool, layer, k, v, slots):
            dev = on_device(pool, backend)
            backend.write(dev, layer, k, v, slots)
            pool.data[:] = host(dev)

        @staticmethod
        def read(pool, layer, slots):
            return [host(x) for x in backend.read(on_device(pool, backend), layer, slots)]

        @staticmethod
        def gather(pool, layer, tables, lens):
            return [host(x) for x in backend.gather(on_device(pool, backend), layer, tables, lens)[:2]]

        @staticmethod
        def copy_blocks(pool, src, dst):
            dev = on_device(pool, backend)
            backend.copy_blocks(dev, src, dst)
            pool.data[:] = host(dev)

        @staticmethod
        def swap_blocks(src_pool, dst_pool, src, dst):
            dev = on_device(dst_pool, backend)
            backend.swap_blocks(src_pool, dev, src, dst)  # a reload: host to device
            dst_pool.data[:] = host(dev)

        @staticmethod
        def paged_attention(q, pool, layer, tables, lens, **kw):
            return host(backend.paged_attention(q, on_device(pool, backend), layer, tables, lens, **kw))

    return OnDevice


KIT = {  # routine -> (checker, the backend's function in the checker's shape)
    "write": (check_write, lambda b: b.write),
    "read": (check_read, lambda b: b.read),
    "gather": (check_gather, lambda b: lambda *a: b.gather(*a)[:2]),
    "copy_blocks": (check_copy_blocks, lambda b: b.copy_blocks),
    "swap_blocks": (check_swap_blocks, lambda b: b.swap_blocks),
    "paged_attention": (check_paged_attention, lambda b: b.paged_attention),
}


@pytest.mark.parametrize("routine", list(KIT))
def test_backends_pass_the_kit(fast_backend, routine):
    check, function = KIT[routine]
    check(function(adapt(fast_backend)), max_examples=N if fast_backend.NAME != "cuda" else 15)


# ---- a user's kernels in vLLM's convention (separate K and V caches per layer) -------------------

def vllm_write(key, value, key_cache, value_cache, slots, *, bug=None):
    bs, n = key_cache.shape[1], key_cache.shape[0] * key_cache.shape[1]
    for t, s in enumerate(slots):
        if s < 0 and bug != "no padding check":
            continue
        if bug == "off by one":
            s = (s + 1) % n
        k, v = (value, key) if bug == "K and V swapped" else (key, value)
        key_cache[s // bs, s % bs] = k[t]
        value_cache[s // bs, s % bs] = v[t]


def vllm_read(key_cache, value_cache, slots):
    bs = key_cache.shape[1]
    out_k = np.zeros((len(slots), *key_cache.shape[2:]), np.float32)
    out_v = np.zeros_like(out_k)
    for t, s in enumerate(slots):
        if s >= 0:
            out_k[t], out_v[t] = key_cache[s // bs, s % bs], value_cache[s // bs, s % bs]
    return out_k, out_v


def vllm_gather(key_cache, value_cache, tables, lens):
    bs = key_cache.shape[1]
    rows = [(tables[b, p // bs], p % bs) for b in range(len(lens)) for p in range(lens[b])]
    shape = (len(rows), *key_cache.shape[2:])
    if not rows:
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    return np.stack([key_cache[i, o] for i, o in rows]), np.stack([value_cache[i, o] for i, o in rows])


def flashinfer_gather(key_cache, value_cache, indptr, indices, last):
    bs = key_cache.shape[1]
    lens = [(indptr[b + 1] - indptr[b] - 1) * bs + last[b] if indptr[b + 1] > indptr[b] else 0
            for b in range(len(last))]
    tables = np.zeros((len(last), max(1, max(np.diff(indptr), default=1))), np.int32)
    for b in range(len(last)):
        tables[b, :indptr[b + 1] - indptr[b]] = indices[indptr[b]:indptr[b + 1]]
    return vllm_gather(key_cache, value_cache, tables, lens)


def vllm_copy_blocks(key_caches, value_caches, mapping):
    for kc, vc in zip(key_caches, value_caches, strict=True):
        kc[mapping[:, 1]] = kc[mapping[:, 0]]
        vc[mapping[:, 1]] = vc[mapping[:, 0]]


def vllm_swap_blocks(src, dst, mapping):
    dst[mapping[:, 1]] = src[mapping[:, 0]]


def vllm_attention(q, key_cache, value_cache, tables, lens, scale, query_lens=None, *, soft_cap=None,
                   sliding_window=None, bug=None):
    bs, h = key_cache.shape[1], key_cache.shape[2]
    if bug == "raises at block size 1" and bs == 1:
        raise ValueError("block_size 1 is not supported")
    group = q.shape[1] // h
    if bug == "scale hard-coded":
        scale = 1 / np.sqrt(q.shape[2])
    out = np.zeros(q.shape, np.float32)
    counts = np.ones(len(lens), int) if query_lens is None else query_lens
    row = 0
    for b in range(len(lens)):
        n = lens[b]
        if bug == "a full last page dropped" and n and n % bs == 0:  # last_page_len = n % bs
            n -= bs
        k, v = vllm_gather(key_cache, value_cache, tables[b:b + 1], np.array([n]))
        for j in range(counts[b]):
            pos = lens[b] - counts[b] + j
            if pos < 0:  # a sequence with no context attends to nothing
                row += 1
                continue
            first = 0
            if sliding_window is not None and bug != "window ignored":
                first = max(0, pos - sliding_window + (2 if bug == "window one short" else 1))
            last = min(pos + 1, n)
            for hq in range(q.shape[1]):
                kv = hq % h if bug == "GQA heads interleaved" else hq // group
                s = (k[first:last, kv] @ q[row, hq]) * np.float32(scale)
                if soft_cap is not None and bug != "soft cap ignored":
                    s = np.float32(soft_cap) * np.tanh(s / np.float32(soft_cap))
                w = np.exp(s) if bug == "softmax without the max shift" else np.exp(s - s.max(initial=-np.inf))
                out[row, hq] = (w @ v[first:last, kv]) / w.sum() if last > first else 0
            row += 1
    return out


def test_correct_user_kernels_pass_in_their_own_conventions():
    for convention in ("vllm", "hnd"):
        if convention == "hnd":  # the same kernels with the head axis moved
            w = lambda k, v, kc, vc, s: vllm_write(k, v, kc.swapaxes(1, 2), vc.swapaxes(1, 2), s)  # noqa: E731
            r = lambda kc, vc, s: vllm_read(kc.swapaxes(1, 2), vc.swapaxes(1, 2), s)  # noqa: E731
        else:
            w, r = vllm_write, vllm_read
        check_write(w, convention=convention, max_examples=N)
        check_read(r, convention=convention, max_examples=N)
    check_gather(vllm_gather, convention="vllm", max_examples=N)
    check_gather(flashinfer_gather, convention="flashinfer", max_examples=N)
    check_copy_blocks(vllm_copy_blocks, convention="vllm", max_examples=N)
    check_swap_blocks(vllm_swap_blocks, convention="vllm", max_examples=N)
    check_paged_attention(vllm_attention, convention="vllm", max_examples=N)


def test_a_converter_carries_other_array_types():
    """to_user / from_user: here a list-of-arrays wrapper stands in for torch or CuPy."""
    class Boxed:
        def __init__(self, a):
            self.a = a

    def write(key, value, kc, vc, slots):
        vllm_write(key.a, value.a, kc.a, vc.a, slots.a)

    check_write(write, convention="vllm", max_examples=10, to_user=Boxed, from_user=lambda b: b.a)


# ---- planted bugs are caught, and located -------------------------------------------------------

def caught(check, fn, **kw) -> KernelMismatch:
    with pytest.raises(KernelMismatch) as info:
        check(fn, max_examples=200, **kw)
    assert "first difference at" in str(info.value) and "case:" in str(info.value)
    return info.value


def test_off_by_one_slot():
    e = caught(check_write, lambda *a: vllm_write(*a, bug="off by one"), convention="vllm")
    n = e.case["num_blocks"] * e.case["block_size"]
    real = [s for s in e.case["slot_mapping"] if s >= 0]
    assert e.where["slot"] in set(real) | {(s + 1) % n for s in real}
    assert e.where["layer"] == e.case["layer"]


def test_k_and_v_swapped():
    e = caught(check_write, lambda *a: vllm_write(*a, bug="K and V swapped"), convention="vllm")
    assert e.where["slot"] in e.case["slot_mapping"] and e.where["kv"] in ("K", "V")


def test_dropped_padding_check_writes_the_last_slot():
    e = caught(check_write, lambda *a: vllm_write(*a, bug="no padding check"), convention="vllm")
    assert -1 in e.case["slot_mapping"]
    assert e.where["slot"] == e.case["num_blocks"] * e.case["block_size"] - 1  # -1 wrapped around


def bugged(bug):
    """vLLM-shaped attention with ``bug`` planted."""
    return lambda *a, **k: vllm_attention(*a, **k, bug=bug)


def test_wrong_gqa_head_mapping():
    e = caught(check_paged_attention, bugged("GQA heads interleaved"),
               convention="vllm")
    group = e.case["query_heads"] // e.case["num_kv_heads"]
    hq = e.where["head"]
    assert group > 1 and hq % e.case["num_kv_heads"] != hq // group  # a head that reads the wrong K/V


def test_softmax_without_the_max_shift_overflows():
    with np.errstate(over="ignore", invalid="ignore"):
        e = caught(check_paged_attention, bugged("softmax without the max shift"), convention="vllm")
    assert e.case["magnitude"] == 30.0 and "got nan" in str(e)


def test_a_kernel_that_hard_codes_the_scale_fails_on_another_scale():
    """vLLM's and FlashInfer's kernels take ``scale``; a kernel that uses 1/sqrt(head_dim) instead is
    right for most models and wrong for Gemma's query_pre_attn_scalar: the kit draws scales."""
    e = caught(check_paged_attention, bugged("scale hard-coded"), convention="vllm")
    assert not np.isclose(e.case["scale"], 1 / np.sqrt(e.case["head_dim"]))


def test_a_kernel_that_ignores_the_soft_cap_fails_with_one():
    e = caught(check_paged_attention, bugged("soft cap ignored"), convention="vllm")
    assert e.case["soft_cap"] is not None


@pytest.mark.parametrize("bug", ["window ignored", "window one short"])
def test_a_kernel_that_mishandles_the_sliding_window_fails(bug):
    e = caught(check_paged_attention, bugged(bug), convention="vllm")
    assert e.case["sliding_window"] is not None and max(e.case["context_lens"]) > e.case["sliding_window"] - 1


def test_a_kernel_that_drops_a_full_last_page_fails():
    """``last_page_len = len % block_size`` is 0 for a full last page: the kit draws full ones."""
    e = caught(check_paged_attention, bugged("a full last page dropped"), convention="vllm")
    assert any(n and n % e.case["block_size"] == 0 for n in e.case["context_lens"])


def test_a_kernel_that_raises_gets_a_mismatch_with_its_case():
    with pytest.raises(KernelMismatch, match="raised ValueError: block_size 1 is not supported") as info:
        check_paged_attention(bugged("raises at block size 1"), convention="vllm", max_examples=200)
    assert info.value.case["block_size"] == 1 and isinstance(info.value.__cause__, ValueError)


def test_a_kernel_with_two_bugs_gets_one_mismatch():
    """One bug raises (at block size 1), the other gives wrong numbers: hypothesis finds both, from
    two places, and the kit reports one, as a KernelMismatch (not an ExceptionGroup of two)."""
    def two_bugs(*a, **k):
        return vllm_attention(*a, **k, bug="raises at block size 1" if a[1].shape[1] == 1 else "scale hard-coded")

    with pytest.raises(KernelMismatch) as info:
        check_paged_attention(two_bugs, convention="vllm", max_examples=300)
    assert type(info.value) is KernelMismatch


def test_a_signature_that_does_not_match_is_one_line():
    def no_soft_cap(q, key_cache, value_cache, tables, lens, scale, query_lens=None):
        return vllm_attention(q, key_cache, value_cache, tables, lens, scale, query_lens)

    with pytest.raises(KernelSignatureError) as info:
        check_paged_attention(no_soft_cap, convention="vllm", max_examples=20)
    message = str(info.value)
    assert "\n" not in message and "soft_cap" in message and "block_tables, context_lens, scale" in message
    check_paged_attention(no_soft_cap, convention="vllm", max_examples=20, soft_cap=False, sliding_window=False)


def test_unknown_convention():
    with pytest.raises(ValueError, match="convention"):
        check_write(vllm_write, convention="tensorrt")


def test_workloads_yield_consistent_pools():
    """The workload strategy's pools, read through the numba backend, match the reference."""
    from hypothesis import given, settings

    from pagedkv.testing import strategies as pst

    numba = pagedkv.get_backend("numba")
    ref = pagedkv.get_backend("numpy")

    @settings(max_examples=N, deadline=None)
    @given(pst.configs(max_blocks=8).flatmap(pst.workloads))
    def run(work):
        pool, tables, lens = work
        for want, got in zip(ref.gather(pool, 0, tables, lens), numba.gather(pool, 0, tables, lens), strict=True):
            np.testing.assert_array_equal(got, want)

    run()


# ---- storage formats ------------------------------------------------------------------------------

ALL_FORMATS = tuple(pagedkv.geometry.formats.FORMATS)


@pytest.mark.parametrize("routine", list(KIT))
def test_the_numba_backend_passes_the_kit_in_every_format(routine):
    check, function = KIT[routine]
    check(function(pagedkv.get_backend("numba")), dtype=ALL_FORMATS, max_examples=30)


def truncating_bf16_write(pool, layer, key, value, slots):
    """bfloat16 by dropping the low half: truncation, not round-to-nearest-even."""
    bs = pool.config.block_size
    for kv, x in ((pool.k(layer), key), (pool.v(layer), value)):
        for t, slot in enumerate(slots):
            if slot >= 0:
                bits = (np.ascontiguousarray(x[t]).view(np.uint32) >> 16).astype(np.uint16)
                if pool.config.layout == "NHD":
                    kv[slot // bs, slot % bs] = bits
                else:
                    kv[slot // bs, :, slot % bs] = bits


def fp8_read_scaling_twice(pool, layer, slots):
    k, v = pagedkv.get_backend("numpy").read(pool, layer, slots)
    k_scale, v_scale = pool.kv_scales[layer]
    return k * k_scale, v * v_scale


def int8_copy_without_scales(pool, src, dst):
    for layer in range(pool.config.num_layers):
        pool.k(layer)[dst] = pool.k(layer)[src]
        pool.v(layer)[dst] = pool.v(layer)[src]


def test_truncation_instead_of_rounding_is_caught():
    e = caught(check_write, truncating_bf16_write, dtype="bfloat16")
    assert e.where["slot"] in e.case["slot_mapping"]


def test_a_scale_applied_twice_is_caught():
    e = caught(check_read, fp8_read_scaling_twice, dtype="fp8_e4m3")
    assert e.where["slot"] in e.case["slot_mapping"]


def test_a_scale_dropped_by_copy_blocks_is_caught():
    e = caught(check_copy_blocks, int8_copy_without_scales, dtype="int8")
    assert "int8 scale" in str(e) and e.where["slot"] // e.case["block_size"] in e.case["dst"]


def vllm_write_int8(key, value, key_cache, value_cache, k_scales, v_scales, slot_mapping):
    """int8 with a scale per (token, head): scale = max|x| / 127 (1 for an all-zero row)."""
    bs = key_cache.shape[1]
    for t, slot in enumerate(slot_mapping):
        if slot >= 0:
            for cache, scales, x in ((key_cache, k_scales, key), (value_cache, v_scales, value)):
                absmax = np.abs(x[t]).max(axis=-1)  # [H]
                scale = np.where(absmax > 0, absmax / np.float32(127), np.float32(1)).astype(np.float32)
                scales[slot // bs, slot % bs] = scale
                cache[slot // bs, slot % bs] = np.clip(np.rint(x[t] / scale[:, None]), -127, 127).astype(np.int8)


def vllm_read_int8(key_cache, value_cache, k_scales, v_scales, slot_mapping):
    bs = key_cache.shape[1]
    out = np.zeros((2, len(slot_mapping)) + key_cache.shape[2:], np.float32)
    for t, slot in enumerate(slot_mapping):
        if slot >= 0:
            for i, (cache, scales) in enumerate(((key_cache, k_scales), (value_cache, v_scales))):
                out[i, t] = cache[slot // bs, slot % bs] * scales[slot // bs, slot % bs][:, None]
    return out[0], out[1]


def test_int8_kernels_in_vllm_layout_carry_scale_caches():
    check_write(vllm_write_int8, convention="vllm", dtype="int8", max_examples=N)
    check_read(vllm_read_int8, convention="vllm", dtype="int8", max_examples=N)

    def copy_with_scales(key_caches, value_caches, k_scales, v_scales, mapping):  # the scales move like blocks
        vllm_copy_blocks(key_caches, value_caches, mapping)
        vllm_copy_blocks(k_scales, v_scales, mapping)

    def copy_without_scales(key_caches, value_caches, k_scales, v_scales, mapping):
        vllm_copy_blocks(key_caches, value_caches, mapping)

    check_copy_blocks(copy_with_scales, convention="vllm", dtype="int8", max_examples=N)

    with pytest.raises(KernelMismatch, match="int8 scale"):
        check_copy_blocks(copy_without_scales, convention="vllm", dtype="int8", max_examples=N)


def vllm_write_fp8(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale, *, bug=None):
    """vLLM's fp8 reshape_and_cache: stored = e4m3(x / scale) clamped to the format's +-448 first, as vLLM
    does, per-tensor scales (ml_dtypes encodes)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bs = key_cache.shape[1]
    if bug == "scale dropped":
        k_scale = v_scale = 1.0
    for t, slot in enumerate(slot_mapping):
        if slot >= 0:
            for cache, x, scale in ((key_cache, key, k_scale), (value_cache, value, v_scale)):
                scaled = np.clip(x[t] / np.float32(scale), np.float32(-448), np.float32(448))
                cache[slot // bs, slot % bs] = scaled.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)


def vllm_read_fp8(key_cache, value_cache, slot_mapping, k_scale, v_scale):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bs = key_cache.shape[1]
    out = np.zeros((2, len(slot_mapping)) + key_cache.shape[2:], np.float32)
    for t, slot in enumerate(slot_mapping):
        if slot >= 0:
            for i, (cache, scale) in enumerate(((key_cache, k_scale), (value_cache, v_scale))):
                out[i, t] = cache[slot // bs, slot % bs].view(ml_dtypes.float8_e4m3fn).astype(np.float32) \
                    * np.float32(scale)
    return out[0], out[1]


def test_fp8_kernels_in_vllm_layout_take_its_per_tensor_scales():
    check_write(vllm_write_fp8, convention="vllm", dtype="fp8_e4m3", max_examples=N)
    check_read(vllm_read_fp8, convention="vllm", dtype="fp8_e4m3", max_examples=N)
    with pytest.raises(KernelMismatch, match=r"write: first difference at layer \d+, K"):
        check_write(lambda *a: vllm_write_fp8(*a, bug="scale dropped"), convention="vllm", dtype="fp8_e4m3",
                    max_examples=N)


# Correct user kernels in the other engines' layouts, written against their documented shapes.

def vllm_paged_write(key, value, key_cache, value_cache, slot_mapping):
    """vLLM's original layout: key [N, H, D/x, bs, x], value [N, H, D, bs]."""
    bs, x = key_cache.shape[3], key_cache.shape[4]
    for t, slot in enumerate(slot_mapping):
        if slot >= 0:
            b, p = divmod(int(slot), bs)
            key_cache[b, :, :, p, :] = key[t].reshape(key.shape[1], -1, x)
            value_cache[b, :, :, p] = value[t]


def flashinfer_nhd_read(kv_cache, slot_mapping):
    """FlashInfer's single tensor [N, 2, bs, H, D]; padding reads as zeros."""
    bs = kv_cache.shape[2]
    out = np.zeros((2, len(slot_mapping)) + kv_cache.shape[3:], kv_cache.dtype)
    for t, slot in enumerate(slot_mapping):
        if slot >= 0:
            out[:, t] = kv_cache[slot // bs, :, slot % bs]
    return out[0], out[1]


def vllm_cpu_copy_blocks(kv_caches, block_mapping):
    """vLLM's CPU tensor per layer [2, N, H, bs, D]."""
    for cache in kv_caches:
        for src, dst in block_mapping:
            cache[:, dst] = cache[:, src]


def vllm_write_bfloat16(key, value, key_cache, value_cache, slot_mapping):
    """A bfloat16 cache (uint16 bit patterns): encode with ml_dtypes, round to nearest even."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bs = key_cache.shape[1]
    for t, slot in enumerate(slot_mapping):
        if slot >= 0:
            key_cache[slot // bs, slot % bs] = key[t].astype(ml_dtypes.bfloat16).view(np.uint16)
            value_cache[slot // bs, slot % bs] = value[t].astype(ml_dtypes.bfloat16).view(np.uint16)


def test_the_other_engines_layouts_pass_and_a_planted_bug_fails():
    check_write(vllm_paged_write, convention="vllm_paged", max_examples=N)
    check_read(flashinfer_nhd_read, convention="flashinfer_nhd", max_examples=N)
    check_copy_blocks(vllm_cpu_copy_blocks, convention="vllm_cpu", max_examples=N)
    check_write(vllm_write_bfloat16, convention="vllm", dtype="bfloat16", max_examples=N)

    def truncating(key, value, key_cache, value_cache, slot_mapping):  # bits cut, not rounded
        bs = key_cache.shape[1]
        for t, slot in enumerate(slot_mapping):
            if slot >= 0:
                key_cache[slot // bs, slot % bs] = (key[t].view(np.uint32) >> 16).astype(np.uint16)
                value_cache[slot // bs, slot % bs] = (value[t].view(np.uint32) >> 16).astype(np.uint16)

    with pytest.raises(KernelMismatch, match="write: first difference"):
        check_write(truncating, convention="vllm", dtype="bfloat16", max_examples=N)


def test_planted_bugs_in_the_other_layouts_are_caught_and_located():
    def x_split_off_by_one(key, value, key_cache, value_cache, slot_mapping):  # dims shifted inside the x-split
        bs, x = key_cache.shape[3], key_cache.shape[4]
        for t, slot in enumerate(slot_mapping):
            if slot >= 0:
                b, p = divmod(int(slot), bs)
                key_cache[b, :, :, p, :] = np.roll(key[t], 1, axis=-1).reshape(key.shape[1], -1, x)
                value_cache[b, :, :, p] = value[t]

    def swapped_halves(kv_cache, slot_mapping):  # K and V halves of the FlashInfer tensor swapped
        k, v = flashinfer_nhd_read(kv_cache, slot_mapping)
        return v, k

    def wrong_page_stride(kv_caches, block_mapping):  # copies position 0 of each block only
        for cache in kv_caches:
            for src, dst in block_mapping:
                cache[:, dst, :, 0] = cache[:, src, :, 0]

    with pytest.raises(KernelMismatch, match=r"write: first difference at layer \d+, K"):
        check_write(x_split_off_by_one, convention="vllm_paged", max_examples=N)
    with pytest.raises(KernelMismatch, match=r"read \(K\): first difference"):
        check_read(swapped_halves, convention="flashinfer_nhd", max_examples=N)
    later_position = r"copy_blocks: first difference at layer \d+, [KV], block \d+, position [1-9]"
    with pytest.raises(KernelMismatch, match=later_position):
        check_copy_blocks(wrong_page_stride, convention="vllm_cpu", max_examples=N)


def test_transformers_rows_per_slot_for_write_and_read():
    """transformers' paged cache: K and V [num_blocks * block_size, H, D], a row per slot."""
    def write(key, value, key_cache, value_cache, slot_mapping):
        real = slot_mapping >= 0
        key_cache[slot_mapping[real]] = key[real]
        value_cache[slot_mapping[real]] = value[real]

    def read(key_cache, value_cache, slot_mapping):
        real = (slot_mapping >= 0)[:, None, None]
        return np.where(real, key_cache[slot_mapping], 0), np.where(real, value_cache[slot_mapping], 0)

    def write_one_slot_late(key, value, key_cache, value_cache, slot_mapping):
        real = (slot_mapping >= 0) & (slot_mapping + 1 < key_cache.shape[0])
        key_cache[slot_mapping[real] + 1] = key[real]
        value_cache[slot_mapping[real] + 1] = value[real]

    check_write(write, convention="transformers", max_examples=N)
    check_read(read, convention="transformers", max_examples=N)
    with pytest.raises(KernelMismatch, match="write: first difference"):
        check_write(write_one_slot_late, convention="transformers", max_examples=N)
    with pytest.raises(ValueError, match="write and read only"):
        check_gather(read, convention="transformers")
