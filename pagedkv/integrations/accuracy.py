"""What a KV storage format costs a model: :func:`accuracy_report` and ``pagedkv accuracy``.

A text (token ids; random ones when none is given) runs teacher-forced through a transformers
model once with a float32 pool (the baseline) and once with a pool of each storage format,
every position's attention reading the K/V back from the pool as the format stored them. Per
format, against the baseline:

- the KL divergence of each position's next-token distribution (mean and max, in nats);
- top-1 agreement (the most likely next token is the same), and the text's perplexity;
- per layer, the error of the stored K and V: each layer's float32 K/V of the baseline run
  stored in the format and read back (relative RMS, and the largest error relative to the
  layer's largest magnitude), and whether every element is within the format's rounding
  (round to nearest: ``|stored - x| <= u * max(|x|, scale * smallest normal)`` for the
  minifloats, ``u * max|row|`` for int8, ``u`` the unit roundoff; values past the format's
  range saturate and are counted apart);
- optionally, greedy agreement: of ``generate`` greedy tokens from the text's start, how many
  come out the same before the first difference.

Besides pagedkv's formats, a report compares caches written in another engine's convention
(``codecs``): :data:`CROSS_ENGINE_CODECS` has vLLM's fp8_e4m3 as its CPU kernels write it
(a per-tensor scale, 1.0 unless calibrated, and an encoder that truncates toward zero where
pagedkv's rounds to nearest even), emulated in numpy. A codec row runs the model over a
transformers ``DynamicCache`` whose stored K/V are the codec's round trip; the test suite
checks that this emulation, given pagedkv's own codec, gives the pool's logits exactly.

Needs the ``hf`` extra (transformers and torch), CPU.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import torch

from ..backends import get_backend
from ..errors import ConfigError
from ..geometry.config import CacheConfig, positive_int
from ..geometry.formats import FORMATS, decode, encode, get_format
from ..memory.pool import KVPool
from .hf_identity import kv_geometry
from .hf_layers import layer_groups
from .transformers import PagedCache

#: a codec: float32 K or V ``[T, H, D]`` in, the values a cache would hand back out
RoundTrip = Callable[[np.ndarray], np.ndarray]


def truncating_fp8_e4m3(x: np.ndarray) -> np.ndarray:
    """fp8_e4m3 (the ``fn`` variant, finite to +-448) as an encoder that truncates toward zero
    writes it, read back as float32: magnitudes saturate at 448, then keep 3 bits of mantissa
    (subnormals: multiples of 2**-9), dropping the rest; NaN stays NaN."""
    x = np.clip(np.asarray(x, np.float64), -448.0, 448.0)
    a = np.abs(x)
    exponent = np.floor(np.log2(np.maximum(a, 2.0 ** -6), where=~np.isnan(a), out=np.zeros_like(a)))
    step = np.exp2(exponent - 3)
    return (np.sign(x) * np.floor(a / step) * step).astype(np.float32)


#: caches written in other engines' conventions, by name: (the pagedkv format whose rounding
#: bound they are held to, their round trip)
CROSS_ENGINE_CODECS: dict[str, tuple[str, RoundTrip]] = {
    "fp8_e4m3, vLLM's encoder (truncating)": ("fp8_e4m3", truncating_fp8_e4m3),
}


def format_round_trip(fmt_name: str) -> RoundTrip:
    """pagedkv's own codec of a per-tensor or unscaled format as a round trip (scale 1.0)."""
    fmt = get_format(fmt_name)
    if fmt.scale == "token":
        raise ConfigError(f"{fmt.name} scales each token and head: its round trip goes through a pool")

    def trip(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        return x.copy() if fmt.is_float32 else decode(fmt, encode(fmt, x))

    return trip


@dataclass
class LayerError:
    """The stored K and V of one layer, against the float32 ones.

    Attributes:
        layer: the layer.
        k_rel_rms, v_rel_rms: RMS of the error over RMS of the values.
        k_max_rel, v_max_rel: the largest error over the layer's largest magnitude.
    """

    layer: int
    k_rel_rms: float
    v_rel_rms: float
    k_max_rel: float
    v_max_rel: float


@dataclass
class FormatAccuracy:
    """One format's row of an :class:`AccuracyReport` (see the module docstring).

    Attributes:
        name: the format (or codec) measured.
        scales: how its numbers are scaled (``"none"``, ``"per-tensor 1.0"``, ``"per token and head"``).
        kl_mean, kl_max: KL divergence of the next-token distributions from the baseline's, in nats.
        top1: the share of positions whose most likely next token is the baseline's.
        perplexity: the text's perplexity with this format.
        layers: per layer, the stored K/V's error.
        within_rounding: whether every stored number is within its format's rounding of round to
            nearest (saturated ones aside).
        saturated: stored numbers past the format's range (clamped to its largest).
        greedy_match: with ``generate``, greedy tokens equal to the baseline's before the first
            difference (None without).
    """

    name: str
    scales: str
    kl_mean: float
    kl_max: float
    top1: float
    perplexity: float
    layers: list[LayerError]
    within_rounding: bool
    saturated: int
    greedy_match: int | None = None


@dataclass
class AccuracyReport:
    """What each storage format costs a model on one text (see the module docstring).

    Attributes:
        model: the model's name (its config's ``_name_or_path`` or class).
        num_tokens: tokens of the text.
        text: where the text came from.
        block_size: the pool's tokens per block.
        perplexity: the baseline's (float32 pool) perplexity.
        generate: greedy tokens compared per format (0: none).
        rows: one per format, the baseline's (float32) first.
    """

    model: str
    num_tokens: int
    text: str
    block_size: int
    perplexity: float
    generate: int
    rows: list[FormatAccuracy] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def table(self) -> str:
        """The report as a text table (what ``pagedkv accuracy`` prints)."""
        lines = [f"{self.model}: {self.num_tokens} tokens ({self.text}), block size {self.block_size}, "
                 f"float32 pool perplexity {self.perplexity:.4g}", ""]
        head = f"{'format':<40} {'scales':<19} {'KL mean':>9} {'KL max':>9} {'top-1':>7} {'perplexity':>10} " \
               f"{'K err':>8} {'V err':>8}  rounding"
        if self.generate:
            head += f"  greedy /{self.generate}"
        lines += [head, "-" * len(head)]
        for r in self.rows:
            k = max((e.k_rel_rms for e in r.layers), default=0.0)
            v = max((e.v_rel_rms for e in r.layers), default=0.0)
            rounding = "ok" if r.within_rounding else "EXCEEDED"
            if r.saturated:
                rounding += f" ({r.saturated} saturated)"
            line = f"{r.name:<40} {r.scales:<19} {r.kl_mean:>9.2e} {r.kl_max:>9.2e} {r.top1:>7.1%} " \
                   f"{r.perplexity:>10.4g} {k:>8.1e} {v:>8.1e}  {rounding}"
            if r.greedy_match is not None:
                line += f"  {r.greedy_match:>4}"
            lines.append(line)
        lines += ["", "KL: nats, of each position's next-token distribution from the float32 pool's. K err, V err: "
                  "relative RMS error of the stored K/V, its worst layer. rounding: every stored number within "
                  "round-to-nearest's error for its format."]
        return "\n".join(lines)

    def plot(self, path: str) -> None:
        """KL divergence per format and the stored K/V error per layer, drawn to ``path`` (needs
        matplotlib)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        rows = self.rows[1:]
        left.barh([r.name for r in rows], [max(r.kl_mean, 1e-12) for r in rows], color="tab:blue")
        left.set_xscale("log")
        left.set_xlabel("mean KL divergence from the float32 pool (nats)")
        left.invert_yaxis()
        for r in rows:
            right.plot([e.layer for e in r.layers], [max(e.k_rel_rms, 1e-12) for e in r.layers], marker="o",
                       label=f"{r.name} K")
        right.set_yscale("log")
        right.set_xlabel("layer")
        right.set_ylabel("relative RMS error of the stored K")
        right.legend(fontsize=7)
        fig.suptitle(f"{self.model}: {self.num_tokens} tokens, block size {self.block_size}")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _round_trip_cache(model: Any, codec: RoundTrip) -> Any:
    """A transformers ``DynamicCache`` whose stored K/V are ``codec``'s round trip of what the
    model hands it."""
    import transformers

    class RoundTripCache(transformers.DynamicCache):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            def stored(x: torch.Tensor) -> torch.Tensor:
                b, h, t, d = x.shape  # the codec sees [T, H, D] rows, as a pool stores them
                rows = x.detach().float().permute(0, 2, 1, 3).reshape(b * t, h, d).numpy()
                back = torch.from_numpy(np.ascontiguousarray(codec(rows)))
                return back.view(b, t, h, d).permute(0, 2, 1, 3).to(x.dtype)

            return super().update(stored(key_states), stored(value_states), layer_idx, *args, **kwargs)

    return RoundTripCache(config=model.config)


def _logits(model: Any, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, cache=cache, use_cache=True).logits[0].double()


def _greedy(model: Any, prompt: torch.Tensor, n: int, make_cache: Callable[[], Any]) -> list[int]:
    cache, ids, tokens = make_cache(), prompt, []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]
            tokens.append(int(logits.float().argmax()))
            ids = torch.tensor([[tokens[-1]]])
    return tokens


def _kv_of(model: Any, ids: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each layer's float32 K and V ``[T, H, D]`` of the text (the model's own cache, unrounded)."""
    import transformers

    cache = transformers.DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids, cache=cache, use_cache=True)
    out = []
    for layer in cast(Any, cache).layers:
        k, v = (x[0].float().permute(1, 0, 2).contiguous().numpy() for x in (layer.keys, layer.values))
        out.append((k, v))
    return out


