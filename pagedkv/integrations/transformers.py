"""pagedkv as the KV cache of a Hugging Face transformers model: :class:`PagedCache`.

::

    from pagedkv.integrations.transformers import PagedCache

    cache = PagedCache(model.config)                     # one line: K/V now live in a paged pool
    out = model.generate(**inputs, cache=cache, max_new_tokens=32)
    print(cache.memory())                                # pool bytes beside a dense cache's

Needs ``pip install "pagedkv[hf]"`` (transformers 5.24 or later 5.x, and torch; tested with
transformers 5.24 and 5.25 and torch 2.13, on the CPU; before 5.24 the argument of ``generate``
was ``past_key_values=``, which later versions still take with a FutureWarning). ``import pagedkv``
does not import this module, nor transformers.

How it works. transformers calls ``update(key_states, value_states, layer_idx)``
once per layer and forward pass with the new tokens' K/V ``[B, H, T, D]``, and
attends over what ``update`` returns. Each batch row is one pagedkv sequence of a
:class:`~pagedkv.PagedKVCache`: the first layer of a forward pass begins a step
(blocks for the T new tokens of every row, copy-on-write applied), every layer
writes its K/V into the pool and returns that layer's keys and values gathered
from the blocks. The model's own attention (eager, sdpa...) then runs unchanged,
so the tokens generated are those of transformers' ``DynamicCache``, bit for bit,
when the pool stores the model's dtype (the default: float32, bfloat16 or float16
models). A narrower pool (``dtype="fp8_e4m3"``, ``"int8"``...) trades exactness
for memory. Outside the pool there is one layer's gathered keys and values, in two
buffers every layer reuses (handed to the model as strided views, never copied again).

With ``attn_implementation="pagedkv"`` (:mod:`pagedkv.integrations.hf_attention`), ``update``
stores nothing and gathers nothing: it hands the new K/V to that attention function, which
writes the real tokens (padding skipped) and runs pagedkv's kernels over the pool.

Beam search and ``num_return_sequences > 1`` fork sequences: beams share their
blocks until one diverges inside a block (copy-on-write), instead of the copies
``DynamicCache`` makes at every reordering. ``crop`` (assisted decoding, prompt lookup)
rolls sequences back, with transformers' meaning: ``crop(-n)`` removes the last ``n``
tokens, ``crop(0)`` nothing.

Sliding-window models (Gemma 2/3, Qwen2, gpt-oss: a config with ``layer_types`` and
``sliding_window``; Mistral, Phi-3: a ``sliding_window`` alone, every layer sliding; see
:mod:`.hf_layers`, which also refuses layers of other kinds) get layer groups
(:class:`~pagedkv.LayerGroup`): the sliding layers' blocks go back to the pool once every
position in them has left the window, and those layers hand the model only the blocks still
in the window (their ``get_mask_sizes`` says where they start, as transformers' own sliding
layers do).
A ``crop`` that would need freed blocks is refused (ArgumentError).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..backends import resolve_backend
from ..cache import PagedKVCache, Step
from ..errors import ArgumentError, ConfigError
from ..geometry.config import CacheConfig, positive_int
from ..geometry.formats import get_format
from ..geometry.layout import cdiv, window_start_block
from ..offload.stores import BlockStore
from .hf_identity import config_dtype, kv_geometry, model_id, model_id_of
from .hf_layers import layer_groups

__all__ = ["ATTENTION", "EXACT_FORMATS", "PagedCache", "PagedLayer", "model_id"]

#: the attention implementation that runs pagedkv's kernels over the pool (see :mod:`.hf_attention`)
ATTENTION = "pagedkv"
#: the attribute of the K/V tensors ``update`` hands that attention function: their PagedLayer
LAYER_TAG = "pagedkv_layer"
#: the pool format that stores a model's K/V exactly, by torch dtype
EXACT_FORMATS = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    """``[B, H, T, D]`` K or V (or queries) as the ``[B * T, H, D]`` token rows a write takes:
    float32 and float16 as they are, bfloat16 as its bit patterns (uint16), exactly; other dtypes
    as float32. The transpose is numpy's (a decode step's, T = 1, copies nothing): torch's
    operators cost more per call than the few bytes of a decode step."""
    if x.device.type != "cpu":
        raise ArgumentError(f"the transformers integration runs on the CPU; got K/V on {x.device}")
    b, h, t, d = x.shape
    x = x.detach()
    if x.dtype == torch.bfloat16:
        a = x.view(torch.int16).numpy().view(np.uint16)
    else:
        a = (x if x.dtype in (torch.float32, torch.float16) else x.float()).numpy()
    return np.ascontiguousarray(a.transpose(0, 2, 1, 3)).reshape(b * t, h, d)


def _rows(prompt_ids: Any) -> list[list[int]]:
    """Token ids ``[B, L]`` (a tensor, an array or lists) as lists of ints."""
    rows = prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else prompt_ids
    if not rows or not all(isinstance(r, (list, tuple)) for r in rows):
        raise ArgumentError("prompt_ids must be [B, L] token ids (input_ids)")
    return [[int(t) for t in r] for r in rows]


class PagedLayer(CacheLayerMixin):
    """One model layer's view of a :class:`PagedCache` (transformers asks each layer for its length)."""

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, cache: PagedCache, layer_idx: int, sliding_window: int | None = None) -> None:
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        self.num_tokens = 0  # tokens of each row this layer has stored
        self.sliding_window = sliding_window  # its blocks are freed as they leave the window
        self.is_sliding = sliding_window is not None

    def first_kept(self) -> int:
        """The first position this layer hands the model at its next update: 0, or for a
        sliding layer the start of the first block the window of its next token reaches."""
        return window_start_block(self.num_tokens, self.sliding_window, self.cache.block_size) * self.cache.block_size

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if getattr(self.cache.config, "_attn_implementation", None) == ATTENTION:
            return self.cache.defer(self, key_states, value_states)
        return self.cache.store(self, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        offset = self.first_kept()
        return self.num_tokens + query_length - offset, offset

    def get_seq_length(self) -> int:
        return self.num_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.num_tokens = 0


class PagedCache(Cache):
    """A transformers ``Cache`` whose K/V live in a pagedkv pool (see the module docstring).

    Args:
        config: the model's config (``model.config``): its number of layers.
        max_tokens: tokens the pool holds, over every sequence (beams and forks share
            blocks until they diverge); 8192 by default. Running out raises
            :class:`~pagedkv.OutOfBlocksError`, changing nothing.
        block_size: tokens per block.
        dtype: the pool's storage format; by default the model's own dtype, so that
            nothing rounds (see :data:`EXACT_FORMATS`).
        backend: a pagedkv CPU backend (``"auto"``: numba if it is there).
        prompt_ids: the prompts' token ids (``input_ids``, ``[B, L]``), to enter the prompts'
            full blocks into the prefix cache, for :meth:`new_cache` to reuse.
        share: another PagedCache whose pool and prefix cache this one uses (its geometry,
            format and backend too; the other arguments but ``prompt_ids`` are then ignored).
        stores: slower tiers behind the prefix cache (:mod:`pagedkv.offload.stores`), shared with other
            processes or later runs: the full blocks of ``prompt_ids`` are loaded from them when
            found, and written to them once computed.
        model_id: required with ``stores``: the model (its identity is then :func:`model_id`'s,
            from its config and weights) or a str naming its weights, so that another model of
            the same geometry sharing a store never gets this one's blocks.

    Every argument is checked here (a ConfigError naming it), before anything is made.

    Prefix caching across calls: ``cache.new_cache(prompt_ids)`` makes a cache on the same
    pool whose rows start with the longest prefix of their prompts (whole blocks, the same
    for every row) already in the pool; ``generate`` then computes only the rest, and
    :attr:`cached_tokens` says how many tokens per row it did not compute.
    """

    def __init__(self, config: Any, *, max_tokens: int = 8192, block_size: int = 16, dtype: str | None = None,
                 backend: str = "auto", prompt_ids: Any = None, share: PagedCache | None = None,
                 stores: Sequence[BlockStore] = (), model_id: Any = None) -> None:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        num_layers = getattr(text, "num_hidden_layers", None)
        if not isinstance(num_layers, int) or num_layers <= 0:
            raise ConfigError("PagedCache needs a model config with num_hidden_layers")
        max_tokens, block_size = positive_int("max_tokens", max_tokens), positive_int("block_size", block_size)
        if dtype is not None:
            get_format(dtype)  # a ConfigError listing the formats for an unknown one
        if not isinstance(backend, str) or resolve_backend(backend) not in ("numpy", "numba"):
            raise ConfigError(f"backend must be 'auto', 'numba' or 'numpy' (the integration runs on the CPU), "
                              f"got {backend!r}")
        if share is not None and not isinstance(share, PagedCache):
            raise ConfigError(f"share must be another PagedCache, got {type(share).__name__}")
        self.stores = tuple(stores)
        self.model_id: str | None = None
        if self.stores:
            if prompt_ids is None:
                raise ConfigError("stores need prompt_ids: a prompt's blocks are found in them, and written to them, "
                                  "by its token ids")
            self.model_id = model_id if isinstance(model_id, str) else model_id_of(model_id)
        if share is not None:  # its pool's geometry, whatever this call's arguments say
            block_size = int(share.block_size)
            max_tokens = int(share.num_blocks) * block_size
        self.num_blocks: int = cdiv(max_tokens, block_size)
        self.block_size: int = block_size
        self.storage_dtype, self.backend_name = dtype, backend
        self.config = config
        # made at the first update, when H, D and the dtype are known (with stores and prompts: now, from the config)
        self.kv: PagedKVCache | None = None
        self.dtype_from_config = False
        self.prompt_ids = None if prompt_ids is None else _rows(prompt_ids)
        self.cached_tokens = 0  #: prompt tokens per row taken from the prefix cache, not computed
        self.seq_ids: list = []  # the pagedkv sequence of each batch row
        self.step: Step | None = None
        self.written: set[int] = set()  # layers that stored this step's tokens
        self.padding: list[int] = []  # attn "pagedkv": padding tokens of each row, not stored
        # attn "pagedkv": the forward pass's rows, new tokens, which are real (None: all) and the mask they were read
        # from, as its first layer saw them (a later layer handed that same mask tensor does not read it again)
        self.pass_tokens: tuple[int, int, np.ndarray | None, Any] = (0, 0, None, None)
        self._buffers: tuple[np.ndarray, np.ndarray] | None = None  # gathered keys and values (see _gathered)
        self.groups = layer_groups(config, text, num_layers, self.num_blocks * block_size)
        windows = {layer: g.sliding_window for g in self.groups or () for layer in g.layers}
        self.paged_layers = [PagedLayer(self, i, windows.get(i)) for i in range(num_layers)]
        super().__init__(layers=list(self.paged_layers))
        if share is not None:
            if share.kv is None:
                raise ArgumentError("the cache to share has not stored anything yet: run generate with it first")
            if len(share.layers) != num_layers:
                raise ConfigError(f"the cache to share has {len(share.layers)} layers, this model {num_layers}")
            self.kv = share.kv
            if self.prompt_ids is not None:
                self._add_sequences(len(self.prompt_ids))
        elif self.stores and self.prompt_ids is not None:  # the stores may hold the prompts' prefixes: the
            self._make_pool(*kv_geometry(text), config_dtype(config))  # pool now, so generate skips them
            self.dtype_from_config = self.storage_dtype is None  # checked against the model's at its first update
            self._add_sequences(len(self.prompt_ids))

    # -- what transformers calls ---------------------------------------------------------------

    def store(self, layer: PagedLayer, key_states: torch.Tensor,
              value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new K/V ``[B, H, T, D]`` and return its keys and values so far."""
        b, h, t, d = key_states.shape
        kv = self._pool_for(key_states)
        if self.step is None or layer.layer_idx in self.written:  # the first layer of a forward pass
            self.begin_pass(b, [t] * b)
        assert self.step is not None
        if self.step.num_new_tokens[0] != t:
            raise ArgumentError(f"layer {layer.layer_idx} stores {t} tokens; this step has "
                                f"{int(self.step.num_new_tokens[0])}")
        kv.write(layer.layer_idx, _to_numpy(key_states), _to_numpy(value_states), self.step)
        self.written.add(layer.layer_idx)
        first = layer.first_kept() // self.block_size  # the blocks the window reaches (all: 0)
        layer.num_tokens += t
        group, plane = kv.config.plane_of(layer.layer_idx)
        tables = np.ascontiguousarray(self.step.groups[group].block_tables[:, first:])
        lens = self.step.context_lens - np.int32(first * self.block_size)
        n = layer.num_tokens - first * self.block_size
        keys, values = self._gathered(b * n, h, d)
        kv.backend.gather(kv.pool, plane, tables, lens, out=(keys, values))

        def dense(x: np.ndarray) -> torch.Tensor:  # [B * n, H, D] as [B, H, n, D] (a strided view, no copy)
            return torch.from_numpy(x).view(b, n, h, d).transpose(1, 2).to(key_states.dtype)
        return dense(keys), dense(values)

    def _gathered(self, rows: int, h: int, d: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``[rows, H, D]`` buffers for one layer's gathered keys and values, reused by every
        layer (the model is done with a layer's keys and values before the next layer stores):
        fresh memory each time would cost its page faults, about as much as the gather itself."""
        if self._buffers is None or self._buffers[0].shape[0] < rows or self._buffers[0].shape[1:] != (h, d):
            capacity = max(rows, 2 * self._buffers[0].shape[0] if self._buffers is not None else 0)
            self._buffers = (np.empty((capacity, h, d), np.float32), np.empty((capacity, h, d), np.float32))
        return self._buffers[0][:rows], self._buffers[1][:rows]

    def begin_pass(self, rows: int, new_tokens: Sequence[int]) -> Step:
        """The first layer of a forward pass: sequences for the ``rows`` batch rows (made, or
        repeated where generate expanded the prompts), and a step of ``new_tokens`` per row."""
        assert self.kv is not None
        if not self.seq_ids:
            self._add_sequences(rows)
        if self.step is None and len(self.seq_ids) != rows and rows % len(self.seq_ids) == 0:
            self.batch_repeat_interleave(rows // len(self.seq_ids))  # generate expanded the prompts (beams)
        if len(self.seq_ids) != rows:
            raise ArgumentError(f"this cache holds {len(self.seq_ids)} sequences; the model passed {rows}")
        self.step, self.written = self.kv.begin_step(self.seq_ids, list(new_tokens)), set()
        return self.step

    def defer(self, layer: PagedLayer, key_states: torch.Tensor,
              value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """With ``attn_implementation="pagedkv"``: hand the new K/V on to the attention function,
        which writes them (skipping padding, which only the mask shows) and attends over the pool."""
        self._pool_for(key_states)
        key, value = key_states.view(key_states.shape), value_states.view(value_states.shape)
        setattr(key, LAYER_TAG, layer)
        setattr(value, LAYER_TAG, layer)
        return key, value

    def _pool_for(self, key_states: torch.Tensor) -> PagedKVCache:
        _, h, _, d = key_states.shape
        if self.kv is None:
            return self._make_pool(h, d, key_states.dtype)
        c = self.kv.config
        if (c.num_kv_heads, c.head_dim) != (h, d):
            raise ArgumentError(f"the model hands K/V of {h} heads of {d}; the pool was made for "
                                f"{c.num_kv_heads} heads of {c.head_dim} (from the model's config)")
        if self.dtype_from_config and EXACT_FORMATS.get(key_states.dtype, "float32") != c.dtype:
            raise ArgumentError(f"the model runs in {key_states.dtype}, but the pool was made for {c.dtype} from its "
                                "config's dtype: pass dtype= to PagedCache")
        return self.kv

    def _make_pool(self, h: int, d: int, dtype: Any) -> PagedKVCache:
        """The pool, for ``h`` K/V heads of ``d`` numbers of torch ``dtype`` (the model's)."""
        fmt = self.storage_dtype or EXACT_FORMATS.get(dtype, "float32")
        config = CacheConfig(num_layers=len(self.layers), num_kv_heads=h, head_dim=d, num_blocks=self.num_blocks,
                             block_size=self.block_size, dtype=fmt)
        if self.groups is not None:  # sliding and full layers: the sliding ones free what leaves the window
            config = replace(config, layer_groups=self.groups)
        self.kv = PagedKVCache(config, self.backend_name,
                               enable_prefix_caching=self.prompt_ids is not None,  # stores come with prompts
                               stores=self.stores, model_id=self.model_id)
        return self.kv

    def _add_sequences(self, rows: int) -> None:
        """One sequence per batch row; with prompts, each starts with its prompt's cached prefix
        (cut to the shortest of the rows', since transformers keeps one length for all)."""
        assert self.kv is not None
        if self.prompt_ids is None:
            self.seq_ids = [self.kv.add_sequence().seq_id for _ in range(rows)]
            return
        if rows % len(self.prompt_ids):
            raise ArgumentError(f"the model passed {rows} rows for {len(self.prompt_ids)} prompts")
        repeat = rows // len(self.prompt_ids)  # num_return_sequences / beams expand the prompts first
        prompts = [p for p in self.prompt_ids for _ in range(repeat)]
        added = [self.kv.add_sequence(prompt_token_ids=p) for p in prompts]
        hit = min(a.num_cached_tokens for a in added)
        for i, a in enumerate(added):
            if a.num_cached_tokens > hit:  # start again from the common length (a sliding layer
                self.kv.free(a.seq_id)     # may hold none of the blocks a truncation would need)
                added[i] = self.kv.add_sequence(prompt_token_ids=prompts[i], max_cached_tokens=hit)
        self.seq_ids, self.cached_tokens = [a.seq_id for a in added], hit
        for layer in self.paged_layers:
            layer.num_tokens = hit

    def new_cache(self, prompt_ids: Any) -> PagedCache:
        """A cache for the next ``generate`` on the same pool and prefix cache: its rows start
        with the cached prefixes of ``prompt_ids`` (see :attr:`cached_tokens`). Call
        :meth:`reset` on a cache you are done with: its blocks go back to the pool (its
        prompts' full blocks stay cached)."""
        return PagedCache(self.config, prompt_ids=prompt_ids, share=self)

    def _new_pass(self) -> None:
        """Sequences changed: the next update begins a new step."""
        self.step, self.written = None, set()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i continues old row ``beam_idx[i]`` (forks share blocks, no copy)."""
        self._reselect([int(i) for i in beam_idx])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._reselect([int(i) for i in indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._reselect([i for i in range(len(self.seq_ids)) for _ in range(repeats)])

    def _reselect(self, rows: Sequence[int]) -> None:
        if list(rows) == list(range(len(self.seq_ids))) or self.kv is None or not self.seq_ids:
            return
        if self.padding:
            self.padding = [self.padding[j] for j in rows]
        old, kept, new = self.seq_ids, set(), []
        for j in rows:
            if j in kept:  # another row continues it too: a fork, sharing every block
                new.append(self.kv.fork(old[j]))
            else:
                kept.add(j)
                new.append(old[j])
        for j, seq in enumerate(old):
            if j not in kept:
                self.kv.free(seq)
        self.seq_ids = new
        self._new_pass()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens of every row, as transformers' caches do (5.24
        on): ``tokens_to_remove`` is a negative count, 0 does nothing (``generate`` calls ``crop(0)``
        after each step of prompt lookup), and a positive value, the old "keep this many", raises
        ValueError as transformers' own layers do."""
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, (int, np.integer)):
            raise ArgumentError(f"crop takes a negative int, the tokens to remove; got {tokens_to_remove!r}")
        if tokens_to_remove > 0:
            raise ValueError(f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                             "Please use a negative integer to remove that number of tokens from the cache instead.")
        length = self.get_seq_length()
        keep = max(length + int(tokens_to_remove), 0)
        if keep == length or self.kv is None:
            return
        for row, seq in enumerate(self.seq_ids):
            self.kv.truncate(seq, max(keep - (self.padding[row] if self.padding else 0), 0))
        for layer in self.paged_layers:
            layer.num_tokens = max(keep, 0)
        self._new_pass()

    def reset(self) -> None:
        """Forget every sequence (their blocks go back to the pool)."""
        if self.kv is not None:
            for seq in self.seq_ids:
                self.kv.free(seq)
        self.seq_ids, self.padding = [], []
        for layer in self.layers:
            layer.reset()
        self._new_pass()

    # -- what a user reads ---------------------------------------------------------------------

    def memory(self) -> dict[str, int]:
        """``pool_bytes`` (the whole pool), ``used_bytes`` (blocks in use now) and ``dense_bytes``
        (what a dense cache of the same rows and length, in the same format, would hold)."""
        if self.kv is None:
            return {"pool_bytes": 0, "used_bytes": 0, "dense_bytes": 0}
        c = self.kv.config
        per_block = c.memory_bytes // c.num_blocks  # every plane of a block (a group's layers)
        used = self.kv.stats()["blocks_used"]
        dense = len(self.seq_ids) * self.get_seq_length() * c.bytes_per_token
        return {"pool_bytes": c.memory_bytes, "used_bytes": int(used) * per_block, "dense_bytes": int(dense)}
