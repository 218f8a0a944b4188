"""The storage formats' codecs, checked on every pattern against ml_dtypes (and numpy for float16),
the kernels' compiled codecs against the reference's, and the formats' rules at the front door."""

import numpy as np
import pytest

import pagedkv as pk
from pagedkv import CacheConfig, KVPool
from pagedkv.backends.numba import codecs as nc
from pagedkv.geometry import formats
from pagedkv.geometry.formats import FORMATS

ml_dtypes = pytest.importorskip("ml_dtypes")
ORACLES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "fp8_e4m3": ml_dtypes.float8_e4m3fn,
           "fp8_e5m2": ml_dtypes.float8_e5m2}
MINIFLOATS = list(ORACLES)


def oracle_encode(name, x):
    """What each format stores for float32 ``x``: ml_dtypes' (numpy's for float16) rounding, with
    fp8_e4m3 saturated at +-448 as torch's cast does (ml_dtypes would store NaN past it)."""
    if name == "fp8_e4m3":
        x = np.clip(x, np.float32(-448), np.float32(448))  # NaN stays NaN
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(ORACLES[name]).view(FORMATS[name].storage)


def every_pattern(fmt):
    return np.arange(1 << (8 * fmt.itemsize), dtype=np.int64).astype(fmt.storage)


def hard_inputs(fmt, rng, n=200_000):
    """Random float32 bit patterns, and every rounding boundary of ``fmt``: each finite value,
    the midpoints between neighbours and the floats just either side, the subnormal edge,
    overflow, signed zeros, infinities and NaNs with payloads."""
    values = formats.decode(fmt, every_pattern(fmt))
    finite = np.unique(values[np.isfinite(values)].astype(np.float64))
    mids = ((finite[1:] + finite[:-1]) / 2).astype(np.float32)
    top = np.float32(finite[-1])
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 3.4e38, -3.4e38,
                         top, np.nextafter(top, np.float32(np.inf)), min(float(top) * 2, 3.4e38)], np.float32)
    nan_payloads = np.array([0x7F800001, 0x7FA00000, 0xFFC00001, 0x7FFFFFFF, 0x7F802000], np.uint32).view(np.float32)
    randoms = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([finite.astype(np.float32), -finite.astype(np.float32), mids, -mids,
                           np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
                           specials, nan_payloads, randoms])


@pytest.mark.parametrize("name", MINIFLOATS)
def test_every_pattern_decodes_as_the_oracle_does(name):
    fmt = FORMATS[name]
    patterns = every_pattern(fmt)
    want = patterns.view(ORACLES[name]).astype(np.float32).view(np.uint32)
    np.testing.assert_array_equal(formats.decode(fmt, patterns).view(np.uint32), want)
    compiled = np.array([nc.decode_bits(int(p), fmt.codec) for p in patterns.astype(np.int64)], np.uint32)
    np.testing.assert_array_equal(compiled, want)


