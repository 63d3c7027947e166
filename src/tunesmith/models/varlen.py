"""Packed rows through one variable-length attention call (CUDA), no per-document work.

`models.attention.packed_attention` gathers a packed row's documents into a padded batch and runs
one sdpa call: on a GPU the padding wastes most of the attention work when a 2048-token document
shares a row with dozens of short ones (over half of each step of the 1B scale-up on an H100).
A variable-length kernel takes the row as it is, (tokens, heads, dim) with the cumulative document
boundaries (`cu_seqlens`), and attends causally within each document: no gather, no padding, no
mask tensor. What this module can use, best first:

- `torch` — `torch.nn.attention.varlen.varlen_attn` (flash attention inside torch, 2.10+; CUDA,
  bf16/fp16). Its signature changed between releases; `_torch_varlen` adapts (GQA, scale).
- `flash_attn` — flash-attn's `flash_attn_varlen_func`, when that package is installed.
- `flex` — `flex_attention` with a document-causal `BlockMask` (any device; on CUDA compiled, as
  flex needs to be fast; on a CPU eager, which is what the tests compare against `packed`).
- `packed` — `models.attention.packed_attention` (the per-row gather), the fallback.

The choice is made once per forward, outside the decoder layers (`varlen_segments`, called by the
loss module's `forward_hidden`), from the batch's device and the compute dtype: a kernel that
cannot run (fp32 on flash, no CUDA, a failed probe) is never reached inside a layer. A CUDA kernel
is probed once per device (forward + backward on a tiny GQA row against sdpa per document) before
it is trusted: a broken build falls back to the next one with a printed reason, not a crash mid-run.

Padding (segment id 0) runs as documents of their own: their outputs are ignored by the loss, and
no gather/scatter is needed. Prefix tuning (keys every query sees) goes through `packed`; the
sliding window and logit soft-capping of some architectures are ignored, as `packed` does.

Registered with transformers' AttentionInterface as `VARLEN`; without segments (inference calls)
it falls back to sdpa like `packed` does.
"""
from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass

import torch

from .attention import Segments, packed_attention, prefix_states, sdpa_with_prefix, segments_from_ids

VARLEN = "tunesmith_varlen"
BACKENDS = ("torch", "flash_attn", "flex", "packed")
_registered = False
_announced: set[tuple[str, str]] = set()
_probed: dict[tuple[str, str], str | None] = {}  # (device, backend) -> None if it works, else why not


@dataclass
class VarlenSegments:
    """Where the documents of a (B, T) batch are, in the form the chosen backend needs."""

    backend: str
    cu_seqlens: torch.Tensor | None = None  # int32 (n + 1,) over the flattened B·T tokens
    max_len: int = 0
    block_mask: object | None = None  # flex_attention's BlockMask
    packed: Segments | None = None  # the `packed` fallback's gather plan


def cu_seqlens_from_ids(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, T) segment ids -> (cumulative document starts over the flattened B·T tokens, int32,
    ending with B·T; the longest document). A document ends where the id changes or a row ends;
    a run of padding (id 0) counts as one document."""
    B, T = segment_ids.shape
    flat = segment_ids.reshape(-1)
    start = torch.ones_like(flat, dtype=torch.bool)
    start[1:] = flat[1:] != flat[:-1]
    start[::T] = True
    starts = start.nonzero().squeeze(1)
    cu = torch.cat([starts, starts.new_tensor([B * T])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def document_block_mask(segment_ids: torch.Tensor):
    """flex_attention's BlockMask for causal attention within each document of each row."""
    from torch.nn.attention.flex_attention import create_block_mask

    ids = segment_ids

    def document_causal(b, h, q, kv):
        return (ids[b, q] == ids[b, kv]) & (q >= kv)

    B, T = ids.shape
    return create_block_mask(document_causal, B, None, T, T, device=ids.device)


