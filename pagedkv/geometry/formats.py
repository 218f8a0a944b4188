"""How a number is stored: the KV storage formats and their exact codecs.

A pool stores raw elements of one format; every backend encodes and decodes
them with the rules below, bit for bit. The float formats are "minifloats":
a sign bit, ``E`` exponent bits (bias ``2**(E-1) - 1``) and ``M`` mantissa bits::

    float32   s eeeeeeee mmmmmmmmmmmmmmmmmmmmmmm   (E=8, M=23)  the reference's own
    float16   s eeeee mmmmmmmmmm                    (E=5, M=10)  stored as uint16 bits
    bfloat16  s eeeeeeee mmmmmmm                    (E=8, M=7)   the top half of a float32
    fp8_e4m3  s eeee mmm                            (E=4, M=3)   "fn": no inf, max 448, NaN = s.1111.111
    fp8_e5m2  s eeeee mm                            (E=5, M=2)   IEEE-like: inf and NaN
    int8      two's complement integer q, with a float32 scale per (token, head)
              (a row holding NaN or inf reads back as NaN)

    value = (-1)**s * 1.mmm * 2**(e - bias)     for 0 < e < max
          = (-1)**s * 0.mmm * 2**(1 - bias)     for e = 0 (subnormals and zero)

Encoding a float32 rounds to the nearest representable value, ties to even,
subnormals included; the special cases follow ml_dtypes (and numpy for
float16) and torch, the libraries the tests check every bit against:

- a value past the largest finite one after rounding becomes inf (float16,
  bfloat16, fp8_e5m2), inf likewise; fp8_e4m3, which has no inf, saturates:
  anything past 448 after rounding, inf included, is stored as +-448, as torch's
  ``.to(torch.float8_e4m3fn)`` and vLLM's quantizers do (ml_dtypes would store NaN,
  and one large activation would then poison every later query of its sequence);
- NaN stays NaN with its sign: float16 keeps the top of the payload (as
  numpy does), the others store their one quiet NaN (``0x7FC0``, ``0x7E``,
  ``0x7F``); decoding keeps a float16 or bfloat16 payload and turns an fp8
  NaN into float32's quiet NaN.

Worked example, 1.5 = 1.1b * 2**0: float16 ``0 01111 1000000000`` = ``0x3E00``;
bfloat16 ``0 01111111 1000000`` = ``0x3FC0``; fp8_e4m3 ``0 0111 100`` = ``0x3C``;
fp8_e5m2 ``0 01111 10`` = ``0x3E``. And 0.1 in fp8_e4m3: 0.1 = 1.6 * 2**-4 lies
between 1.5 and 1.625 * 2**-4 (mantissa 100 and 101); 1.6 is nearer 1.625, so
``0 0011 101`` = ``0x1D`` = 0.1015625.

Scales (vLLM's contract): fp8 pools keep a static per-layer ``k_scale`` and
``v_scale`` (stored = encode(x / scale), read = decode(stored) * scale);
int8 pools keep a dynamic scale per (token, head): ``absmax / 127`` (a row where
that is 0, all zeros or too tiny for a nonzero scale, gets scale 1), stored =
round-half-even(x / scale), read = q * scale.

Each codec exists twice, side by side: vectorised over numpy arrays (the
reference, :func:`encode` / :func:`decode`) and as scalar integer functions
(:func:`encode_bits` / :func:`decode_bits`) that numba compiles into the
kernels; the tests prove them equal on every pattern that can be decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..errors import ConfigError


class RawKV(NamedTuple):
    """Stored elements as a pool holds them (``read`` / ``gather`` with ``raw=True``).

    Attributes:
        key, value: ``[T, H, D]`` of the pool's storage dtype (uint16 bits for float16 and
            bfloat16, uint8 for fp8, int8, float32).
        key_scale, value_scale: float32 ``[T, H]`` for int8 pools, else None (fp8's
            per-layer scales are ``pool.kv_scales``).
    """

    key: np.ndarray
    value: np.ndarray
    key_scale: np.ndarray | None = None
    value_scale: np.ndarray | None = None


class Codec(NamedTuple):
    """The integers a kernel's codec needs (passed as one argument, like the strides)."""

    exp_bits: int
    man_bits: int
    bias: int
    finite_only: int  # 1: no inf, the all-ones pattern is the only NaN (fp8_e4m3 "fn")
    nan_payload: int  # 1: NaN payloads are shifted, not replaced (float16 both ways, bfloat16 decoding)
    nan_payload_decode: int


