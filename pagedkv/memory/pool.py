"""The one flat buffer that holds every key and value: :class:`KVPool`."""

from __future__ import annotations

from typing import cast

import numpy as np

from ..errors import ConfigError, PoolMismatchError
from ..geometry import formats, layout
from ..geometry.config import CacheConfig, human_bytes  # noqa: F401  (human_bytes: it lived here)
from ..geometry.layout import K, Strides, V
from .device import DEVICES, Array, zeros


class KVPool:
    """Every K and V of every layer in one contiguous float32 array.

    ``pool.data`` is the flat array (numpy on ``device="cpu"``, a numba CUDA
    device array on ``device="cuda"``); where each number sits in it is
    described in :mod:`pagedkv.geometry.layout`. The pool starts zeroed. It holds no
    bookkeeping: which blocks belong to whom is the block manager's business.

    Args:
        config: the geometry.
        device: ``"cpu"`` or ``"cuda"`` (needs ``pip install pagedkv[gpu]`` and
            a GPU, or numba's CUDA simulator).
    """

    __slots__ = ("config", "strides", "device", "_data", "_scales", "_kv_scales")

    def __init__(self, config: CacheConfig, *, device: str = "cpu") -> None:
        if not isinstance(config, CacheConfig):
            raise ConfigError(f"KVPool needs a CacheConfig, got {type(config).__name__}")
        if device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {device!r}")
        self.config = config
        self.strides: Strides = config.strides
        self.device = device
        fmt = config.format
        self._data: Array = zeros(self.strides.size, fmt.storage, device)
        # int8: a float32 scale per (token, head), laid out as layout.scale_index says
        self._scales: Array | None = zeros(self.strides.num_scales, np.dtype(np.float32), device) \
            if fmt.scale == "token" else None
        # fp8: a static k_scale and v_scale per layer (vLLM's), 1 until set
        self._kv_scales = np.ones((config.num_planes, 2), np.float32) if fmt.scale == "tensor" else None

    @property
    def data(self) -> Array:
        """The flat array (read-only attribute: the kernels rely on its size and dtype; its
        elements are, of course, writable)."""
        return self._data

    @property
    def scales(self) -> Array | None:
        """int8 pools: the flat float32 scales, one per (token, head) (see
        :func:`pagedkv.geometry.layout.scale_index`); None for other formats."""
        return self._scales

    @property
    def host_scales(self) -> np.ndarray:
        """The scales of an int8 CPU pool, as the numpy array they are (no copy).

        Raises:
            PoolMismatchError: the pool is not int8, or it is on a GPU.
        """
        if not isinstance(self._scales, np.ndarray):
            raise PoolMismatchError(f"this pool ({self.config.dtype}, on {self.device!r}) has no host scales")
        return self._scales

    @property
    def kv_scales(self) -> np.ndarray | None:
        """fp8 pools: float32 ``[num_planes, 2]``, each layer's (plane's) ``k_scale`` and ``v_scale``
        (a copy; see :meth:`set_kv_scales`); None for other formats."""
        return None if self._kv_scales is None else self._kv_scales.copy()

    def set_kv_scales(self, layer: int, k_scale: float, v_scale: float) -> None:
        """Set an fp8 pool's static scales of ``layer`` (stored = encode(x / scale)).

        Set them before writing the layer: K/V already stored were encoded with the old ones.

        Raises:
            ConfigError: the pool is not fp8, or a scale is not a positive float32 number.
        """
        if self._kv_scales is None:
            raise ConfigError(f"only fp8 pools have per-layer k/v scales; this one stores {self.config.dtype}")
        layer = self.config.check_plane(layer)
        for name, x in (("k_scale", k_scale), ("v_scale", v_scale)):
            try:
                with np.errstate(over="ignore"):
                    as_float32 = np.float32(float(x))
                ok = bool(np.isfinite(as_float32) and as_float32 > 0)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ConfigError(f"{name} must be a positive, finite float32 number, got {x!r}")
        self._kv_scales[layer] = (np.float32(k_scale), np.float32(v_scale))

    def __repr__(self) -> str:
        c = self.config
        planes = "" if c.num_planes == c.num_layers else f" in {c.num_planes} planes"
        return (
            f"KVPool(layers={c.num_layers}{planes}, blocks={c.num_blocks}x{c.block_size}, "
            f"H={c.num_kv_heads}, D={c.head_dim}, layout={c.layout}, {c.dtype}, device={self.device!r}, "
            f"{human_bytes(c.memory_bytes)})"
        )

    def same_geometry(self, other: KVPool) -> bool:
        """Whether ``other`` has exactly this pool's shape and layout."""
        return self.strides == other.strides

    def _half(self, layer: int, kv: int) -> Array:
        return self._half_of(self.data, self.config.check_plane(layer), kv)

    def _half_of(self, data: Array, layer: int, kv: int) -> Array:
        s, c = self.strides, self.config
        start = layer * s.layer_stride + kv * s.kv_stride
        flat = data[start:start + s.kv_stride]
        if c.layout == "NHD":
            return flat.reshape(c.num_blocks, c.block_size, c.num_kv_heads, c.head_dim)
        return flat.reshape(c.num_blocks, c.num_kv_heads, c.block_size, c.head_dim)

    def k(self, layer: int) -> Array:
        """Keys of ``layer`` as a 4-D view (no copy).

        Shape ``[num_blocks, block_size, H, D]`` in layout NHD,
        ``[num_blocks, H, block_size, D]`` in layout HND.
        """
        return self._half(layer, K)

    def v(self, layer: int) -> Array:
        """Values of ``layer`` as a 4-D view (no copy); shaped like :meth:`k`."""
        return self._half(layer, V)

    @property
    def host(self) -> np.ndarray:
        """The flat data of a CPU pool, as the numpy array it is (no copy).

        Raises:
            PoolMismatchError: the pool is on a GPU (:meth:`to_host` copies it over).
        """
        if not isinstance(self.data, np.ndarray):
            raise PoolMismatchError(f"this pool is on {self.device!r}; to_host() copies it to the host")
        return self.data

    def k_decoded(self, layer: int) -> np.ndarray:
        """Keys of ``layer`` as float32, shaped like :meth:`k` (a decoded copy, on the host)."""
        return self._decoded(layer, K)

    def v_decoded(self, layer: int) -> np.ndarray:
        """Values of ``layer`` as float32, shaped like :meth:`v` (a decoded copy, on the host)."""
        return self._decoded(layer, V)

    def _decoded(self, layer: int, kv: int) -> np.ndarray:
        stored = self.host if self.device == "cpu" else self.to_host()
        half = cast(np.ndarray, self._half_of(stored, self.config.check_plane(layer), kv))
        c, scale = self.config, None
        if self._kv_scales is not None:  # fp8: one scale per layer, K and V
            scale = self._kv_scales[layer, kv]
        elif self._scales is not None:  # int8: a scale per (token, head), shaped like the view's rows
            s = self.strides
            start = layout.scale_index(layer, kv, 0, 0, s)
            scales = self._scales if isinstance(self._scales, np.ndarray) else self._scales.copy_to_host()
            scale = scales[start:start + s.num_blocks * s.block_size * s.num_kv_heads]
            scale = scale.reshape(c.num_blocks, c.block_size, c.num_kv_heads)
            if c.layout == "HND":
                scale = scale.transpose(0, 2, 1)
        return formats.to_float32(c.format, half, scale)

    def to_host(self) -> np.ndarray:
        """The flat data as a numpy array (a copy when the pool is on a GPU)."""
        if isinstance(self.data, np.ndarray):
            return self.data
        return self.data.copy_to_host()
