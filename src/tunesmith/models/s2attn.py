"""Shifted sparse attention (S²-Attn, Chen et al., 2024, LongLoRA §3.2) for training long rows.

A row of N tokens is cut into blocks of G tokens (G = N/4 unless `model.s2_group` says otherwise)
and attention runs causally inside each block, so its cost is O(N·G) instead of O(N²). Half the
heads use blocks [0, G), [G, 2G), ...; the other half use blocks shifted by G/2, whose boundaries
lie at G/2 + mG: the first block is [0, G/2), and information flows between neighbouring blocks
through the shifted heads. There is no wrap-around (the FlashAttention form of the paper's code;
the rolled form would let the last G/2 tokens see the first ones). When N is not a multiple of G
the last block of either half is shorter. Packed rows stay isolated: a token attends to earlier
tokens of its own block *and* its own sample, never another document.

How: the queries, keys and values of a half are padded to whole blocks and viewed as
(B·blocks, heads, G, D), a batch that one sdpa call handles. Rows holding one sample (then
padding) run sdpa's causal kernel with no mask; packed rows get a (B·blocks, 1, G, G) boolean mask
(causal and same sample), built once per batch by `s2_segments`, not per layer. No tensor of size
N² exists. Grouped-query attention shares each key/value head among its query heads.

Training only: at inference the model uses full attention (the paper's design; the model learns
S²-Attn as an approximation of it). `s2_segments` gives an evaluating model the per-sample full
attention of `models.attention` instead, and without segment information (generation, plain
calls) `s2_attention` runs the stock sdpa path. Like the packed implementation, transformers
builds no mask for this one, so batched generation should switch to `sdpa` first
(`use_attention(model, "sdpa")`, as the training loop does).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import Segments, packed_attention, sdpa_with_prefix, segments_from_ids
from .load import ModelError

S2 = "tunesmith_s2"
GROUP = "tunesmith_s2_group"  # attribute of the model: the group size in tokens (0 = a quarter of each row)
_registered = False


@dataclass
class S2Rows:
    """What S²-Attn needs of a (B, N) batch: the group size G (≥ 2), and per half the block masks,
    each (B·blocks, 1, size, size) bool: `blocks` for blocks of G from 0, `head` for the shifted
    half's first G/2 tokens, `shifted` for its blocks of G from G/2. None = one causal sample per
    row (then only padding), where sdpa's causal kernel needs no mask."""

    group: int
    blocks: torch.Tensor | None = None
    head: torch.Tensor | None = None
    shifted: torch.Tensor | None = None


def group_size(length: int, group: int = 0) -> int:
    """The block size for rows of `length` tokens: `group` (0 = a quarter of the row, rounded up),
    at most the row, at least 2 (a shift of G/2 needs G ≥ 2)."""
    return max(2, min(group or -(-length // 4), length))


def block_masks(segment_ids: torch.Tensor, size: int) -> torch.Tensor:
    """(B, T) segment ids -> (B·⌈T/size⌉, 1, size, size) bool: within each block, query i sees key j
    iff j ≤ i and both hold the same sample. The last block's padding (id -1) sees only itself."""
    B, T = segment_ids.shape
    n = -(-T // size)
    seg = F.pad(segment_ids, (0, n * size - T), value=-1).reshape(B * n, size)
    causal = torch.ones(size, size, dtype=torch.bool, device=seg.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def s2_rows(segment_ids: torch.Tensor, group: int = 0) -> S2Rows:
    """S2Rows for (B, N) segment ids (1, 2, ... per sample, 0 = padding)."""
    G = group_size(segment_ids.shape[1], group)
    one_sample = (segment_ids.max() <= 1) & (segment_ids[:, 1:] <= segment_ids[:, :-1]).all()
    if bool(one_sample):  # a sample then padding per row: under the causal rule no real token sees the padding
        return S2Rows(G)
    s = G // 2
    return S2Rows(G, block_masks(segment_ids, G), block_masks(segment_ids[:, :s], s),
                  block_masks(segment_ids[:, s:], G))


def s2_segments(model, segment_ids: torch.Tensor) -> S2Rows | Segments:
    """The `tunesmith_segments` a forward under S²-Attn takes: the blocks while `model` trains,
    per-sample full attention (`models.attention.Segments`) while it evaluates."""
    if not model.training:
        return segments_from_ids(segment_ids)
    return s2_rows(segment_ids, model.__dict__.get(GROUP, 0))


def _to_blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    # (B, h, T, D) -> (B·⌈T/size⌉, h, size, D), zero-padded at the end
    B, h, T, D = x.shape
    n = -(-T // size)
    x = F.pad(x.transpose(1, 2), (0, 0, 0, 0, 0, n * size - T))  # (B, n·size, h, D)
    return x.reshape(B * n, size, h, D).transpose(1, 2)


def _blocked(query, key, value, mask, size: int, dropout: float, scaling) -> torch.Tensor:
    """Causal attention inside consecutive blocks of `size` tokens: (B, h, T, D) -> (B, T, h, D)."""
    B, h, T, D = query.shape
    if h == 0 or T == 0:
        return query.new_zeros(B, T, h, D)
    q, k, v = _to_blocks(query, size), _to_blocks(key, size), _to_blocks(value, size)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                         is_causal=mask is None)  # (B·n, h, size, D)
    return out.transpose(1, 2).reshape(B, -1, h, D)[:, :T]


def s2_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                 is_causal=None, **kwargs):
    rows = kwargs.get("tunesmith_segments")
    if isinstance(rows, Segments):  # evaluating: full attention within each sample
        return packed_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                is_causal=is_causal, **kwargs)
    if not isinstance(rows, S2Rows):  # no segment information: stock full attention
        return sdpa_with_prefix(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                is_causal=is_causal, **kwargs)
    H = query.shape[1]
    groups = H // key.shape[1]
    if groups > 1:  # grouped-query attention: each K/V head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    half, G, s = H // 2, rows.group, rows.group // 2
    plain = _blocked(query[:, :half], key[:, :half], value[:, :half], rows.blocks, G, dropout, scaling)
    q, k, v = query[:, half:], key[:, half:], value[:, half:]
    first = _blocked(q[:, :, :s], k[:, :, :s], v[:, :, :s], rows.head, s, dropout, scaling)
    rest = _blocked(q[:, :, s:], k[:, :, s:], v[:, :, s:], rows.shifted, G, dropout, scaling)
    return torch.cat([plain, torch.cat([first, rest], dim=1)], dim=2), None  # (B, T, H, D)


def register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(S2, s2_attention)
        _registered = True


def use_s2_attention(model, group: int = 0) -> None:
    """Train `model` with S²-Attn in blocks of `group` tokens (0 = a quarter of each row)."""
    if group == 1:
        raise ModelError("model.s2_group=1: a group needs at least 2 tokens (0 = a quarter of the row)")
    register()
    model.__dict__[GROUP] = group
    model.set_attn_implementation(S2)
