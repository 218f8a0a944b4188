"""The geometry of a KV cache: :class:`CacheConfig`."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, LayerIndexError
from .formats import FORMATS, StorageFormat, get_format
from .layout import INT32_MAX, INT64_MAX, LAYOUTS, Strides, cdiv, make_strides


def _positive_int(name: str, value) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Shape of a paged KV cache; checks itself when built.

    Attributes:
        num_layers: transformer layers, each with its own K and V.
        num_kv_heads: key/value heads per layer (``H``).
        head_dim: numbers per head (``D``).
        num_blocks: blocks in the pool, shared by all sequences.
        block_size: token positions per block (16 as in vLLM).
        dtype: the storage format, a name of :data:`pagedkv.formats.FORMATS`
            (``"float32"``, ``"float16"``, ``"bfloat16"``, ``"fp8_e4m3"``,
            ``"fp8_e5m2"``, ``"int8"``) or a numpy/torch dtype object; kept as
            its name. K/V go in and come out as float32 whatever it is.
        layout: ``"NHD"`` (a token's heads together) or ``"HND"`` (a head's
            tokens together); see :mod:`pagedkv.layout`.

    Raises:
        ConfigError: a size that is not a positive integer, an unknown layout
            or an unsupported dtype.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int = 16
    dtype: str = "float32"
    layout: str = "NHD"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_blocks", "block_size"):
            object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
        object.__setattr__(self, "dtype", get_format(self.dtype).name)
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.num_blocks > INT32_MAX:  # block tables are int32
            raise ConfigError(f"num_blocks must fit in int32, got {self.num_blocks}")
        if self.strides.size * self.format.itemsize > INT64_MAX:  # flat offsets are int64
            raise ConfigError("a pool of this geometry has more elements than an int64 offset can address")

    @property
    def strides(self) -> Strides:
        """The offset arithmetic of this geometry (see :mod:`pagedkv.layout`)."""
        return make_strides(
            self.num_layers, self.num_blocks, self.block_size,
            self.num_kv_heads, self.head_dim, self.layout,
        )

    @property
    def num_slots(self) -> int:
        """Token positions in the pool: ``num_blocks * block_size``."""
        return self.num_blocks * self.block_size

    @property
    def format(self) -> StorageFormat:
        """The storage format (see :mod:`pagedkv.formats`)."""
        return FORMATS[self.dtype]

    @property
    def storage_dtype(self) -> np.dtype:
        """The numpy dtype of the pool's raw elements (uint16 for float16 and bfloat16...)."""
        return self.format.storage

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes across every layer, K and V, with its scales (int8: a float32
        scale per token and head)."""
        tokens = self.num_layers * 2 * self.block_size * self.num_kv_heads
        scales = tokens * 4 if self.format.scale == "token" else 0
        return tokens * self.head_dim * self.format.itemsize + scales

    @property
    def memory_bytes(self) -> int:
        """Bytes of the whole pool, scales included (fp8: a k and v scale per layer)."""
        per_layer = self.num_layers * 2 * 4 if self.format.scale == "tensor" else 0
        return self.num_blocks * self.bytes_per_block + per_layer

    def check_layer(self, layer) -> int:
        """``layer`` as an int, or a LayerIndexError unless ``0 <= layer < num_layers``."""
        try:
            layer = operator.index(layer)
        except TypeError:
            raise LayerIndexError(f"layer must be an integer, got {layer!r}") from None
        if not 0 <= layer < self.num_layers:
            raise LayerIndexError(f"layer {layer} is outside 0..{self.num_layers - 1}")
        return layer

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens of one sequence."""
        return cdiv(num_tokens, self.block_size)

    @classmethod
    def from_max_seq_len(
        cls, *, num_layers: int, num_kv_heads: int, head_dim: int,
        max_seq_len: int, max_batch_size: int, block_size: int = 16, **kw,
    ) -> CacheConfig:
        """Enough blocks for ``max_batch_size`` sequences of ``max_seq_len`` tokens each.

        That is ``ceil(max_seq_len / block_size) * max_batch_size`` blocks: the
        worst case, which a paged cache rarely needs (see ``pagedkv demo``).
        """
        max_seq_len = _positive_int("max_seq_len", max_seq_len)
        max_batch_size = _positive_int("max_batch_size", max_batch_size)
        block_size = _positive_int("block_size", block_size)
        num_blocks = cdiv(max_seq_len, block_size) * max_batch_size
        return cls(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   num_blocks=num_blocks, block_size=block_size, **kw)

    @classmethod
    def from_memory_budget(
        cls, budget_bytes: int, *, num_layers: int, num_kv_heads: int, head_dim: int,
        block_size: int = 16, **kw,
    ) -> CacheConfig:
        """The most blocks whose pool fits in ``budget_bytes``.

        Raises:
            ConfigError: the budget does not hold even one block.
        """
        budget_bytes = _positive_int("budget_bytes", budget_bytes)
        one = cls(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                  num_blocks=1, block_size=block_size, **kw)
        num_blocks = (budget_bytes - (one.memory_bytes - one.bytes_per_block)) // one.bytes_per_block
        if num_blocks == 0:
            raise ConfigError(
                f"a budget of {budget_bytes} bytes holds no block; one block takes {one.bytes_per_block} bytes"
            )
        return cls(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   num_blocks=num_blocks, block_size=block_size, **kw)
