"""A small Llama-shaped transformer in numpy, to show (and test) pagedkv in a real decode loop.

RMSNorm, rotary position embeddings, grouped-query attention and a SwiGLU
feed-forward, with random weights from a seed. The model does not own a
cache: each layer hands its queries, keys and values to an ``attend``
function, so the same model runs over a :class:`~pagedkv.PagedKVCache` or a
plain contiguous cache (:class:`DenseCache`), and their outputs can be compared.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..cache import PagedKVCache
from ..geometry.config import CacheConfig, LayerGroup
from ..geometry.layout import window_start

Attend = Callable[[int, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Sizes of :class:`TinyLlama` (defaults: about 100k parameters)."""

    vocab_size: int = 128
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    hidden_dim: int = 128
    rope_theta: float = 10000.0
    seed: int = 0
    sliding_window: int | None = None  # Gemma-like: the even layers see only their last W positions

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (None: full attention)."""
        return self.sliding_window if layer % 2 == 0 else None


class TinyLlama:
    """Llama-shaped decoder with random weights; float32 throughout."""

    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        c = self.config = config
        rng = np.random.default_rng(c.seed)

        def w(*shape):
            return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[0])).astype(np.float32)

        self.embed = rng.standard_normal((c.vocab_size, c.dim), dtype=np.float32)
        self.layers = [
            dict(wq=w(c.dim, c.num_heads * c.head_dim), wk=w(c.dim, c.num_kv_heads * c.head_dim),
                 wv=w(c.dim, c.num_kv_heads * c.head_dim), wo=w(c.num_heads * c.head_dim, c.dim),
                 w1=w(c.dim, c.hidden_dim), w3=w(c.dim, c.hidden_dim), w2=w(c.hidden_dim, c.dim))
            for _ in range(c.num_layers)
        ]
        self.out = w(c.dim, c.vocab_size)
        self.inv_freq = c.rope_theta ** (-np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim)

    def cache_config(self, num_blocks: int, block_size: int = 16, layout: str = "NHD",
                     dtype: str = "float32") -> CacheConfig:
        """A cache geometry that fits this model, storing K/V in ``dtype``; with sliding layers,
        two layer groups (sliding, full) whose sliding group frees what leaves its window."""
        c = self.config
        config = CacheConfig(num_layers=c.num_layers, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                             num_blocks=num_blocks, block_size=block_size, layout=layout, dtype=dtype)
        if c.sliding_window is None:
            return config
        layers = range(c.num_layers)
        return replace(config, layer_groups=(LayerGroup(tuple(i for i in layers if c.window(i)), c.sliding_window),
                                             LayerGroup(tuple(i for i in layers if not c.window(i)))))

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Rotary embeddings on ``x [N, heads, D]`` (pairs (i, i + D/2), as in Llama)."""
        angles = positions[:, None].astype(np.float64) * self.inv_freq[None, :]  # [N, D/2]
        cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
        half = x.shape[-1] // 2
        a, b = x[..., :half].astype(np.float64), x[..., half:].astype(np.float64)
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1).astype(np.float32)

    @staticmethod
    def _rmsnorm(x: np.ndarray) -> np.ndarray:
        return (x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6)).astype(np.float32)

    def forward(self, tokens: np.ndarray, positions: np.ndarray, attend: Attend) -> np.ndarray:
        """Logits ``[N, vocab]`` of ``N`` new tokens at ``positions``; ``attend(layer, q, k, v)``
        stores k, v in a cache and returns the attention output ``[N, Hq, D]``."""
        c = self.config
        n = len(tokens)
        x = self.embed[tokens]
        for layer, p in enumerate(self.layers):
            h = self._rmsnorm(x)
            q = self._rope((h @ p["wq"]).reshape(n, c.num_heads, c.head_dim), positions)
            k = self._rope((h @ p["wk"]).reshape(n, c.num_kv_heads, c.head_dim), positions)
            v = np.ascontiguousarray((h @ p["wv"]).reshape(n, c.num_kv_heads, c.head_dim))
            a = np.asarray(attend(layer, q, k, v))
            x = x + a.reshape(n, -1) @ p["wo"]
            h = self._rmsnorm(x)
            gate = h @ p["w1"]
            x = x + ((gate / (1 + np.exp(-gate))) * (h @ p["w3"])) @ p["w2"]
        return self._rmsnorm(x) @ self.out


