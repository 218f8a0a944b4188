"""The geometry of a KV cache: :class:`CacheConfig`."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, LayerIndexError
from .formats import FORMATS, StorageFormat, get_format
from .layout import INT32_MAX, INT64_MAX, LAYOUTS, Strides, cdiv, make_strides


def _index(value: object, limit: int, what: str, note: str = "") -> int:
    """``value`` as an int in ``0..limit - 1``, or a LayerIndexError naming it ``what``."""
    try:
        value = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise LayerIndexError(f"layer must be an integer, got {value!r}") from None
    if not 0 <= value < limit:
        raise LayerIndexError(f"{what} {value} is outside 0..{limit - 1}{note}")
    return value


def human_bytes(n: float, digits: int = 1) -> str:
    """``n`` bytes as B, KiB, MiB or GiB, whichever reads best, with ``digits`` decimals."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    return f"{n:.{digits}f} GiB"


def positive_int(name: str, value) -> int:
    """``value`` as an int if it is a positive integer (not a bool), else a ConfigError naming ``name``."""
    if isinstance(value, bool):  # an int to Python, never a size
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class LayerGroup:
    """Layers that attend alike and so share block tables (see :attr:`CacheConfig.layer_groups`).

    Attributes:
        layers: the model's layer numbers in this group, in plane order: the group's
            i-th layer stores its K/V in pool plane i.
        sliding_window: None for full attention; W for layers whose queries see only their
            last W positions (their own included): a block whose positions have all left
            the window goes back to the pool.
    """

    layers: tuple[int, ...]
    sliding_window: int | None = None