@pytest.mark.parametrize("name", MINIFLOATS)
def test_encoding_rounds_as_the_oracle_does(name):
    fmt = FORMATS[name]
    x = hard_inputs(fmt, np.random.default_rng(0))
    want = oracle_encode(name, x)
    got = formats.encode(fmt, x)
    bad = np.flatnonzero(got != want)
    assert not bad.size, f"{bad.size} differ, first: {x[bad[0]]!r} -> {got[bad[0]]:#x}, expected {want[bad[0]]:#x}"
    sample = x[:: max(1, len(x) // 20_000)]
    compiled = np.array([nc.encode_bits(int(b), fmt.codec) for b in sample.view(np.uint32).astype(np.int64)])
    np.testing.assert_array_equal(compiled.astype(fmt.storage), formats.encode(fmt, sample))


@pytest.mark.parametrize("backend", ["numpy", "numba", "cuda"])
@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "bfloat16", "float16"])
def test_every_backend_encodes_as_torch_casts(name, backend, monkeypatch):
    """torch's ``.to()`` on every rounding boundary and out-of-range value, infinities included:
    e4m3 saturates at +-448 (before, pagedkv stored NaN past it), e5m2 and the 16-bit formats
    overflow to inf. NaN must stay NaN (torch drops its sign; pagedkv keeps it)."""
    torch = pytest.importorskip("torch")
    fmt = FORMATS[name]
    target = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "bfloat16": torch.bfloat16,
              "float16": torch.float16}[name]
    x = hard_inputs(fmt, np.random.default_rng(1), n=2_000 if backend == "cuda" else 20_000)
    x = np.concatenate([x, np.array([1e4, -1e4, 480, 464, 463.9, 1e30, 65520, 65519.9, 61440], np.float32)])
    if backend == "cuda":  # the simulator runs a thread per element: a sample of every kind of input
        x = np.concatenate([x[:600], x[-40:], x[np.abs(x) > 400][:200]])
    want = torch.from_numpy(x).to(target).view(torch.uint8 if fmt.itemsize == 1 else torch.int16).numpy()
    want = want.view(fmt.storage)
    b = pk.get_backend(backend) if pk.available_backends()[backend] is None else pytest.skip(backend)
    if backend == "cuda":
        from .conftest import shrink_cuda_launches
        shrink_cuda_launches(b, monkeypatch)
    rows = x[: len(x) // 8 * 8].reshape(-1, 1, 8)
    pool = KVPool(CacheConfig(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=len(rows), block_size=1,
                              dtype=name), device=b.DEVICE)
    b.write(pool, 0, rows, rows, np.arange(len(rows), dtype=np.int64))
    got = pool.to_host()[: rows.size].view(fmt.storage)  # layer 0's K: the first run of the pool
    want = want[: rows.size]
    nan = np.isnan(formats.decode(fmt, want))
    assert (np.isnan(formats.decode(fmt, got)) == nan).all()
    np.testing.assert_array_equal(got[~nan], want[~nan])


def test_worked_examples_of_the_docstring():
    one_and_a_half = np.array([1.5], np.float32)
    assert [int(formats.encode(FORMATS[n], one_and_a_half)[0]) for n in MINIFLOATS] == [0x3E00, 0x3FC0, 0x3C, 0x3E]
    tenth = formats.encode(FORMATS["fp8_e4m3"], np.array([0.1], np.float32))
    assert int(tenth[0]) == 0x1D and formats.decode(FORMATS["fp8_e4m3"], tenth)[0] == np.float32(0.1015625)


def test_special_values_follow_the_documented_rules():
    x = np.array([np.inf, -np.inf, np.nan, 1e6, -1e6], np.float32)
    e4m3 = formats.encode(FORMATS["fp8_e4m3"], x)
    assert e4m3.tolist() == [0x7E, 0xFE, 0x7F, 0x7E, 0xFE]  # no inf: saturated at +-448; NaN stays NaN
    e5m2 = formats.encode(FORMATS["fp8_e5m2"], x)
    assert e5m2.tolist() == [0x7C, 0xFC, 0x7E, 0x7C, 0xFC]  # inf, and one quiet NaN
    assert formats.decode(FORMATS["fp8_e4m3"], np.array([0x7E], np.uint8))[0] == 448


def test_int8_scales_per_token_and_head():
    x = np.array([[[0.0, 0.0], [1.0, -2.54]], [[np.nan, 1.0], [3.0, 1.5]]], np.float32)
    q, scale = formats.quantize_int8(x)
    assert scale[0, 0] == 1 and q[0, 0].tolist() == [0, 0]  # a zero row gets scale 1
    assert scale[0, 1] == np.float32(2.54) / np.float32(127) and q[0, 1].tolist() == [50, -127]
    assert np.isnan(scale[1, 0]) and np.isnan(formats.dequantize_int8(q, scale)[1, 0]).all()
    assert q[1, 1].tolist() == [127, 64]  # 63.5 rounds half to even: 64


@pytest.mark.slow
@pytest.mark.parametrize("name", MINIFLOATS)
def test_every_float32_encodes_as_the_oracle_does(name):
    """All 2**32 float32 inputs (opt-in: ``python -m pytest -m slow``; minutes per format)."""
    fmt = FORMATS[name]
    for start in range(0, 2**32, 2**26):
        x = np.arange(start, start + 2**26, dtype=np.uint64).astype(np.uint32).view(np.float32)
        np.testing.assert_array_equal(formats.encode(fmt, x), oracle_encode(name, x))


# ---- the formats at the front door ----------------------------------------------------------------

def config(dtype, **kw):
    return CacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, num_blocks=4, block_size=2, dtype=dtype, **kw)


@pytest.mark.parametrize("dtype", list(FORMATS))
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_float64_or_integer_kv_is_refused_in_every_format(dtype, backend):
    pool = KVPool(config(dtype))
    before = pool.data.copy()
    b = pk.get_backend(backend)
    for bad in (np.ones((1, 2, 4), np.float64), np.ones((1, 2, 4), np.int32)):
        with pytest.raises(pk.DTypeError, match="float32"):
            b.write(pool, 0, bad, bad, np.array([0]))
    np.testing.assert_array_equal(pool.data, before)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), 1e39, "x"])
def test_bad_fp8_scales_are_refused(bad):
    pool = KVPool(config("fp8_e4m3"))
    with pytest.raises(pk.ConfigError, match="positive, finite float32"):
        pool.set_kv_scales(0, bad, 1.0)
    assert pool.kv_scales.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    with pytest.raises(pk.ConfigError, match="only fp8"):
        KVPool(config("bfloat16")).set_kv_scales(0, 1.0, 1.0)


def test_swaps_between_different_formats_or_scales_are_refused():
    ref = pk.get_backend("numpy")
    a, b = KVPool(config("fp8_e4m3")), KVPool(config("fp8_e5m2"))
    with pytest.raises(pk.PoolMismatchError, match="different formats"):
        ref.swap_blocks(a, b, np.array([0]), np.array([1]))
    c = KVPool(config("fp8_e4m3"))
    c.set_kv_scales(1, 2.0, 1.0)
    with pytest.raises(pk.PoolMismatchError, match="k/v scales"):
        ref.swap_blocks(a, c, np.array([0]), np.array([1]))


