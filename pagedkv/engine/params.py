"""What a request asks for and what it gets back: :class:`SamplingParams`, :class:`RequestOutput`.

The names are vLLM's where they fit (``SamplingParams(max_tokens=..., temperature=...)``,
``output.outputs[0].token_ids``), so a program written against vLLM's offline API reads the
same here. Plain Python: importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import ArgumentError

#: why a request finished: its max_tokens or the model's length ("length"), a stop or end-of-sequence
#: token ("stop"), abort() ("abort"), or a request that can never run here ("error")
FINISH_REASONS = ("length", "stop", "abort", "error")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each request's tokens.

    Args:
        max_tokens: new tokens at most (also bounded by the model's and the pool's length).
        temperature: 0 picks the most likely token (greedy); above 0 samples from the
            distribution sharpened (below 1) or flattened (above 1) by it.
        top_k: sample among the k most likely tokens only (0: all).
        top_p: sample among the most likely tokens whose probabilities add up to ``top_p``
            (1: all).
        seed: a seed of the request's own: its tokens are then the same whatever else runs in
            the batch and in whatever order (None: drawn from torch's global generator).
        stop_token_ids: tokens that end the request (kept in its output, as vLLM does).
        ignore_eos: go on past the tokenizer's end-of-sequence token (benchmarks).
        logprobs: with each new token, the log-probabilities (of the model's own distribution,
            before temperature, top-k and top-p) of that token and of the ``logprobs`` most
            likely ones (None: none; 0: the chosen token's alone).
        n: completions of the one prompt. The prompt is computed once; then its sequence is
            forked, every completion sharing the prompt's blocks (copy-on-write), each drawing
            its own first token from the prompt's last logits. With a seed, completion ``i``
            samples with ``seed + i`` (as vLLM does).

    Raises ArgumentError for a value out of range, when made.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = field(default=())
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        def integer(name: str, value: object, low: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ArgumentError(f"{name} must be an integer of at least {low}, got {value!r}")

        integer("max_tokens", self.max_tokens, 1)
        integer("top_k", self.top_k, 0)
        integer("n", self.n, 1)
        if self.logprobs is not None:
            integer("logprobs", self.logprobs, 0)
        if self.seed is not None:
            integer("seed", self.seed, 0)
        for name, value, low, high in (("temperature", self.temperature, 0.0, math.inf),
                                       ("top_p", self.top_p, 0.0, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low <= value <= high or (name == "top_p" and value == 0):
                interval = f"in (0, {high}]" if name == "top_p" else "finite and >= 0"
                raise ArgumentError(f"{name} must be a number {interval}, got {value!r}")
        stops = tuple(self.stop_token_ids)
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stops):
            raise ArgumentError(f"stop_token_ids must be token ids (integers >= 0), got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", stops)
        if not isinstance(self.ignore_eos, bool):
            raise ArgumentError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        """Whether each token is the most likely one."""
        return self.temperature == 0


@dataclass
class CompletionOutput:
    """One completion of a request (vLLM's name).

    Attributes:
        index: which of the request's ``n`` completions (0 to n - 1).
        token_ids: the new tokens so far.
        text: their text, with a tokenizer (None without one).
        finish_reason: one of :data:`FINISH_REASONS`, None while running.
        error: what went wrong, with ``finish_reason == "error"``.
        logprobs: with ``SamplingParams(logprobs=k)``, for each new token a dict of token id to
            log-probability: the token itself and the ``k`` most likely (None otherwise).
        new_token_ids: from :meth:`pagedkv.LLM.step`: the tokens this step produced.
    """

    index: int
    token_ids: list[int]
    text: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[dict[int, float]] | None = None
    new_token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestOutput:
    """A request's state, as :meth:`pagedkv.LLM.generate` returns it and :meth:`pagedkv.LLM.step`
    reports it.

    Attributes:
        request_id: the request's id.
        prompt: the prompt's text, if it was given as text.
        prompt_token_ids: the prompt's tokens.
        outputs: one :class:`CompletionOutput` per completion (``SamplingParams.n``), by index.
        finished: whether the request is over (every completion).
        num_cached_tokens: prompt tokens served from the prefix cache (or a store), not computed.
        time_to_first_token: seconds from the request's arrival to its first new token (None
            before it).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    time_to_first_token: float | None = None

    @property
    def new_token_ids(self) -> list[int]:
        """From :meth:`pagedkv.LLM.step`: the tokens the first completion got in this step."""
        return self.outputs[0].new_token_ids