@dataclass(frozen=True)
class StorageFormat:
    """One way of storing K/V numbers.

    Attributes:
        name: the format's name (``"float32"``, ``"bfloat16"``...).
        storage: the numpy dtype of the pool's raw elements.
        codec: the minifloat parameters (None for float32 and int8).
        scale: ``"none"``, ``"tensor"`` (static per-layer k/v scales, fp8) or
            ``"token"`` (a float32 scale per token and head, int8).
    """

    name: str
    storage: np.dtype
    codec: Codec | None
    scale: str

    @property
    def itemsize(self) -> int:
        """Bytes of one stored element."""
        return self.storage.itemsize

    @property
    def is_float32(self) -> bool:
        """Whether elements are stored as they are, with no codec."""
        return self.name == "float32"

    def __repr__(self) -> str:
        return f"StorageFormat({self.name!r})"


FORMATS = {
    "float32": StorageFormat("float32", np.dtype(np.float32), None, "none"),
    "float16": StorageFormat("float16", np.dtype(np.uint16), Codec(5, 10, 15, 0, 1, 1), "none"),
    "bfloat16": StorageFormat("bfloat16", np.dtype(np.uint16), Codec(8, 7, 127, 0, 0, 1), "none"),
    "fp8_e4m3": StorageFormat("fp8_e4m3", np.dtype(np.uint8), Codec(4, 3, 7, 1, 0, 0), "tensor"),
    "fp8_e5m2": StorageFormat("fp8_e5m2", np.dtype(np.uint8), Codec(5, 2, 15, 0, 0, 0), "tensor"),
    "int8": StorageFormat("int8", np.dtype(np.int8), None, "token"),
}
_ALIASES = {"float": "float32", "half": "float16", "bf16": "bfloat16", "float8_e4m3fn": "fp8_e4m3",
            "float8_e5m2": "fp8_e5m2", "fp8": "fp8_e4m3"}


def get_format(dtype: object) -> StorageFormat:
    """The storage format named by ``dtype``: a name of :data:`FORMATS`, a numpy dtype
    (float32, float16, int8), or a torch / ml_dtypes dtype object (by its name; neither
    library is imported). Raises ConfigError listing the supported names otherwise."""
    if isinstance(dtype, StorageFormat):
        return dtype
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = np.dtype(dtype).name  # type: ignore[call-overload]  # numpy and ml_dtypes types
        except TypeError:
            name = str(dtype).removeprefix("torch.")  # torch.bfloat16 -> "bfloat16"
    name = _ALIASES.get(name, name)
    if name not in FORMATS:
        raise ConfigError(f"unknown KV storage format {dtype!r}; supported: {', '.join(FORMATS)}")
    return FORMATS[name]


# ---- the minifloat codecs, vectorised (the reference) ---------------------------------------------

def _round_shift(v: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``v / 2**shift`` rounded to the nearest integer, ties to even (``0 <= shift <= 40``)."""
    q = v >> shift
    rest = v - (q << shift)
    half = np.where(shift > 0, np.int64(1) << np.maximum(shift - 1, 0), 1 << 62)
    return q + ((rest > half) | ((rest == half) & (q & 1 == 1)))


def encode(fmt: StorageFormat, x: np.ndarray) -> np.ndarray:
    """float32 ``x`` as ``fmt``'s stored bits (any shape), rounding to nearest even."""
    c = fmt.codec
    if c is None:
        raise ValueError(f"{fmt.name} has no minifloat codec")
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.int64)
    sign = (b >> 31) << (c.exp_bits + c.man_bits)
    a = b & 0x7FFFFFFF  # |x|
    e32 = a >> 23
    m24 = (a & 0x7FFFFF) | np.where(e32 > 0, 1 << 23, 0)  # float32 subnormals have no implicit bit
    e = np.maximum(e32, 1) - 127 + c.bias  # the target's biased exponent, if x were normal there
    base = 23 - c.man_bits
    normal = (e << c.man_bits) + _round_shift(m24, np.full_like(e, base)) - (1 << c.man_bits)
    subnormal = _round_shift(m24, np.minimum(base + 1 - e, 40))
    out = np.where(e >= 1, normal, subnormal)  # rounding may carry into the exponent: still right
    top = (1 << c.exp_bits) - 1  # the all-ones exponent
    if c.finite_only:
        nan = (top << c.man_bits) | ((1 << c.man_bits) - 1)
        out = np.where(out > nan - 1, nan - 1, out)  # too big, inf included: the largest finite, saturated
        out = np.where(a > 0x7F800000, nan, out)  # NaN stays NaN
    else:
        inf = top << c.man_bits
        out = np.where(out >= inf, inf, out)
        out = np.where(a == 0x7F800000, inf, out)
        if c.nan_payload:  # keep the payload's top bits, at least one of them set
            payload = np.maximum((a & 0x7FFFFF) >> base, 1)
        else:
            payload = np.full_like(a, 1 << (c.man_bits - 1))  # the quiet NaN
        out = np.where(a > 0x7F800000, inf | payload, out)
    return (sign | out).astype(fmt.storage)


