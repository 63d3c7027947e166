"""Choosing the next token from logits: greedy, or a draw after the same warpers, in the same order,
as transformers' sampling (temperature, then top-k, then top-p). Used where tunesmith decodes step by
step itself (logit fusion, the server) rather than through transformers' `generate`."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def next_tokens(logits: torch.Tensor, temperature: float | None, top_p: float | None = None,
                top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy (temperature None or 0) or sampled next token per row from logits (B, V).

    top-p keeps the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    if not temperature:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        drop = sorted_scores.softmax(-1).cumsum(-1) <= (1 - top_p)
        drop[..., -1:] = False  # keep at least the most likely token
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(F.softmax(scores, -1), num_samples=1, generator=generator)[:, 0]