def _layer_groups(groups: object, num_layers: int, num_slots: int) -> tuple[LayerGroup, ...]:
    """``groups`` checked and normalised (None: one full-attention group of every layer)."""
    if groups is None:
        return (LayerGroup(tuple(range(num_layers))),)
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence) or not groups:
        raise ConfigError(f"layer_groups must be a non-empty sequence of LayerGroup, got {groups!r}")
    out: list[LayerGroup] = []
    owner: dict[int, int] = {}
    for g, group in enumerate(groups):
        if not isinstance(group, LayerGroup):
            try:
                group = LayerGroup(*group) if isinstance(group, tuple) else LayerGroup(group)
            except TypeError:
                raise ConfigError(f"layer group {g} must be a LayerGroup or (layers, sliding_window), "
                                  f"got {group!r}") from None
        if isinstance(group.layers, (str, bytes)) or not isinstance(group.layers, Sequence) or not group.layers:
            raise ConfigError(f"layer group {g} must name at least one layer, got {group.layers!r}")
        layers = []
        for layer in group.layers:
            if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < num_layers:
                raise ConfigError(f"layer group {g} names layer {layer!r}, not one of 0..{num_layers - 1}")
            if int(layer) in owner:
                raise ConfigError(f"layer {layer} is in layer groups {owner[int(layer)]} and {g}")
            owner[int(layer)] = g
            layers.append(int(layer))
        window = group.sliding_window
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or not 1 <= window <= num_slots:
                raise ConfigError(f"layer group {g}: sliding_window must be an integer in 1..{num_slots} "
                                  f"(the tokens the pool holds), got {window!r}")
            window = int(window)
        out.append(LayerGroup(tuple(layers), window))
    missing = sorted(set(range(num_layers)) - set(owner))
    if missing:
        raise ConfigError(f"layers {missing} are in no layer group")
    return tuple(out)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Shape of a paged KV cache; checks itself when built.

    Attributes:
        num_layers: transformer layers, each with its own K and V.
        num_kv_heads: key/value heads per layer (``H``).
        head_dim: numbers per head (``D``).
        num_blocks: blocks in the pool, shared by all sequences.
        block_size: token positions per block (16 as in vLLM).
        dtype: the storage format, a name of :data:`pagedkv.geometry.formats.FORMATS`
            (``"float32"``, ``"float16"``, ``"bfloat16"``, ``"fp8_e4m3"``,
            ``"fp8_e5m2"``, ``"int8"``) or a numpy/torch dtype object; kept as
            its name. K/V go in and come out as float32 whatever it is.
        layout: ``"NHD"`` (a token's heads together) or ``"HND"`` (a head's
            tokens together); see :mod:`pagedkv.geometry.layout`.
        layer_groups: None (every layer attends fully: one group), or the
            :class:`LayerGroup` s of a model that mixes full and sliding-window
            layers (Gemma 2/3, Mistral, gpt-oss), each a ``LayerGroup`` or a
            ``(layers, sliding_window)`` tuple; every layer in exactly one.
            Each group has its own block tables over the one pool of
            ``num_blocks`` blocks, and a block holds the K/V of one group's
            layers: block ``b`` of plane ``i`` is the ``i``-th layer of whichever
            group owns ``b``. So the pool has ``num_planes`` (the largest
            group's size) layers of storage, not ``num_layers``: give groups
            equal sizes, or a smaller group's blocks leave planes unused.

    Raises:
        ConfigError: a size that is not a positive integer, an unknown layout,
            an unsupported dtype, or layer groups that leave a layer out, name
            one twice or beyond ``num_layers``, or a window outside
            ``1..num_blocks * block_size``.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int = 16
    dtype: str = "float32"
    layout: str = "NHD"
    layer_groups: tuple[LayerGroup, ...] = None  # type: ignore[assignment]  # None: one full group

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_blocks", "block_size"):
            object.__setattr__(self, name, positive_int(name, getattr(self, name)))
        object.__setattr__(self, "layer_groups",
                           _layer_groups(self.layer_groups, self.num_layers, self.num_blocks * self.block_size))
        object.__setattr__(self, "dtype", get_format(self.dtype).name)
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.num_blocks > INT32_MAX:  # block tables are int32
            raise ConfigError(f"num_blocks must fit in int32, got {self.num_blocks}")
        if self.strides.size * self.format.itemsize > INT64_MAX:  # flat offsets are int64
            raise ConfigError("a pool of this geometry has more elements than an int64 offset can address")

    @property
    def strides(self) -> Strides:
        """The offset arithmetic of this geometry (see :mod:`pagedkv.geometry.layout`)."""
        return make_strides(
            self.num_planes, self.num_blocks, self.block_size,
            self.num_kv_heads, self.head_dim, self.layout,
        )

    @property
    def num_planes(self) -> int:
        """Layers of storage in the pool: ``num_layers`` with one group, else the largest
        group's size (groups share the planes; see ``layer_groups``)."""
        return max(len(g.layers) for g in self.layer_groups)

    def plane_of(self, layer: object) -> tuple[int, int]:
        """``(group, plane)`` of a model layer: its group's index and the pool plane (the
        pool-level layer number) that holds its K/V. LayerIndexError for a bad layer."""
        layer = self.check_layer(layer)
        for g, group in enumerate(self.layer_groups):
            if layer in group.layers:
                return g, group.layers.index(layer)
        raise AssertionError("unreachable: every layer is in a group")  # pragma: no cover

    @property
    def num_slots(self) -> int:
        """Token positions in the pool: ``num_blocks * block_size``."""
        return self.num_blocks * self.block_size

    @property
    def format(self) -> StorageFormat:
        """The storage format (see :mod:`pagedkv.geometry.formats`)."""
        return FORMATS[self.dtype]

    @property
    def storage_dtype(self) -> np.dtype:
        """The numpy dtype of the pool's raw elements (uint16 for float16 and bfloat16...)."""
        return self.format.storage

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes across every plane (every layer of a group), K and V, with
        its scales (int8: a float32 scale per token and head)."""
        tokens = self.num_planes * 2 * self.block_size * self.num_kv_heads
        scales = tokens * 4 if self.format.scale == "token" else 0
        return tokens * self.head_dim * self.format.itemsize + scales

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token's K and V take in every layer, scales included: what a dense cache
        holds per token (a block's bytes are shared by the layers of one plane each)."""
        return self.bytes_per_block * self.num_layers // (self.num_planes * self.block_size)

    @property
    def memory_bytes(self) -> int:
        """Bytes of the whole pool, scales included (fp8: a k and v scale per plane)."""
        per_layer = self.num_planes * 2 * 4 if self.format.scale == "tensor" else 0
        return self.num_blocks * self.bytes_per_block + per_layer

    def check_layer(self, layer) -> int:
        """``layer`` as an int, or a LayerIndexError unless ``0 <= layer < num_layers``."""
        return _index(layer, self.num_layers, "layer")

    def check_plane(self, plane: object) -> int:
        """A pool-level layer number (a plane, see ``num_planes``) as an int, or a
        LayerIndexError unless ``0 <= plane < num_planes``."""
        if self.num_planes == self.num_layers:
            return self.check_layer(plane)
        return _index(plane, self.num_planes, "pool layer", " (the pool's planes: layers of different groups "
                                                            "share them; PagedKVCache maps model layers)")

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
        max_seq_len = positive_int("max_seq_len", max_seq_len)
        max_batch_size = positive_int("max_batch_size", max_batch_size)
        block_size = positive_int("block_size", block_size)
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
        budget_bytes = positive_int("budget_bytes", budget_bytes)
        # The bytes of one block do not depend on the windows (checked against the final size).
        groups = _layer_groups(kw.get("layer_groups"), positive_int("num_layers", num_layers), INT64_MAX)
        one = cls(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, num_blocks=1,
                  block_size=block_size, **{**kw, "layer_groups": [LayerGroup(g.layers) for g in groups]})
        num_blocks = (budget_bytes - (one.memory_bytes - one.bytes_per_block)) // one.bytes_per_block
        if num_blocks == 0:
            raise ConfigError(
                f"a budget of {budget_bytes} bytes holds no block; one block takes {one.bytes_per_block} bytes"
            )
        return cls(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   num_blocks=num_blocks, block_size=block_size, **kw)