def decode(fmt: StorageFormat, stored: np.ndarray) -> np.ndarray:
    """``fmt``'s stored bits as float32 (exact: every stored value is a float32)."""
    c = fmt.codec
    if c is None:
        raise ValueError(f"{fmt.name} has no minifloat codec")
    h = np.asarray(stored).astype(np.int64) & ((1 << (1 + c.exp_bits + c.man_bits)) - 1)
    sign = (h >> (c.exp_bits + c.man_bits)) << 31
    e = (h >> c.man_bits) & ((1 << c.exp_bits) - 1)
    m = h & ((1 << c.man_bits) - 1)
    base = 23 - c.man_bits
    normal = ((e - c.bias + 127) << 23) | (m << base)
    # A subnormal m * 2**(1 - bias - M): shift m's leading one into float32's implicit bit.
    lead = np.zeros_like(m)
    for p in range(1, c.man_bits):
        lead = np.where(m >> p > 0, p, lead)
    sub_exp = lead + 1 - c.bias - c.man_bits + 127
    subnormal = np.where(sub_exp > 0, (sub_exp << 23) | ((m - (1 << lead)) << (23 - lead)), m << base)
    out = np.where(e > 0, normal, np.where(m > 0, subnormal, 0))
    top = (1 << c.exp_bits) - 1
    if c.finite_only:
        out = np.where((e == top) & (m == (1 << c.man_bits) - 1), 0x7FC00000, out)
    else:
        nan = (0x7F800000 | (m << base)) if c.nan_payload_decode else np.full_like(m, 0x7FC00000)
        out = np.where(e == top, np.where(m == 0, 0x7F800000, nan), out)
    return (sign | out).astype(np.uint32).view(np.float32)


# ---- the same codecs, scalar (compiled into the numba kernels) -------------------------------------

def encode_bits(b, c):
    """Scalar :func:`encode`: float32 bits ``b`` (an int) to stored bits, for codec ``c``."""
    sign = (b >> 31) << (c.exp_bits + c.man_bits)
    a = b & 0x7FFFFFFF
    top = (1 << c.exp_bits) - 1
    base = 23 - c.man_bits
    if a >= 0x7F800000:  # inf or NaN
        if c.finite_only:  # NaN stays NaN; inf saturates to the largest finite
            return sign | (top << c.man_bits) | ((1 << c.man_bits) - (1 if a > 0x7F800000 else 2))
        if a == 0x7F800000:
            return sign | (top << c.man_bits)
        if c.nan_payload:
            return sign | (top << c.man_bits) | max((a & 0x7FFFFF) >> base, 1)
        return sign | (top << c.man_bits) | (1 << (c.man_bits - 1))
    e32 = a >> 23
    m24 = (a & 0x7FFFFF) | ((1 << 23) if e32 > 0 else 0)
    e = max(e32, 1) - 127 + c.bias
    if e >= 1:  # normal: drop 23 - M mantissa bits; a carry may bump the exponent, rightly
        shift, above = base, (e << c.man_bits) - (1 << c.man_bits)
    else:  # subnormal (or zero): drop more
        shift, above = min(base + 1 - e, 40), 0
    q = m24 >> shift
    rest = m24 - (q << shift)
    half = 1 << (shift - 1)
    if rest > half or (rest == half and q & 1 == 1):  # round to nearest, ties to even
        q += 1
    out = above + q
    if c.finite_only:  # past the largest finite (the pattern below NaN's): saturated
        nan = (top << c.man_bits) | ((1 << c.man_bits) - 1)
        return sign | (nan - 1 if out >= nan else out)
    inf = top << c.man_bits
    return sign | (inf if out >= inf else out)


