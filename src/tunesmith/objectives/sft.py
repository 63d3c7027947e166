"""Causal LM loss (SFT and pretraining) with per-token weights and a chunked lm_head.

Only positions that carry weight go through the lm_head, in chunks of `chunk` tokens, each chunk
recomputed in backward: the full (T, vocab) fp32 logits never exist. For SFT, where only the
answers train, this also skips most of the lm_head work.

Domain routing: when the data's records carry a `domain` (or come from a mix of sources,
`data.train=task:sql/train+task:json/train`), every token carries its record's domain number
through packing (the batch's `route_ids`), and the forward runs under `models.moe.routing`, so a
domain-expert MoE (method `moe` or `moe_lora` with enforced routing) sends each token through its
domain's expert; a learned router ignores the domains. The domain names are saved with the run and
its adapter (`tunesmith_domains.json`), where `tunesmith generate|eval --domain NAME` finds them.
"""
from __future__ import annotations

import contextlib
import json

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..models.attention import PACKED, segments_from_ids
from ..models.embedding import DOMAINS_FILE
from ..models.masks import attention_mask
from ..models.moe import moe_modules, routing
from ..models.s2attn import S2, s2_segments
from ..models.varlen import VARLEN, varlen_segments
from .base import ObjectiveBase, ObjectiveError


def forward_hidden(model, batch: dict) -> torch.Tensor:
    """Last hidden states (B, T, d) of the decoder for a (possibly packed) batch.

    Samples never attend to each other: with per-sample attention (`models.attention`) each
    sample's attention runs on its own, and S²-Attn (`models.s2attn`) keeps its blocks within
    samples too; otherwise a block-causal mask isolates them. A batch with
    `route_ids` (data with domains) routes each token to its domain's expert in MoE layers."""
    body = getattr(model, model.base_model_prefix)
    if model.config._attn_implementation == PACKED:
        isolation = {"attention_mask": None, "tunesmith_segments": segments_from_ids(batch["segment_ids"])}
    elif model.config._attn_implementation == VARLEN:  # one variable-length kernel call per layer (CUDA)
        isolation = {"attention_mask": None, "tunesmith_segments": varlen_segments(model, batch["segment_ids"])}
    elif model.config._attn_implementation == S2:  # shifted blocks while training, full attention in eval
        isolation = {"attention_mask": None, "tunesmith_segments": s2_segments(model, batch["segment_ids"])}
    else:
        eager = model.config._attn_implementation == "eager"
        isolation = {"attention_mask": attention_mask(batch["segment_ids"], additive=eager)}
    with routing(model, domain_route_ids(model, batch)):  # no-op without route ids or domain-routed MoE layers
        out = body(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **isolation)
    return out.last_hidden_state


def domain_route_ids(model, batch: dict):
    """The batch's per-token domain ids (`route_ids`) when the model has MoE layers routed by domain (no
    learned router); None otherwise: a learned router picks experts itself, domains or not (a mix of
    sources gives every record a domain)."""
    ids = batch.get("route_ids")
    if ids is None or not any(m.router is None for m in moe_modules(model)):
        return None
    return ids


def _chunk_loss(head, h, targets, weights):
    logits = head(h).float()  # (n, vocab)
    return (F.cross_entropy(logits, targets, reduction="none") * weights).sum()


def weighted_token_loss(head, hidden, input_ids, weights, chunk: int = 1024, kernel: str = "chunked"):
    """Sum over trained positions of weight * NLL(next token). Returns (loss_sum, n_trained).
    `chunk` <= 0: no chunks (the whole logits at once, as most trainers compute them). `kernel`
    (LOSS_KERNELS): `fused`/`liger` compute the gradients in the forward instead (`fused_token_loss`)."""
    w = weights[:, 1:]  # weight of predicting token t+1 from position t
    keep = w > 0
    h = hidden[:, :-1][keep]  # (n, d)
    targets = input_ids[:, 1:][keep]
    w = w[keep].to(torch.float32)
    n = int(keep.sum())
    kernel = resolve_loss_kernel(kernel, head, hidden.device)
    if kernel != "chunked" and n and torch.is_grad_enabled():
        return fused_token_loss(head, h, targets, w, chunk if chunk > 0 else 1024, kernel), n
    total = hidden.new_zeros((), dtype=torch.float32)
    if chunk <= 0:  # one piece, kept for backward: the (n, vocab) fp32 logits are materialised
        return total + _chunk_loss(head, h, targets, w), n
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, h[sl], targets[sl], w[sl], use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h[sl], targets[sl], w[sl])
    if n == 0:  # keep the graph connected so backward() works on an empty micro-batch
        total = total + 0.0 * hidden.sum()
    return total, n


LOSS_KERNELS = ("auto", "chunked", "fused", "liger")


def resolve_loss_kernel(kernel: str, head, device: torch.device) -> str:
    """`chunked` for a head that is not a plain bias-free Linear (an adapter on it, hooks: its
    forward must run); `auto` = on CUDA Liger's kernel when `liger-kernel` is installed, else `fused`; on a CPU `chunked`."""
    if kernel not in LOSS_KERNELS:
        raise ObjectiveError(f"loss kernel `{kernel}`: expected one of {', '.join(LOSS_KERNELS)}")
    plain = type(head) is torch.nn.Linear and head.bias is None and not head._forward_hooks \
        and not head._forward_pre_hooks
    if kernel == "chunked" or not plain:
        return "chunked"
    if kernel == "auto":  # on a CPU the chunked loss is what `tunesmith estimate` is fitted to
        if device.type != "cuda":
            return "chunked"
        return "liger" if _liger() is not None else "fused"
    if kernel == "liger" and (device.type != "cuda" or _liger() is None):
        return "fused"  # Liger is Triton: CUDA only, and optional
    return kernel


