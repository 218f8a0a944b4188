"""Which tokens of which requests run in the next step: :class:`Scheduler`.

Every step packs, under a token budget (``max_num_batched_tokens``), the running requests'
next tokens (one each when decoding, the next chunk of a prompt still being computed) and
then chunks of waiting prompts, first come first served, as long as the pool has blocks for
them (chunked prefill: a long prompt never holds the decoding requests up for more than one
budget's worth of tokens). A waiting request starts from its longest cached prefix (the pool's
prefix cache and the stores behind it). When the pool cannot hold the running requests' next
tokens, the newest running request is preempted: its blocks go back (its full ones stay in
the prefix cache, so that most of it is found again) and it waits at the head of the queue
to be recomputed. The oldest request always runs, so nothing starves.

Plain Python over a :class:`~pagedkv.PagedKVCache`: no model, no torch.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..cache import PagedKVCache
from ..errors import ArgumentError
from .params import SamplingParams


@dataclass(eq=False)
class Request:
    """One request, from arrival to finish.

    ``num_computed`` tokens of ``prompt_token_ids + output_token_ids`` have their K/V in the
    cache (sequence ``seq_id`` while it runs); the rest are computed by the next steps, the
    last of them sampling the next token.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_len: int  #: the most tokens (prompt and output) it may reach: the model's and the pool's bound
    cache_salt: Hashable = None
    arrival: float = field(default_factory=time.perf_counter)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    seq_id: Hashable = None
    num_cached_tokens: int | None = None  #: prompt tokens served from the cache at its first start
    first_token_time: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    preemptions: int = 0
    generator: Any = None  #: its own torch generator, for a seeded request (the sampler makes it)
    logprobs: list[dict[int, float]] = field(default_factory=list)  #: per new token, with params.logprobs
    reported: int = 0  #: output tokens already handed out by LLM.step
    index: int = 0  #: which completion of its request (SamplingParams.n)
    forks: list[Request] = field(default_factory=list)  #: completions 1..n-1, once the prompt is computed

    @property
    def token_ids(self) -> list[int]:
        """Prompt and output so far (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        """Tokens of prompt and output so far."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def next_tokens(self, n: int) -> list[int]:
        """The ``n`` tokens after the ``num_computed`` ones, without copying the whole sequence (a
        decode step takes one token of a long one)."""
        start, prompt = self.num_computed, len(self.prompt_token_ids)
        if start >= prompt:
            return self.output_token_ids[start - prompt:start - prompt + n]
        return (self.prompt_token_ids[start:start + n] + self.output_token_ids[:max(0, start + n - prompt)])

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Batch:
    """One step's work: request i computes ``token_ids[i]`` (its positions ``num_computed`` on);
    ``samples[i]`` says whether that chunk ends its known tokens, so that its last position
    samples the next token."""

    requests: list[Request]
    token_ids: list[list[int]]
    samples: list[bool]

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


