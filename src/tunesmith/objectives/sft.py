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


def weighted_token_loss(head, hidden, input_ids, weights, chunk: int = 1024):
    """Sum over trained positions of weight * NLL(next token). Returns (loss_sum, n_trained).
    `chunk` <= 0: no chunks (the whole logits at once, as most trainers compute them)."""
    w = weights[:, 1:]  # weight of predicting token t+1 from position t
    keep = w > 0
    h = hidden[:, :-1][keep]  # (n, d)
    targets = input_ids[:, 1:][keep]
    w = w[keep].to(torch.float32)
    n = int(keep.sum())
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


def causal_lm_loss(model, batch: dict, chunk: int = 1024):
    """(loss_sum, n_trained_tokens, metrics) for a batch from `tunesmith.data.collate`."""
    hidden = forward_hidden(model, batch)
    loss_sum, n = weighted_token_loss(model.get_output_embeddings(), hidden, batch["input_ids"], batch["weights"], chunk)
    return loss_sum, n, {}


class SFT(ObjectiveBase):
    """Causal LM loss over the weighted tokens of plain samples (SFT, continued pretraining)."""

    name, unit, token_loss = "sft", "trained_tokens", True

    def __init__(self, chunk: int = 1024):
        self.chunk = chunk
        self.domains: list[str] = []

    @classmethod
    def build(cls, recipe, model=None, **extras):
        return cls(recipe.train.loss_chunk)

    def __call__(self, model, batch):
        return causal_lm_loss(model, batch, self.chunk)

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
