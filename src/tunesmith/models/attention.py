"""Per-sample attention for packed rows, applied to any transformers model from outside.

A packed row holds many samples; a dense block-causal mask over the whole row costs O(T²) memory
and compute and forces sdpa off its fused kernels. Instead, `packed_attention` gathers the
samples' queries/keys/values into (samples, heads, longest, dim) batches, runs causal sdpa on each
(fused kernels, no mask) and scatters the outputs back: attention never crosses a sample boundary.
Samples are batched with others of similar length (each batch's shortest ≥ `BUCKET_RATIO` × its
longest), so padding costs little: one batch padded to the longest sample would spend most of its
work on padding when a 2048-token document shares a row with forty short ones. The linear layers
still run on the packed row with no padding.

It is registered with transformers' AttentionInterface under `PACKED`; transformers then builds
no mask at all for this implementation. Without segment information (plain inference calls) it
falls back to transformers' sdpa path, so a model left in this mode still works.

Prefix tuning (`methods/prefix.py`) adds l key/value vectors per layer that every query sees
before its causal context. They are not in the KV cache: each attention call prepends them to
that call's keys/values (and always-visible columns to its mask). `register_prefix` wraps the
stock `sdpa` and `eager` registrations to do so, and `packed_attention` does it per sample, so a
prefix survives every switch between implementations; modules without a prefix run unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

PACKED = "tunesmith_packed"
PREFIX = "tunesmith_prefix"  # attribute of an attention module: callable(module) -> (key, value)
_registered = False
_prefix_registered = False


BUCKET_RATIO = 0.75  # a length bucket's shortest sample is at least this share of its longest


@dataclass
class Bucket:
    """Samples of similar length: `index` (n, L) into the flattened B·T tokens (padding slots
    point at the sample's first token and are never attended to by real queries, being right of
    them under the causal rule), `valid` (n, L)."""

    index: torch.Tensor
    valid: torch.Tensor
    slots: torch.Tensor  # flat positions of the valid slots in (n·L): no boolean indexing (a host sync) per layer


@dataclass
class Segments:
    """Where the samples of a (B, T) batch live, in length buckets; `scatter` (the flat position
    of every real token, in bucket order) puts the outputs back."""

    buckets: list[Bucket]
    scatter: torch.Tensor


def length_buckets(lengths: list[int], ratio: float = BUCKET_RATIO) -> list[list[int]]:
    """Sample numbers grouped by length, longest first: a bucket takes samples while they are at
    least `ratio` × its longest."""
    buckets: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if buckets and lengths[i] >= ratio * lengths[buckets[-1][0]]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def segments_from_ids(segment_ids: torch.Tensor, ratio: float | None = None) -> Segments:
    """(B, T) segment ids (1.. per sample, 0 = padding) -> Segments. `ratio` defaults to
    `BUCKET_RATIO` on a CPU and to one bucket (0) elsewhere: on an H100 the extra small kernels
    of many buckets made a LoRA step of the 135M model 2.3× slower (at 0.7× the memory)."""
    if ratio is None:
        ratio = BUCKET_RATIO if segment_ids.device.type == "cpu" else 0.0
    flat = segment_ids.reshape(-1)
    B, T = segment_ids.shape
    dev = flat.device
    row = torch.arange(B, device=dev).repeat_interleave(T)
    keep = flat > 0
    pos = torch.arange(B * T, device=dev)[keep]
    key = (row[keep] * (int(flat.max()) + 1) + flat[keep])  # a unique id per (row, sample)
    _, sample, counts = torch.unique_consecutive(key, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    offset = torch.arange(pos.numel(), device=dev) - starts[sample]
    lengths = counts.tolist()
    groups = length_buckets(lengths, ratio)
    bucket_of = torch.empty(len(lengths), dtype=torch.long)
    slot = torch.empty(len(lengths), dtype=torch.long)
    for b, members in enumerate(groups):
        bucket_of[members] = b
        slot[members] = torch.arange(len(members))
    bucket_of, slot = bucket_of.to(dev)[sample], slot.to(dev)[sample]
    buckets, scatter = [], []
    for b, members in enumerate(groups):
        mine = bucket_of == b
        index = pos[starts[torch.tensor(members, device=dev)]][:, None].repeat(1, lengths[members[0]])
        index[slot[mine], offset[mine]] = pos[mine]
        valid = torch.zeros(index.shape, dtype=torch.bool, device=dev)
        valid[slot[mine], offset[mine]] = True
        buckets.append(Bucket(index, valid, valid.reshape(-1).nonzero().squeeze(1)))
        scatter.append(index[valid])
    return Segments(buckets, torch.cat(scatter))


def _gather(x: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    # (B, H, T, D) -> (n, H, L, D)
    B, H, T, D = x.shape
    if B == 1:  # a packed row: pick along T in x's own layout, one copy (no (T, H, D) copy first)
        n, L = bucket.index.shape
        return x[0].index_select(1, bucket.index.reshape(-1)).view(H, n, L, D).transpose(0, 1)
    flat = x.transpose(1, 2).reshape(B * T, H, D)
    return flat[bucket.index].transpose(1, 2)


def prefix_states(module, like: torch.Tensor):
    """The module's prefix (key, value), each (1, kv_heads, l, head_dim) in `like`'s dtype, or None."""
    source = module.__dict__.get(PREFIX)
    if source is None:
        return None
    key, value = source(module)
    return key.to(like.dtype)[None], value.to(like.dtype)[None]


def _prepend_prefix(prefix, query, key, value, mask, causal: bool, additive: bool):
    """Keys/values (B, kv_heads, l + K, D) with the prefix first, and a mask whose prefix columns
    are always visible. Without a mask a causal call gets one aligned to the last key (queries may
    be the tail of the keys, as with a cache), since sdpa's own `is_causal` aligns to the first."""
    B, l = key.shape[0], prefix[0].shape[2]
    key = torch.cat([prefix[0].expand(B, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix[1].expand(B, -1, -1, -1), value], dim=2)
    Q, K = query.shape[2], key.shape[2] - l
    if mask is None:
        if not causal or Q == 1:
            return key, value, None
        mask = torch.ones(Q, K, dtype=torch.bool, device=query.device).tril(K - Q)[None, None]
        if additive:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min)
    visible = mask.new_ones if mask.dtype == torch.bool else mask.new_zeros
    mask = torch.cat([visible((*mask.shape[:-1], l)), mask], dim=-1)
    return key, value, mask