def _liger():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class _FusedLinearCE(torch.autograd.Function):
    """Σ w·NLL(target | h·Wᵀ) over the rows of h, chunk by chunk, with the gradients of h and W
    computed in the forward (softmax − one-hot, times w): the (n, vocab) logits never exist whole
    and the lm_head is not recomputed in backward (the chunked checkpoint runs it twice)."""

    @staticmethod
    def forward(ctx, h, weight, targets, w, chunk: int, dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        hc, wc = h.to(dtype), weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        for i in range(0, h.shape[0], chunk):
            x, t, ww = hc[i:i + chunk], targets[i:i + chunk], w[i:i + chunk]
            logits = (x @ wc.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, t[:, None]).squeeze(1)) * ww).sum()
            if need_h or need_w:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                g[torch.arange(len(t), device=g.device), t] -= 1.0
                g = g.mul_(ww[:, None]).to(dtype)
                if need_h:
                    grad_h[i:i + chunk] = g @ wc
                if need_w:
                    grad_w += (g.T @ x).float()
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def fused_token_loss(head, h, targets, w, chunk: int = 1024, kernel: str = "fused"):
    """Σ w·NLL through a plain Linear head: Liger's fused linear + cross-entropy (CUDA, when every
    weight is 1: its loss has no per-token weights) or `_FusedLinearCE`."""
    dtype = _compute_dtype(h)
    if kernel == "liger" and bool((w == 1).all()):
        out = _liger()(h.to(dtype), head.weight.to(dtype), targets, reduction="sum")
        return (out[0] if isinstance(out, tuple) else out).float()
    return _FusedLinearCE.apply(h, head.weight, targets, w, chunk, dtype)


def causal_lm_loss(model, batch: dict, chunk: int = 1024, kernel: str = "chunked"):
    """(loss_sum, n_trained_tokens, metrics) for a batch from `tunesmith.data.collate`."""
    hidden = forward_hidden(model, batch)
    loss_sum, n = weighted_token_loss(model.get_output_embeddings(), hidden, batch["input_ids"], batch["weights"],
                                      chunk, kernel)
    return loss_sum, n, {}


class SFT(ObjectiveBase):
    """Causal LM loss over the weighted tokens of plain samples (SFT, continued pretraining)."""

    name, unit, token_loss = "sft", "trained_tokens", True

    def __init__(self, chunk: int = 1024, kernel: str = "chunked"):
        self.chunk = chunk
        self.kernel = kernel
        self.domains: list[str] = []

    @classmethod
    def build(cls, recipe, model=None, **extras):
        return cls(recipe.train.loss_chunk, recipe.train.loss_kernel)

    def __call__(self, model, batch):
        return causal_lm_loss(model, batch, self.chunk, self.kernel)

    def prepare(self, run) -> None:
        """Data with domains: their names saved with the run; an MoE with fewer experts is refused now."""
        self.domains = list(getattr(run.splits, "domains", []) or [])
        experts = [m.n_experts for m in moe_modules(run.model) if m.router is None]  # domain-routed layers
        if self.domains and experts and len(self.domains) > min(experts):
            raise ObjectiveError(f"the data has {len(self.domains)} domains ({', '.join(self.domains)}) but the MoE "
                                 f"layers have {min(experts)} experts: set the method's `experts` to "
                                 f"{len(self.domains)} (expert k serves the k-th domain in sorted order)")
        if self.domains and run.dist.main:
            (run.recipe.run_dir / DOMAINS_FILE).write_text(json.dumps(self.domains) + "\n")

    def held_out(self, model):
        return contextlib.nullcontext()

    def save_beside(self, folder, model) -> None:
        """The domain names beside the saved adapter or model, for `--domain NAME` at inference."""
        if self.domains:
            (folder / DOMAINS_FILE).write_text(json.dumps(self.domains) + "\n")


@torch.no_grad()
def perplexity(model, tokenizer, path: str, *, limit: int | None = None, max_length: int = 1024,
               batch_tokens: int = 4096, fmt: str = "auto") -> dict:
    """Loss and perplexity of a model on text (any data file the `data` pipeline reads): the
    token-weighted mean NLL over the trained tokens of `path` (all tokens for text; the answers for
    chats) and its exponential."""
    import math

    from ..config import DataConfig
    from ..data import collate, load_data, plan_batches, to_device

    cfg = DataConfig(train=path, format=fmt, max_length=max_length, limit=limit, shuffle=False)
    samples = load_data(cfg, tokenizer).train
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    plan = plan_batches([len(s["input_ids"]) for s in samples], packing=True, batch_tokens=max(batch_tokens, max_length),
                        batch_size=1, seed=0, epoch=0, shuffle=False)
    was_training, total, count = model.training, 0.0, 0
    model.eval()
    for rows in plan:
        loss_sum, n, _ = causal_lm_loss(model, to_device(collate([samples[i] for i in rows], packing=True, pad_id=pad),
                                                         model.device))
        total, count = total + float(loss_sum), count + n
    model.train(was_training)
    mean = total / max(count, 1)
    return {"samples": len(samples), "tokens": count, "loss": mean, "perplexity": math.exp(min(mean, 50))}