def backend_available(name: str) -> bool:
    """Whether `name`'s code exists in this installation (not whether it runs: see `_probe`)."""
    import importlib

    where = {"torch": ("torch.nn.attention.varlen", "varlen_attn"),
             "flash_attn": ("flash_attn", "flash_attn_varlen_func"),
             "flex": ("torch.nn.attention.flex_attention", "flex_attention")}
    if name not in where:
        return name == "packed"
    module, attr = where[name]
    try:
        return hasattr(importlib.import_module(module), attr)
    except ImportError:
        return False


def cuda_varlen_available() -> bool:
    """A variable-length kernel for CUDA is installed and CUDA is there: what `training_attention`
    asks before it picks `varlen` over `packed`."""
    return torch.cuda.is_available() and any(backend_available(b) for b in ("torch", "flash_attn", "flex"))


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def compute_dtype(model, device: torch.device) -> torch.dtype:
    """The dtype attention will see: autocast's when it is on, else the model's parameters'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


def choose_backend(device: torch.device, dtype: torch.dtype, wanted: str | None = None) -> str:
    """The first backend of BACKENDS (or `wanted`, `TUNESMITH_VARLEN` in the environment) that is
    installed, suits the device and dtype and passed its probe; `packed` when none does."""
    wanted = wanted or os.environ.get("TUNESMITH_VARLEN") or None
    order = [wanted] if wanted else list(BACKENDS)
    for name in order:
        if name not in BACKENDS:
            raise ValueError(f"TUNESMITH_VARLEN={name}: expected one of {', '.join(BACKENDS)}")
        if name in ("torch", "flash_attn") and (device.type != "cuda" or not _half(dtype)):
            continue
        if name == "flex" and device.type == "cuda" and not _half(dtype):
            continue  # compiled flex in fp32 works but is no faster than packed
        if name == "flex" and device.type != "cuda" and not wanted:
            continue  # eager flex on a CPU materialises T² scores: only when asked for (the tests)
        if not backend_available(name):
            continue
        if device.type == "cuda" and name != "packed" and _probe(device, name, dtype) is not None:
            continue
        return name
    return "packed"


def varlen_segments(model, segment_ids: torch.Tensor, wanted: str | None = None) -> VarlenSegments:
    """Everything the layers need for one forward of a (B, T) batch, computed once."""
    device = segment_ids.device
    backend = choose_backend(device, compute_dtype(model, device), wanted or getattr(model, "_tunesmith_varlen", None))
    if (str(device), backend) not in _announced:
        _announced.add((str(device), backend))
        print(f"[tunesmith] varlen attention on {device}: {backend}", file=sys.stderr)
    seg = VarlenSegments(backend)
    if backend in ("torch", "flash_attn"):
        seg.cu_seqlens, seg.max_len = cu_seqlens_from_ids(segment_ids)
    elif backend == "flex":
        seg.block_mask = document_block_mask(segment_ids)
    if backend == "packed" or _has_prefix(model):
        seg.packed = segments_from_ids(segment_ids)
    return seg


def _has_prefix(model) -> bool:
    from .attention import PREFIX

    return any(PREFIX in m.__dict__ for m in model.modules())


def _torch_varlen(q, k, v, cu, max_len, scale):
    """torch's varlen_attn on (N, H, D) tensors, whichever signature this torch has (2.10:
    `is_causal`, no GQA, no scale; later: `window_size=(-1, 0)`, `enable_gqa`, `scale`)."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if scale is not None:
        if "scale" in params:
            kwargs["scale"] = scale
        else:  # the kernel scales by D^-1/2: fold the rest into q
            q = q * (scale * q.shape[-1] ** 0.5)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def _flash_attn_varlen(q, k, v, cu, max_len, scale):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=0.0, softmax_scale=scale, causal=True)


_compiled_flex = None