def test_raw_reads_return_the_stored_elements_and_scales():
    ref = pk.get_backend("numpy")
    pool = KVPool(config("int8"))
    key = np.arange(8, dtype=np.float32).reshape(1, 2, 4)
    ref.write(pool, 1, key, -key, np.array([5]))
    raw = ref.read(pool, 1, np.array([5, -1]), raw=True)
    assert raw.key.dtype == np.int8 and raw.key[0, 1].tolist() == [73, 91, 109, 127]
    assert raw.key_scale[0].tolist() == [np.float32(3) / 127, np.float32(7) / 127]
    assert raw.key_scale[1].tolist() == [0, 0]  # padding
    np.testing.assert_allclose(pool.k_decoded(1)[2, 1], key[0], atol=7 / 254)  # half a step of the row's scale
    with pytest.raises(pk.ArgumentError, match="no out"):
        ref.read(pool, 1, np.array([5]), raw=True, out=(np.empty((1, 2, 4), np.float32),) * 2)


@pytest.mark.parametrize("name", MINIFLOATS)
def test_the_numba_write_encodes_every_boundary_as_the_reference(name):
    """The kernels' own encoding paths (bfloat16's has a shortcut) against formats.encode."""
    fmt = FORMATS[name]
    x = hard_inputs(fmt, np.random.default_rng(2), n=20_000)
    x = x[: len(x) // 8 * 8].reshape(-1, 1, 8)
    pool = KVPool(CacheConfig(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=len(x), block_size=1, dtype=name))
    pk.get_backend("numba").write(pool, 0, x, x, np.arange(len(x), dtype=np.int64))
    np.testing.assert_array_equal(pool.k(0).reshape(-1), formats.encode(fmt, x.reshape(-1)))


@pytest.mark.parametrize("head_dim", [1, 16, 64])
@pytest.mark.parametrize("name", MINIFLOATS)
def test_the_numba_read_decodes_every_pattern_as_the_reference(name, head_dim):
    """Every stored pattern (NaN payloads, subnormals, infinities) read back by the numba kernel,
    whose decoding (a bit cast or a branch-free loop) must equal formats.decode bit for bit,
    times fp8 scales, also ones whose products leave float32's normal range. Rows of 1, 16 and
    64 numbers run the decoding loops' one-at-a-time and vector paths."""
    fmt = FORMATS[name]
    patterns = every_pattern(fmt)
    pool = KVPool(CacheConfig(num_layers=2, num_kv_heads=1, head_dim=head_dim, block_size=1,
                              num_blocks=len(patterns) // head_dim, dtype=name))
    for layer in (0, 1):
        pool.k(layer).reshape(-1)[:] = patterns
        pool.v(layer).reshape(-1)[:] = patterns[::-1]
    if fmt.scale == "tensor":
        pool.set_kv_scales(0, 0.3, 5.0)
        pool.set_kv_scales(1, 2.0**-100, 1e36)
    slots = np.arange(pool.config.num_blocks, dtype=np.int64)
    for layer in (0, 1):
        got = pk.get_backend("numba").read(pool, layer, slots)
        with np.errstate(over="ignore"):  # 1e36 times fp8's largest numbers is inf, rightly
            want = pk.get_backend("numpy").read(pool, layer, slots)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g.view(np.uint32), w.view(np.uint32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "fp8_e4m3", "int8"])
def test_writes_take_float16_and_bfloat16_inputs_widened_exactly(backend, dtype):
    """A float16 or bfloat16 K/V (numpy float16, ml_dtypes bfloat16, uint16 bfloat16 bits) is
    stored exactly as its float32 widening is: no number rounds on the way in."""
    from .conftest import host, on_device

    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 2, 4)).astype(np.float32) * 8
    as_bf16 = x.astype(ml_dtypes.bfloat16)
    inputs = {"float16": (x.astype(np.float16), x.astype(np.float16).astype(np.float32)),
              "bfloat16": (as_bf16, as_bf16.astype(np.float32)),
              "bits": (as_bf16.view(np.uint16), as_bf16.astype(np.float32))}
    slots = np.array([0, 3, 5])
    for name, (narrow, exact) in inputs.items():
        want = KVPool(config(dtype))
        pk.get_backend("numpy").write(want, 1, exact, exact[::-1].copy(), slots)
        handed = [(narrow, narrow[::-1].copy())]
        if backend.DEVICE == "cuda" and name != "bfloat16":  # GPU arrays too (numba has no bfloat16 dtype)
            from numba import cuda

            handed.append((cuda.to_device(narrow), cuda.to_device(narrow[::-1].copy())))
        for key, value in handed:
            got = on_device(KVPool(config(dtype)), backend)
            backend.write(got, 1, key, value, slots)
            np.testing.assert_array_equal(host(got), host(want), err_msg=name)
            if dtype == "int8":
                np.testing.assert_array_equal(host(got.scales), want.host_scales, err_msg=name)
