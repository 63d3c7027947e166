"""Attention masks for packed rows.

Restarting position ids alone does not isolate packed samples in transformers' sdpa/eager paths;
a 4D block-causal boolean mask does (max |Δ| ≈ 1e-7 against running each sample alone).
"""
from __future__ import annotations

import torch


def attention_mask(segment_ids: torch.Tensor, additive: bool = False) -> torch.Tensor:
    """(B, T) segment ids (1, 2, ... per sample; 0 = padding) -> the mask transformers expects.

    Rows holding at most one sample get the cheap 2D padding mask; packed rows get a
    (B, 1, T, T) boolean mask: query i sees key j iff j <= i and both lie in the same sample.
    Padding positions see themselves only through the causal rule (no all-masked rows, no NaN).
    `additive` gives the float form (0 allowed, -inf-like masked) that eager attention adds to
    its scores (it would add a boolean mask as 0/1).
    """
    if int(segment_ids.max()) <= 1:
        return (segment_ids > 0).long()
    T = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (same & causal)[:, None]  # (B, 1, T, T)
    if additive:
        return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(torch.float32).min)
    return allowed