def _pool_round_trip(fmt_name: str, block_size: int) -> RoundTrip:
    """Store ``[T, H, D]`` rows in a one-layer pool of the format and read them back (int8's
    per-token scales included), through pagedkv's routines."""
    backend = get_backend("auto")

    def trip(x: np.ndarray) -> np.ndarray:
        t, h, d = x.shape
        pool = KVPool(CacheConfig(num_layers=1, num_kv_heads=h, head_dim=d, block_size=block_size,
                                  num_blocks=max(1, -(-t // block_size)), dtype=fmt_name))
        slots = np.arange(t, dtype=np.int64)
        backend.write(pool, 0, x, x, slots)
        return np.asarray(backend.read(pool, 0, slots)[0], np.float32)

    return trip


def _bound_check(fmt_name: str, x: np.ndarray, stored: np.ndarray) -> tuple[bool, int]:
    """Whether every element of ``stored`` is within round-to-nearest's error of ``x`` in the
    format (see the module docstring), and how many saturated."""
    fmt = get_format(fmt_name)
    x64, s64 = x.astype(np.float64), stored.astype(np.float64)
    err = np.abs(s64 - x64)
    finite = np.isfinite(x64)
    if fmt.is_float32:
        return bool(np.all(err[finite] == 0)), 0
    if fmt.codec is None:  # int8: half a step of the row's scale, absmax / 127
        u = 1 / 254
        row = np.abs(np.where(finite, x64, 0)).max(axis=-1, keepdims=True)
        return bool(np.all(err <= u * row * (1 + 1e-5) + 1e-30)), 0
    c = fmt.codec
    u = 2.0 ** -(c.man_bits + 1)
    smallest_normal = 2.0 ** (1 - c.bias)
    top = 2 ** c.exp_bits - (1 if c.finite_only else 2) - c.bias
    largest = (2.0 - 2.0 ** ((1 if c.finite_only else 0) - c.man_bits)) * 2.0 ** top
    a = np.abs(x64)
    saturated = finite & (a > largest * (1 + u))  # past the range (and past rounding to its largest)
    ok = ~finite | saturated | (err <= u * np.maximum(a, smallest_normal) * (1 + 1e-6))
    return bool(ok.all()), int(saturated.sum())


def _errors(layer: int, k: np.ndarray, v: np.ndarray, k_back: np.ndarray, v_back: np.ndarray) -> LayerError:
    def rel_rms(x: np.ndarray, y: np.ndarray) -> float:
        scale = math.sqrt(float(np.mean(x.astype(np.float64) ** 2))) or 1.0
        return math.sqrt(float(np.mean((y.astype(np.float64) - x) ** 2))) / scale

    def max_rel(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.abs(y.astype(np.float64) - x).max(initial=0.0)) / (float(np.abs(x).max(initial=0.0)) or 1.0)

    return LayerError(layer, rel_rms(k, k_back), rel_rms(v, v_back), max_rel(k, k_back), max_rel(v, v_back))


def _scales_of(fmt_name: str) -> str:
    return {"none": "none", "tensor": "per-tensor 1.0", "token": "per token and head"}[get_format(fmt_name).scale]


def accuracy_report(model: Any, token_ids: Sequence[int] | None = None, *, num_tokens: int = 256,
                    formats: Sequence[str] | None = None, block_size: int = 16, generate: int = 0, seed: int = 0,
                    codecs: Mapping[str, tuple[str, RoundTrip]] | None = None,
                    text: str | None = None) -> AccuracyReport:
    """Measure what each KV storage format costs ``model`` on a text (see the module docstring).

    Args:
        model: a transformers causal LM (loaded; CPU).
        token_ids: the text, as token ids (None: ``num_tokens`` random ids, drawn with ``seed``).
        num_tokens: the random text's length.
        formats: pagedkv storage formats to measure (None: all but float32, the baseline).
        block_size: the pool's tokens per block.
        generate: greedy tokens to compare per format, from the text's first 32 tokens (0: none).
        codecs: other caches to measure, by name: (the pagedkv format whose rounding they are
            held to, a round trip of float32 ``[T, H, D]`` rows); None:
            :data:`CROSS_ENGINE_CODECS`.
        text: where the text came from, for the report (default: "random tokens, seed S" or
            "given tokens").

    Returns an :class:`AccuracyReport`, the float32 baseline first.
    """
    block_size = positive_int("block_size", block_size)
    if generate < 0:
        raise ConfigError(f"generate must be 0 or more, got {generate!r}")
    text_config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") \
        else model.config
    vocab = int(text_config.vocab_size)
    if token_ids is None:
        num_tokens = positive_int("num_tokens", num_tokens)
        ids_list = np.random.default_rng(seed).integers(0, vocab, num_tokens).tolist()
        text = text or f"random tokens, seed {seed}"
    else:
        ids_list = [int(t) for t in token_ids]
        if len(ids_list) < 2 or min(ids_list) < 0 or max(ids_list) >= vocab:
            raise ConfigError(f"token_ids must be at least 2 ids below the vocabulary's {vocab}")
        text = text or "given tokens"
    names = [f for f in (formats if formats is not None else FORMATS) if get_format(f).name != "float32"]
    for f in names:
        get_format(f)
    codecs = dict(CROSS_ENGINE_CODECS if codecs is None else codecs)
    kv_geometry(text_config)  # a ConfigError for a model without the K/V geometry a pool needs
    ids = torch.tensor([ids_list])
    t = len(ids_list)
    targets = ids[0, 1:]
    prompt = ids[:, :min(32, t)]

    need = t + generate + block_size
    groups = layer_groups(model.config, text_config, int(text_config.num_hidden_layers), need)
    max_tokens = need * (len(groups) if groups else 1)  # each layer group holds the text in blocks of its own

    def pool_cache(fmt_name: str) -> Callable[[], Any]:
        return lambda: PagedCache(model.config, max_tokens=max_tokens, block_size=block_size, dtype=fmt_name)

    base_logits = _logits(model, ids, pool_cache("float32")())
    base_logp = torch.log_softmax(base_logits, dim=-1)
    base_top = base_logits.argmax(dim=-1)
    base_greedy = _greedy(model, prompt, generate, pool_cache("float32")) if generate else None
    kv = _kv_of(model, ids)

    def row(name: str, scales: str, bound_format: str, logits: torch.Tensor, trip: RoundTrip,
            make_cache: Callable[[], Any]) -> FormatAccuracy:
        logp = torch.log_softmax(logits, dim=-1)
        kl = (base_logp.exp() * (base_logp - logp)).sum(dim=-1).clamp(min=0.0)
        nll = -logp[:-1].gather(1, targets[:, None]).squeeze(1)
        layers, within, saturated = [], True, 0
        for i, (k, v) in enumerate(kv):
            k_back, v_back = trip(k), trip(v)
            layers.append(_errors(i, k, v, k_back, v_back))
            for x, back in ((k, k_back), (v, v_back)):
                ok, sat = _bound_check(bound_format, x, back)
                within, saturated = within and ok, saturated + sat
        match = None
        if base_greedy is not None:
            tokens = _greedy(model, prompt, generate, make_cache)
            match = next((j for j, (a, b) in enumerate(zip(tokens, base_greedy, strict=True)) if a != b), generate)
        return FormatAccuracy(name, scales, float(kl.mean()), float(kl.max()), float((logits.argmax(-1) == base_top)
                                                                                      .double().mean()),
                              float(nll.mean().exp()), layers, within, saturated, match)

    report = AccuracyReport(getattr(model.config, "_name_or_path", "") or type(model).__name__, t, text, block_size,
                            float((-base_logp[:-1].gather(1, targets[:, None])).mean().exp()), generate)
    report.rows.append(row("float32", "none", "float32", base_logits, _pool_round_trip("float32", block_size),
                           pool_cache("float32")))
    for f in names:
        report.rows.append(row(get_format(f).name, _scales_of(f), f, _logits(model, ids, pool_cache(f)()),
                               _pool_round_trip(f, block_size), pool_cache(f)))
    for name, (bound_format, trip) in codecs.items():
        get_format(bound_format)
        make = functools.partial(_round_trip_cache, model, trip)
        report.rows.append(row(name, _scales_of(bound_format), bound_format, _logits(model, ids, make()), trip, make))
    return report
