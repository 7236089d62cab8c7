"""Greedy and seeded sampling of a step's logits rows."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from .request import Request


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the tokens before it already cover top_p (the first always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, reqs: Sequence[Request]) -> Tuple[List[int], List[float]]:
    """One token per row of ``logits`` [n, vocab] (float32) for ``reqs[i]``, and the top-1 minus
    top-2 logit margin of each row (how close a greedy choice was to a tie).

    Greedy rows take the argmax (the first index on ties, as torch and Hugging Face do). Sampled rows
    draw from the request's own generator, so a seeded request's tokens do not depend on the batch.
    """
    logits = logits.float()
    top2 = torch.topk(logits, 2, dim=-1).values if logits.shape[-1] > 1 else torch.cat([logits, logits], -1)
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    tokens = torch.argmax(logits, dim=-1).tolist()
    for i, req in enumerate(reqs):
        p = req.params
        if p.greedy:
            continue
        row = _filter(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1).cpu()
        tokens[i] = int(torch.multinomial(probs, 1, generator=req.generator).item())
    return tokens, margins
