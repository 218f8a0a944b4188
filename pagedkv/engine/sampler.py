"""The next token of each request from its logits, as transformers' ``generate`` picks it.

Greedy requests take the most likely token. Sampled ones apply, in transformers' order,
temperature, top-k and top-p to their float32 logits and draw from the softmax; a request
with a seed draws from a generator of its own, so that its tokens do not depend on what else
runs in the batch or in which order.
"""

from __future__ import annotations

import torch

from .scheduler import Request


def _filtered(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` (one row) with the tokens outside top-k and top-p set to -inf, as transformers'
    ``TopKLogitsWarper`` and ``TopPLogitsWarper`` do (the most likely token always kept)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[-1] = False
        logits = logits.masked_fill(remove.scatter(0, order, remove), -float("inf"))
    return logits


def logprobs_of(logits: torch.Tensor, token: int, top: int) -> dict[int, float]:
    """Log-probabilities (of ``logits``' own distribution) of ``token`` and the ``top`` most likely."""
    lp = logits.log_softmax(dim=-1)
    out = {int(t): float(v) for v, t in zip(*torch.topk(lp, min(top, lp.shape[-1])), strict=True)} if top else {}
    out[token] = float(lp[token])
    return out


def sample(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """The next token of each request; row i of ``logits [S, vocab]`` (float32) is request i's."""
    tokens = []
    greedy = logits.argmax(dim=-1).tolist()
    for i, r in enumerate(requests):
        p = r.params
        if p.greedy:
            tokens.append(int(greedy[i]))
            continue
        row = _filtered(logits[i] / p.temperature, p.top_k, p.top_p)
        if p.seed is not None and r.generator is None:
            r.generator = torch.Generator().manual_seed(p.seed)
        probs = row.softmax(dim=-1)
        tokens.append(int(torch.multinomial(probs, 1, generator=r.generator).item()))
    return tokens