def _flex(query, key, value, block_mask, scale):
    """flex_attention on (B, H, T, D); compiled on CUDA (flex is slow uncompiled), eager elsewhere."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention
    if query.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    gqa = key.shape[1] != query.shape[1]
    return fn(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=gqa)


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, **kwargs):
    """A transformers attention function: (B, H, T, D) query, (B, kv_heads, T, D) key/value ->
    ((B, T, H, D) output, None), attention within each document of each packed row."""
    seg: VarlenSegments | None = kwargs.get("tunesmith_segments")
    if seg is None:
        return sdpa_with_prefix(module, query, key, value, attention_mask, dropout=dropout,
                                scaling=scaling, is_causal=is_causal, **kwargs)
    if seg.packed is not None and (seg.backend == "packed" or prefix_states(module, key) is not None):
        kwargs["tunesmith_segments"] = seg.packed
        return packed_attention(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    if dropout and module.training:
        raise RuntimeError("attention dropout is not supported by the varlen kernels; set model.attention=packed")
    B, H, T, D = query.shape
    if seg.backend == "flex":
        out = _flex(query, key, value, seg.block_mask, scaling)
        return out.transpose(1, 2), None
    # (B, H, T, D) -> (B·T, H, D): a view when the projections' (B, T, H, D) layout is intact
    q, k, v = (x.transpose(1, 2).reshape(B * T, x.shape[1], D) for x in (query, key, value))
    run = _torch_varlen if seg.backend == "torch" else _flash_attn_varlen
    out = run(q, k, v, seg.cu_seqlens, seg.max_len, scaling)
    return out.view(B, T, H, out.shape[-1]), None


def _reference(q, k, v, lengths, scale):
    """sdpa per document: what a probe compares a kernel with."""
    outs, start = [], 0
    groups = q.shape[1] // k.shape[1]
    for n in lengths:
        sl = slice(start, start + n)
        qi, ki, vi = (x[sl].transpose(0, 1)[None] for x in (q, k, v))
        ki, vi = ki.repeat_interleave(groups, 1), vi.repeat_interleave(groups, 1)
        outs.append(torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)[0]
                    .transpose(0, 1))
        start += n
    return torch.cat(outs)


def _probe(device: torch.device, name: str, dtype: torch.dtype) -> str | None:
    """Run `name` once on a tiny GQA row (forward and backward) and compare with sdpa per
    document; None when it matches, else the reason (printed once)."""
    key = (str(device), name)
    if key in _probed:
        return _probed[key]
    why = None
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        lengths, H, KV, D = [5, 64, 3, 56], 4, 2, 64
        N = sum(lengths)
        q, k, v = (torch.randn(N, h, D, generator=gen).to(device, dtype).requires_grad_()
                   for h in (H, KV, KV))
        ids = torch.repeat_interleave(torch.arange(1, len(lengths) + 1), torch.tensor(lengths))[None].to(device)
        seg = VarlenSegments(name)
        if name == "flex":
            seg.block_mask = document_block_mask(ids)
        else:
            seg.cu_seqlens, seg.max_len = cu_seqlens_from_ids(ids)
        as4 = [x.transpose(0, 1)[None] for x in (q, k, v)]  # (1, heads, N, D)
        out = varlen_attention(None, *as4, None, scaling=D ** -0.5, tunesmith_segments=seg)[0][0]
        out.float().square().sum().backward()
        grads = [x.grad.clone() for x in (q, k, v)]
        ref_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        ref = _reference(*ref_in, lengths, D ** -0.5)
        ref.float().square().sum().backward()
        err = max((a.float() - b.float()).abs().max().item() for a, b in
                  zip([out, *grads], [ref, *(x.grad for x in ref_in)]))
        if not err < 0.1:
            why = f"differs from sdpa per document by {err:.3g}"
    except Exception as e:  # a kernel missing from this build, an unsupported GPU, ...
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if why:
        print(f"[tunesmith] varlen attention: `{name}` unusable on {device} ({why}); trying the next", file=sys.stderr)
    _probed[key] = why
    return why


def register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(VARLEN, varlen_attention)
        _registered = True


def use_varlen_attention(model, backend: str | None = None) -> None:
    """Switch `model` to variable-length attention for packed rows (`backend` pins one of
    BACKENDS; by default the best that works is picked per forward)."""
    register()
    model.__dict__["_tunesmith_varlen"] = backend
    model.set_attn_implementation(VARLEN)