def decode_bits(h, c):
    """Scalar :func:`decode`: stored bits ``h`` (an int) to float32 bits, for codec ``c``."""
    h = h & ((1 << (1 + c.exp_bits + c.man_bits)) - 1)
    sign = (h >> (c.exp_bits + c.man_bits)) << 31
    e = (h >> c.man_bits) & ((1 << c.exp_bits) - 1)
    m = h & ((1 << c.man_bits) - 1)
    top = (1 << c.exp_bits) - 1
    base = 23 - c.man_bits
    if c.finite_only:
        if e == top and m == (1 << c.man_bits) - 1:
            return sign | 0x7FC00000
    elif e == top:
        if m == 0:
            return sign | 0x7F800000
        return sign | ((0x7F800000 | (m << base)) if c.nan_payload_decode else 0x7FC00000)
    if e > 0:
        return sign | ((e - c.bias + 127) << 23) | (m << base)
    if m == 0:
        return sign
    lead = 0
    while m >> (lead + 1) > 0:
        lead += 1
    sub_exp = lead + 1 - c.bias - c.man_bits + 127
    if sub_exp > 0:
        return sign | (sub_exp << 23) | ((m - (1 << lead)) << (23 - lead))
    return sign | (m << base)


def to_float32(fmt: StorageFormat, stored: np.ndarray, scale: np.ndarray | np.float32 | None = None) -> np.ndarray:
    """Stored elements ``[..., D]`` as the float32 values they stand for: float32 as they are
    (a copy); a minifloat decoded, times fp8's per-layer ``scale``; int8 times its per-row
    ``scale [...]``."""
    if fmt.is_float32:
        return np.array(stored, dtype=np.float32)
    if fmt.scale == "token":
        assert scale is not None, "int8 needs its scales"
        return dequantize_int8(stored, np.asarray(scale))
    values = decode(fmt, stored)
    return values * np.float32(scale) if fmt.scale == "tensor" else values  # fp8: decode(stored) * scale



def widen_input(x):
    """K or V handed to a write, as float32 where it was a narrower float: exactly, in a copy.

    float32 arrays come back as they are. numpy float16 arrays, ml_dtypes bfloat16
    arrays and **uint16 arrays, read as bfloat16 bit patterns** (the way to hand over
    a torch bfloat16 tensor: ``tensor.view(torch.uint16).numpy()``) are widened:
    every float16 and bfloat16 number is a float32 number, so nothing rounds. Any
    other array (or a GPU array: the cuda backend widens those itself) comes back
    as it is, for the write's checks to accept or refuse.
    """
    if not isinstance(x, np.ndarray):
        return x
    dtype = x.dtype
    if dtype == _FLOAT32:  # the common case first: a decode step passes two arrays per layer
        return x
    if dtype == _FLOAT16 or dtype.name == "bfloat16":
        return x.astype(np.float32)
    if dtype == _UINT16:  # bfloat16 bits: the top half of a float32
        return (x.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return x


_FLOAT32, _FLOAT16, _UINT16 = np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint16)

# ---- int8 with a scale per (token, head) -----------------------------------------------------------

def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``[..., D]`` rows as int8 and a float32 scale per row: ``scale = absmax / 127``,
    ``q = round_half_even(x / scale)``; all in float32. A row whose ``absmax / 127`` is 0 (an
    all-zero row, or one so tiny, below 127 x 2**-150, that the division underflows) gets scale 1:
    its q are 0 and it reads back as zeros."""
    x = np.asarray(x, dtype=np.float32)
    absmax = np.abs(x).max(axis=-1)  # NaN if the row holds one
    scale = (absmax / np.float32(127)).astype(np.float32)
    scale = np.where((scale > 0) | np.isnan(scale), scale, np.float32(1)).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.rint(x / scale[..., None])
    # A row with NaN or inf gets a NaN or inf scale and reads back as NaN; its q is 0 where undefined.
    return np.where(np.isnan(q), 0, np.clip(q, -127, 127)).astype(np.int8), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 ``q [..., D]`` times its float32 row ``scale [...]``, in float32 (a row stored with a NaN
    or inf scale, from a row holding NaN or inf, reads back as NaN or inf: numpy's warning is muted)."""
    with np.errstate(invalid="ignore"):
        return q.astype(np.float32) * scale[..., None].astype(np.float32)
