"""Per-sample attention for packed rows, applied to any transformers model from outside.

A packed row holds many samples; a dense block-causal mask over the whole row costs O(T²) memory
and compute and forces sdpa off its fused kernels. Instead, `packed_attention` gathers each
sample's queries/keys/values into a (samples, heads, longest, dim) batch, runs causal sdpa on it
(fused kernels, no mask) and scatters the outputs back: attention costs Σ over samples of L², and
never crosses a sample boundary. The linear layers still run on the packed row with no padding.

It is registered with transformers' AttentionInterface under `PACKED`; transformers then builds
no mask at all for this implementation. Without segment information (plain inference calls) it
falls back to transformers' sdpa path, so a model left in this mode still works.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PACKED = "tunesmith_packed"
_registered = False


@dataclass
class Segments:
    """Where each sample of a (B, T) batch lives: `index` (n, Lmax) into the flattened B·T tokens
    (padding slots point at the sample's first token and are never attended to by real queries,
    being right of them under the causal rule), `valid` (n, Lmax)."""

    index: torch.Tensor
    valid: torch.Tensor


def segments_from_ids(segment_ids: torch.Tensor) -> Segments:
    """(B, T) segment ids (1.. per sample, 0 = padding) -> Segments."""
    flat = segment_ids.reshape(-1)
    B, T = segment_ids.shape
    row = torch.arange(B, device=flat.device).repeat_interleave(T)
    keep = flat > 0
    pos = torch.arange(B * T, device=flat.device)[keep]
    key = (row[keep] * (int(flat.max()) + 1) + flat[keep])  # a unique id per (row, sample)
    _, sample, counts = torch.unique_consecutive(key, return_inverse=True, return_counts=True)
    n, longest = counts.numel(), int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    offset = torch.arange(pos.numel(), device=flat.device) - starts[sample]
    index = pos[starts][:, None].repeat(1, longest)  # padding slots -> the sample's first token
    index[sample, offset] = pos
    valid = torch.zeros(n, longest, dtype=torch.bool, device=flat.device)
    valid[sample, offset] = True
    return Segments(index, valid)


def _gather(x: torch.Tensor, seg: Segments) -> torch.Tensor:
    # (B, H, T, D) -> (n, H, Lmax, D)
    B, H, T, D = x.shape
    flat = x.transpose(1, 2).reshape(B * T, H, D)
    return flat[seg.index].transpose(1, 2)


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, **kwargs):
    seg: Segments | None = kwargs.get("tunesmith_segments")
    if seg is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    B, H, T, D = query.shape
    groups = H // key.shape[1]
    q, k, v = _gather(query, seg), _gather(key, seg), _gather(value, seg)
    if groups > 1:  # grouped-query attention: share each K/V head among its query heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
    out = out.transpose(1, 2)  # (n, Lmax, H, D)
    result = out.new_zeros(B * T, H, out.shape[-1])
    result = result.index_put((seg.index[seg.valid],), out[seg.valid])
    return result.view(B, T, H, -1), None


def register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(PACKED, packed_attention)
        _registered = True


def use_packed_attention(model) -> None:
    """Switch `model` to per-sample attention (training on packed or padded batches)."""
    register()
    model.set_attn_implementation(PACKED)


def use_attention(model, name: str) -> None:
    """Switch back to a stock implementation (`sdpa`, `eager`) e.g. before generation."""
    model.set_attn_implementation(name)