def with_prefix(attention, additive: bool):
    """A transformers attention function that first prepends the calling module's prefix (if any)."""

    def forward(module, query, key, value, attention_mask, *args, **kwargs):
        prefix = prefix_states(module, key)
        if prefix is not None:
            key, value, attention_mask = _prepend_prefix(prefix, query, key, value, attention_mask,
                                                         getattr(module, "is_causal", True), additive)
        return attention(module, query, key, value, attention_mask, *args, **kwargs)

    return forward


def _own_eager(module, *args, **kwargs):
    # each transformers model file defines its own eager attention; Llama's is the common form
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn(module, *args, **kwargs)


def _sdpa(*args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


sdpa_with_prefix = with_prefix(_sdpa, additive=False)
eager_with_prefix = with_prefix(_own_eager, additive=True)


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, **kwargs):
    seg: Segments | None = kwargs.get("tunesmith_segments")
    if seg is None:
        return sdpa_with_prefix(module, query, key, value, attention_mask, dropout=dropout,
                                scaling=scaling, is_causal=is_causal, **kwargs)
    B, H, T, D = query.shape
    groups = H // key.shape[1]
    prefix = prefix_states(module, key)
    outs = []
    for bucket in seg.buckets:
        q, k, v = _gather(query, bucket), _gather(key, bucket), _gather(value, bucket)
        if prefix is not None:  # every sample sees the prefix, then its own causal context
            n = k.shape[0]
            k = torch.cat([prefix[0].expand(n, -1, -1, -1), k], dim=2)
            v = torch.cat([prefix[1].expand(n, -1, -1, -1), v], dim=2)
        gqa = {}
        if groups > 1 and q.device.type == "cpu":  # the CPU kernels share K/V heads themselves
            gqa = {"enable_gqa": True}
        elif groups > 1:  # grouped-query attention: share each K/V head among its query heads
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        if prefix is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, **gqa)
        else:  # causal aligned to the last key: query i sees the l prefix keys and context 0..i
            mask = causal_lower_right(q.shape[2], k.shape[2])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, **gqa)
        out = out.transpose(1, 2)
        outs.append(out.reshape(-1, *out.shape[2:]).index_select(0, bucket.slots))  # (real tokens, H, D)
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    result = out.new_zeros(B * T, H, out.shape[-1])
    result = result.index_put((seg.scatter,), out)
    return result.view(B, T, H, -1), None


def register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(PACKED, packed_attention)
        _registered = True


def register_prefix() -> None:
    """Make the stock `sdpa` and `eager` implementations prefix-aware (a no-op for modules without one)."""
    global _prefix_registered
    if not _prefix_registered:
        from transformers import AttentionInterface

        AttentionInterface.register("sdpa", sdpa_with_prefix)
        AttentionInterface.register("eager", eager_with_prefix)
        _prefix_registered = True
    register()


def use_packed_attention(model) -> None:
    """Switch `model` to per-sample attention (training on packed or padded batches)."""
    register()
    model.set_attn_implementation(PACKED)


def use_attention(model, name: str) -> None:
    """Switch back to a stock implementation (`sdpa`, `eager`) e.g. before generation."""
    model.set_attn_implementation(name)