def paged_step(model: TinyLlama, cache: PagedKVCache, seq_ids: Sequence[Hashable],
               new_tokens: Sequence[Sequence[int]]) -> np.ndarray:
    """Run one batched step over the paged cache; the logits of each sequence's last new token."""
    step = cache.begin_step(seq_ids, [len(t) for t in new_tokens], token_ids=new_tokens)

    def attend(layer, q, k, v):
        cache.write(layer, k, v, step)
        return _host(cache.attention(layer, q, step))

    tokens = np.concatenate([np.asarray(t, dtype=np.int64) for t in new_tokens])
    logits = model.forward(tokens, step.positions, attend)
    return logits[np.cumsum(step.num_new_tokens) - 1]


def _host(x) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.copy_to_host()


class DenseCache:
    """The plain alternative: each sequence's K/V in contiguous arrays, attention in float64."""

    def __init__(self, model: TinyLlama) -> None:
        self.model = model
        self.k: dict[Hashable, list[np.ndarray]] = {}
        self.v: dict[Hashable, list[np.ndarray]] = {}

    def step(self, seq_ids: Sequence[Hashable], new_tokens: Sequence[Sequence[int]]) -> np.ndarray:
        """Like :func:`paged_step`, over contiguous per-sequence arrays."""
        c = self.model.config
        counts = [len(t) for t in new_tokens]
        starts = [self.k[s][0].shape[0] if s in self.k else 0 for s in seq_ids]
        for s in seq_ids:
            empty = np.zeros((0, c.num_kv_heads, c.head_dim), np.float32)
            self.k.setdefault(s, [empty] * c.num_layers)
            self.v.setdefault(s, [empty] * c.num_layers)
        positions = np.concatenate([np.arange(a, a + n) for a, n in zip(starts, counts, strict=True)])
        bounds = np.cumsum([0] + counts)

        def attend(layer, q, k, v):
            out = np.zeros(q.shape, np.float32)
            group = c.num_heads // c.num_kv_heads
            for i, s in enumerate(seq_ids):
                lo, hi = bounds[i], bounds[i + 1]
                self.k[s][layer] = np.concatenate([self.k[s][layer], k[lo:hi]])
                self.v[s][layer] = np.concatenate([self.v[s][layer], v[lo:hi]])
                keys, values = self.k[s][layer].astype(np.float64), self.v[s][layer].astype(np.float64)
                window = c.window(layer)
                for row in range(lo, hi):
                    pos = positions[row]
                    first = window_start(pos, window)
                    for h in range(c.num_heads):
                        scores = keys[first:pos + 1, h // group] @ q[row, h].astype(np.float64) / np.sqrt(c.head_dim)
                        w = np.exp(scores - scores.max())
                        out[row, h] = w @ values[first:pos + 1, h // group] / w.sum()
            return out

        tokens = np.concatenate([np.asarray(t, dtype=np.int64) for t in new_tokens])
        logits = self.model.forward(tokens, positions, attend)
        return logits[bounds[1:] - 1]

    def free(self, seq_id: Hashable) -> None:
        self.k.pop(seq_id, None)
        self.v.pop(seq_id, None)


def generate_dense(model: TinyLlama, prompt: Sequence[int], max_new_tokens: int) -> tuple[list[int], np.ndarray]:
    """Greedy generation over a :class:`DenseCache`: the new token ids and each step's logits."""
    dense = DenseCache(model)
    logits = dense.step([0], [list(prompt)])
    out, all_logits = [], []
    for _ in range(max_new_tokens):
        all_logits.append(logits[0])
        token = int(np.argmax(logits[0]))
        out.append(token)
        logits = dense.step([0], [[token]])
    return out, np.array(all_logits)


def generate_paged(model: TinyLlama, cache: PagedKVCache, prompt: Sequence[int],
                   max_new_tokens: int) -> tuple[list[int], np.ndarray]:
    """Greedy generation of one sequence through ``cache`` (its prompt prefix may come from
    the prefix cache): the new token ids and each step's logits. The sequence is freed after."""
    seq, cached = cache.add_sequence(prompt_token_ids=list(prompt))
    logits = paged_step(model, cache, [seq], [list(prompt[cached:])])
    out, all_logits = [], []
    for _ in range(max_new_tokens):
        all_logits.append(logits[0])
        token = int(np.argmax(logits[0]))
        out.append(token)
        logits = paged_step(model, cache, [seq], [[token]])
    cache.free(seq)
    return out, np.array(all_logits)