class Scheduler:
    """Admission, chunked prefill and preemption over one cache (see the module docstring).

    Args:
        cache: the pool the requests share.
        max_num_seqs: requests running at once, at most.
        max_num_batched_tokens: tokens one step computes, at most (at least ``max_num_seqs``,
            so that every running request can decode in every step).
    """

    def __init__(self, cache: PagedKVCache, *, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        if max_num_batched_tokens < max_num_seqs:
            raise ArgumentError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be at least max_num_seqs "
                                f"({max_num_seqs}): every running request decodes a token in every step")
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in the order they started: the last is preempted first
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        """Queue a request (it waits for the next :meth:`schedule`)."""
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ------------------------------------------------------------------------------

    def schedule(self) -> Batch:
        """The next step's batch (empty when nothing can run). The cache has room for it: the
        caller's ``begin_step`` with it cannot run out of blocks."""
        budget = self.max_num_batched_tokens
        chosen: list[tuple[Request, int]] = []
        for r in list(self.running):  # oldest first
            n = min(r.num_tokens - r.num_computed, budget)
            if n > 0:
                chosen.append((r, n))
                budget -= n
        while chosen and not self._fits(chosen):  # the pool is full: the newest running request yields
            victim = self.running[-1]
            if victim is self.running[0]:  # alone and still too big: it can never run here
                self._finish_error(victim, "the KV pool cannot hold this request's next tokens even alone")
                chosen = []
                break
            self._preempt(victim)
            chosen = [(r, n) for r, n in chosen if r is not victim]
            budget = self.max_num_batched_tokens - sum(n for _, n in chosen)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            r = self.waiting[0]
            started = self._start(r, chosen, budget)
            if started is None:
                break  # not enough blocks now: it waits, first in line, for running requests to finish
            self.waiting.popleft()
            self.running.append(r)
            chosen.append((r, started))
            budget -= started
        tokens = [r.next_tokens(n) for r, n in chosen]
        samples = [r.num_computed + n == r.num_tokens for r, n in chosen]
        return Batch([r for r, _ in chosen], tokens, samples)

    def _fits(self, chosen: Sequence[tuple[Request, int]]) -> bool:
        return self.cache.can_step([r.seq_id for r, _ in chosen], [n for _, n in chosen])

    def _start(self, r: Request, chosen: list[tuple[Request, int]], budget: int) -> int | None:
        """Give ``r`` its sequence, starting from its cached prefix; the tokens it computes this
        step, or None (and nothing kept) when the pool cannot take them now."""
        tokens = r.token_ids
        added = self.cache.add_sequence(prompt_token_ids=tokens, cache_salt=r.cache_salt)
        cached = added.num_cached_tokens  # never the last token's block: its logits pick the next token
        n = min(len(tokens) - cached, budget)
        if not self.cache.can_step([s.seq_id for s, _ in chosen] + [added.seq_id], [m for _, m in chosen] + [n]):
            self.cache.free(added.seq_id)
            return None
        r.seq_id, r.num_computed = added.seq_id, cached
        if r.num_cached_tokens is None:
            r.num_cached_tokens = min(cached, len(r.prompt_token_ids))
        return n

    def fork(self, parent: Request, index: int, num_computed: int) -> Request:
        """Completion ``index`` of ``parent``'s request: a running request on a fork of its
        sequence (sharing every block, copy-on-write), whose ``num_computed`` tokens are in
        the cache; it samples its first token from the parent's logits (the caller's part)."""
        p = parent.params
        params = replace(p, n=1, seed=None if p.seed is None else p.seed + index)
        child = Request(parent.request_id, parent.prompt, parent.prompt_token_ids, params, parent.max_len,
                        parent.cache_salt, arrival=parent.arrival, num_computed=num_computed,
                        num_cached_tokens=parent.num_cached_tokens, index=index)
        child.seq_id = self.cache.fork(parent.seq_id)
        self.running.append(child)
        parent.forks.append(child)
        return child

    def _preempt(self, r: Request) -> None:
        """Free ``r``'s blocks and put it first in line, to be recomputed from its tokens so far."""
        self.running.remove(r)
        self.cache.free(r.seq_id)
        r.seq_id, r.num_computed = None, 0
        r.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(r)

    def _finish_error(self, r: Request, message: str) -> None:
        self.finish(r, "error")
        r.error = message

    # -- after the step ------------------------------------------------------------------------

    def advance(self, batch: Batch, sampled: dict[int, int], eos_token_id: int | None,
                logprobs: dict[int, dict[int, float]] | None = None) -> None:
        """Account for a step that ran: each request's chunk is in the cache, and request
        ``batch.requests[i]`` got token ``sampled[i]`` (with ``logprobs[i]``, if it asked for
        them); finish the requests that stop."""
        now = time.perf_counter()
        for i, (r, tokens) in enumerate(zip(batch.requests, batch.token_ids, strict=True)):
            r.num_computed += len(tokens)
            if i not in sampled:
                continue
            token = sampled[i]
            r.output_token_ids.append(token)
            if logprobs is not None and i in logprobs:
                r.logprobs.append(logprobs[i])
            if r.first_token_time is None:
                r.first_token_time = now
            p = r.params
            if token in p.stop_token_ids or (token == eos_token_id and not p.ignore_eos):
                self.finish(r, "stop")
            elif len(r.output_token_ids) >= p.max_tokens or r.num_tokens >= r.max_len:
                self.finish(r, "length")

    def finish(self, r: Request, reason: str) -> None:
        """End ``r`` (running or waiting) with ``reason``; its blocks go back. (Its forks, the
        request's other completions, go on: each finishes of its own.)"""
        if r in self.running:
            self.running.remove(r)
        if r in self.waiting:
            self.waiting.remove(r)
        if r.seq_id is not None:
            self.cache.free(r.seq_id)
            r.seq_id = None
        r.finish_reason = reason
