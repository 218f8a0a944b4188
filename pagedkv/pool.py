"""The one flat buffer that holds every key and value: :class:`KVPool`."""

from __future__ import annotations

import numpy as np

from .config import CacheConfig
from .device import DEVICES, Array, zeros
from .errors import ConfigError, PoolMismatchError
from .layout import K, Strides, V


def human_bytes(n: float) -> str:
    """``n`` bytes as B, KiB, MiB or GiB, whichever reads best."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class KVPool:
    """Every K and V of every layer in one contiguous float32 array.

    ``pool.data`` is the flat array (numpy on ``device="cpu"``, a numba CUDA
    device array on ``device="cuda"``); where each number sits in it is
    described in :mod:`pagedkv.layout`. The pool starts zeroed. It holds no
    bookkeeping: which blocks belong to whom is the block manager's business.

    Args:
        config: the geometry.
        device: ``"cpu"`` or ``"cuda"`` (needs ``pip install pagedkv[gpu]`` and
            a GPU, or numba's CUDA simulator).
    """

    __slots__ = ("config", "strides", "device", "_data")

    def __init__(self, config: CacheConfig, *, device: str = "cpu") -> None:
        if not isinstance(config, CacheConfig):
            raise ConfigError(f"KVPool needs a CacheConfig, got {type(config).__name__}")
        if device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {device!r}")
        self.config = config
        self.strides: Strides = config.strides
        self.device = device
        self._data: Array = zeros(self.strides.size, config.dtype, device)

    @property
    def data(self) -> Array:
        """The flat array (read-only attribute: the kernels rely on its size and dtype; its
        elements are, of course, writable)."""
        return self._data

    def __repr__(self) -> str:
        c = self.config
        return (
            f"KVPool(layers={c.num_layers}, blocks={c.num_blocks}x{c.block_size}, "
            f"H={c.num_kv_heads}, D={c.head_dim}, layout={c.layout}, device={self.device!r}, "
            f"{human_bytes(c.memory_bytes)})"
        )

    def same_geometry(self, other: KVPool) -> bool:
        """Whether ``other`` has exactly this pool's shape and layout."""
        return self.strides == other.strides

    def _half(self, layer: int, kv: int) -> Array:
        layer = self.config.check_layer(layer)
        s, c = self.strides, self.config
        start = layer * s.layer_stride + kv * s.kv_stride
        flat = self.data[start:start + s.kv_stride]
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

    def to_host(self) -> np.ndarray:
        """The flat data as a numpy array (a copy when the pool is on a GPU)."""
        if isinstance(self.data, np.ndarray):
            return self.data
        return self.data.copy_to_host()
