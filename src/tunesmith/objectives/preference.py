"""Preference objectives (the DPO family) on collated pairs.

A batch is `collate(flatten_pairs(pairs), ...)`: its segments, in order (packed: segment ids along
the row; padded: one row each), are chosen 1, rejected 1, chosen 2, ... Each side's sequence
log-probability log π(y|x) is the sum over its trained (answer) tokens, computed like the SFT loss:
only those positions go through the lm_head, in checkpointed chunks, so full logits never exist.

Losses, per pair, with h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r)):

- dpo   (Rafailov et al., 2023; label smoothing = cDPO): −(1−ε) log σ(βh) − ε log σ(−βh)
- ipo   (Azar et al., 2023): (h − 1/(2β))², on token-averaged log-probs as in TRL
- hinge (SLiC, Zhao et al., 2023): max(0, 1 − βh)
- simpo (Meng et al., 2024, reference-free): −log σ(β(ā_c − ā_r) − βγ), ā = log π / tokens
- orpo  (Hong et al., 2024, reference-free): NLL(y_c) − λ log σ(log odds(ā_c) − log odds(ā_r)),
        odds(ā) = p / (1 − p) with p = exp(ā); NLL(y_c) = −ā_c, the chosen answer's per-token NLL.

β left unset (None) is the loss's own paper default (`recipe.PREFERENCE_BETA`): SimPO's reward is a
per-token average, about 1/length of DPO's sequence sum, so it needs β ≈ 2 where DPO takes 0.1.

`preference_objective` returns the *sum* of per-pair losses and the number of pairs: the loop
divides by the pairs of the whole accumulation window, as it divides SFT losses by tokens.
"""
from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import Config
from ..methods.lora import adapters_disabled, lora_modules
from .base import ObjectiveBase, ObjectiveError
from .sft import forward_hidden

REFERENCE_FREE = ("simpo", "orpo")
WITH_REFERENCE = ("dpo", "ipo", "hinge")


# β of each preference loss when `objective.preference.beta` is null, from its paper: DPO 0.1
# (Rafailov et al., 2023); SimPO 2.0 (Meng et al., 2024, "2.0 or 2.5"; at 0.1 its length-normalised
# reward barely moves); IPO and hinge 0.1 (TRL's default: neither paper fixes one value on this
# scale); ORPO's loss has no β (its λ is `orpo_lambda`), 0.1 scales only its logged rewards.
PREFERENCE_BETA = {"dpo": 0.1, "ipo": 0.1, "hinge": 0.1, "simpo": 2.0, "orpo": 0.1}


class PreferenceConfig(Config):
    beta: float | None = Field(None, gt=0)
    "β: KL strength (dpo, ipo, hinge) or reward scale (simpo); null = the loss's paper default (simpo 2.0, others 0.1), resolved in the printed recipe."
    gamma: float = 0.5
    "SimPO's target reward margin as a fraction of β (γ = gamma·β; the paper's 0.5: γ = 1.0 at β = 2.0)."
    orpo_lambda: float = 0.1
    "ORPO's weight of the odds-ratio term next to the SFT loss on the chosen answer."
    label_smoothing: float = 0.0
    "Conservative DPO: the probability that a preference label is flipped."
    reference: Literal["auto", "adapter_off", "copy", "none"] = "auto"
    "Reference model: the base with the LoRA switched off, a frozen copy (full tuning), or none (SimPO, ORPO)."
    precompute_reference: bool = False
    "Compute reference log-probs once before training (frees the reference during training)."


# --------------------------------------------------------------------------------------------------
# sequence log-probabilities


def segment_index(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, T) segment ids -> (B, T) running index 0..S-1 of each (row, segment), in row-major order
    (-1 on padding), and S. Packed (one row, ids 1..k) and padded (id 1 per row) batches alike."""
    B = segment_ids.shape[0]
    valid = segment_ids > 0
    key = torch.arange(B, device=segment_ids.device)[:, None] * (int(segment_ids.max()) + 1) + segment_ids
    uniq, inverse = torch.unique(key[valid], return_inverse=True)  # sorted: row, then segment
    index = torch.full_like(segment_ids, -1)
    index[valid] = inverse
    return index, uniq.numel()


def _chunk_logps(head, h, targets):
    logp = head(h).float().log_softmax(-1)  # (n, vocab), fp32
    return logp.gather(-1, targets[:, None]).squeeze(-1)  # (n,)


def owned_logp_sums(head, hidden, h, targets, owner, n_owners: int, chunk: int = 1024) -> torch.Tensor:
    """Σ log p(target) per owner [n_owners] fp32, from the selected hidden states `h` (n, d): the lm_head
    runs `chunk` positions at a time (recomputed in backward), so (n, vocab) logits never pile up."""
    n = targets.numel()
    parts = []
    chunk = chunk if chunk > 0 else max(n, 1)  # 0: one piece (no recompute)
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logps, head, h[sl], targets[sl], use_reentrant=False))
        else:
            parts.append(_chunk_logps(head, h[sl], targets[sl]))
    token_logps = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    total = hidden.new_zeros(n_owners, dtype=torch.float32).index_add(0, owner, token_logps)
    if n == 0:  # keep the graph connected so backward() works
        total = total + 0.0 * hidden.sum()
    return total


def sequence_logps(model, batch: dict, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment (sum of log p(token) over trained target positions [S] fp32, their count [S] int64).

    A position counts when its weight is > 0 (weights are not multiplied in: 0/1 for preference data).
    """
    hidden = forward_hidden(model, batch)  # (B, T, d)
    head = model.get_output_embeddings()
    seg, S = segment_index(batch["segment_ids"])
    keep = batch["weights"][:, 1:] > 0  # predicting token t+1 from position t
    h = hidden[:, :-1][keep]  # (n, d)
    targets = batch["input_ids"][:, 1:][keep]
    owner = seg[:, 1:][keep]  # the segment of each target token
    logp_sum = owned_logp_sums(head, hidden, h, targets, owner, S, chunk)
    counts = torch.zeros(S, dtype=torch.long, device=owner.device).index_add(0, owner, torch.ones_like(owner))
    return logp_sum, counts


def reference_logps(model_or_ref: nn.Module, batch: dict, *, adapters_off: bool = True,
                    chunk: int = 1024) -> torch.Tensor:
    """Per-segment reference log-prob sums [S], without gradient.

    With `adapters_off` (for the LoRA policy itself) the LoRA deltas are switched off, so the reference
    is the base model. Pass False for a frozen copy that must keep its own adapters (a policy that
    started from an SFT adapter: its reference is base + that adapter); a copy without LoRA layers is
    unaffected either way.
    """
    with torch.no_grad():
        if adapters_off:
            with adapters_disabled(model_or_ref):
                return sequence_logps(model_or_ref, batch, chunk)[0]
        return sequence_logps(model_or_ref, batch, chunk)[0]


# --------------------------------------------------------------------------------------------------
# losses: per-pair tensors in, per-pair losses [P] out


def _h(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)


def dpo_loss(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """-(1-ε) log σ(βh) - ε log σ(-βh); p* = policy, r* = reference, *c chosen, *r rejected."""
    z = beta * _h(pc, pr, rc, rr)
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def ipo_loss(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    """(h - 1/(2β))² on whatever log-probs are passed (the objective passes token averages, as TRL)."""
    return (_h(pc, pr, rc, rr) - 1 / (2 * beta)) ** 2


def hinge_loss(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    """max(0, 1 - βh)."""
    return torch.relu(1 - beta * _h(pc, pr, rc, rr))


def simpo_loss(pc_mean, pr_mean, beta: float, gamma: float) -> torch.Tensor:
    """-log σ(β(ā_c - ā_r) - β·gamma), ā = length-normalised log-probs; `gamma` is the margin / β."""
    return -F.logsigmoid(beta * (pc_mean - pr_mean) - beta * gamma)


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) from log p; log(1 - p) = log(-expm1(log p)) stays accurate for p near 1
    (log p is kept below -1e-6, where the odds are still finite)."""
    x = mean_logp.clamp(max=-1e-6)
    return x - torch.log(-torch.expm1(x))


def orpo_loss(pc_mean, pr_mean, nll_chosen, lam: float) -> torch.Tensor:
    """NLL(chosen) - λ log σ(log odds(ā_c) - log odds(ā_r)) (Hong et al., 2024, eq. 6-7)."""
    return nll_chosen - lam * F.logsigmoid(log_odds(pc_mean) - log_odds(pr_mean))


# --------------------------------------------------------------------------------------------------
# the objective


def resolve_beta(name: str, beta: float | None) -> float:
    """β as set, or the loss's paper default when unset."""
    return PREFERENCE_BETA[name] if beta is None else float(beta)


def preference_objective(model, batch: dict, name: str, cfg, reference=None, chunk: int = 1024):
    """(loss_sum, n_pairs, metrics) for a batch of pairs from `collate(flatten_pairs(pairs), ...)`.

    Args:
        name: dpo, ipo, hinge, simpo or orpo.
        cfg: a PreferenceConfig (beta, gamma, orpo_lambda, label_smoothing); beta None = the loss's default.
        reference: for dpo/ipo/hinge, where the reference log-probs come from, first match wins:
            `batch["ref_logps"]` ([S] per-segment sums, precomputed); a frozen nn.Module (used as is,
            its own adapters on); None = the policy with its LoRA adapters off (an error without LoRA).
            Ignored by simpo/orpo.

    Returns:
        The sum of per-pair losses, the number of pairs, and float metrics summed over pairs (divide by
        pairs to average): rewards/chosen, rewards/rejected (β·(log π − log π_ref); reference-free
        objectives: β·ā, the token-averaged log-prob), rewards/margins, rewards/accuracies (pairs whose
        margin is > 0), logps/chosen, logps/rejected (sequence sums of the policy).
    """
    if name not in REFERENCE_FREE + WITH_REFERENCE:
        raise ValueError(f"unknown preference objective `{name}`; choose one of "
                         f"{', '.join(WITH_REFERENCE + REFERENCE_FREE)}")
    logps, counts = sequence_logps(model, batch, chunk)
    if logps.numel() % 2:
        raise ValueError(f"a preference batch holds chosen/rejected pairs; got {logps.numel()} segments "
                         "(collate flatten_pairs(...) of whole pairs)")
    pc, pr = logps[0::2], logps[1::2]
    n = counts.to(torch.float32).clamp(min=1)
    nc, nr = n[0::2], n[1::2]
    beta = resolve_beta(name, cfg.beta)
    if name in REFERENCE_FREE:
        mc, mr = pc / nc, pr / nr
        if name == "simpo":
            losses = simpo_loss(mc, mr, beta, cfg.gamma)
        else:
            losses = orpo_loss(mc, mr, -mc, cfg.orpo_lambda)
        reward_c, reward_r = beta * mc.detach(), beta * mr.detach()
    else:
        ref = _reference(model, batch, reference, chunk).detach().to(logps.device, torch.float32)
        rc, rr = ref[0::2], ref[1::2]
        if name == "ipo":  # TRL's IPO: log-probs averaged over the answer's tokens
            losses = ipo_loss(pc / nc, pr / nr, rc / nc, rr / nr, beta)
        elif name == "hinge":
            losses = hinge_loss(pc, pr, rc, rr, beta)
        else:
            losses = dpo_loss(pc, pr, rc, rr, beta, cfg.label_smoothing)
        reward_c, reward_r = beta * (pc.detach() - rc), beta * (pr.detach() - rr)
    margins = reward_c - reward_r
    values = torch.stack([reward_c.sum(), reward_r.sum(), margins.sum(), (margins > 0).sum().float(),
                          pc.detach().sum(), pr.detach().sum()]).tolist()  # one device sync
    keys = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected")
    return losses.sum(), int(pc.numel()), dict(zip(keys, map(float, values)))


def _reference(model, batch, reference, chunk) -> torch.Tensor:
    if batch.get("ref_logps") is not None:
        return batch["ref_logps"]
    if reference is not None:  # the policy passed as its own reference means: adapters off
        return reference_logps(reference, batch, adapters_off=reference is model, chunk=chunk)
    if not lora_modules(model):
        raise ValueError("dpo/ipo/hinge need a reference model: this model has no LoRA adapters to switch "
                         "off, so pass a frozen copy (objective.preference.reference=copy), precomputed "
                         "batch['ref_logps'], or use a reference-free objective (simpo, orpo)")
    return reference_logps(model, batch, adapters_off=True, chunk=chunk)


# --------------------------------------------------------------------------------------------------
# the objective the harness runs


class Preference(ObjectiveBase):
    """A DPO-family loss over (chosen, rejected) pairs; one loss unit per pair."""

    unit = "pairs"
    Options, block = PreferenceConfig, "preference"
    block_doc = "Options of the preference objectives (dpo, ipo, hinge, simpo, orpo)."

    @classmethod
    def resolve(cls, name: str, options) -> None:
        """An unset β is the chosen loss's own paper default."""
        if options.beta is None:
            options.beta = PREFERENCE_BETA[name]

    def __init__(self, name: str, cfg, reference=None, chunk: int = 1024):
        self.name, self.cfg, self.reference, self.chunk = name, cfg, reference, chunk
        self.precomputed = False

    @classmethod
    def build(cls, recipe, model=None, **extras):
        """For a full-tuning reference a frozen copy of `model` is taken now (LoRA runs use the model
        itself with its adapter switched off)."""
        name, cfg = recipe.objective.name, recipe.objective.preference
        mode = cfg.reference
        if mode == "auto":
            # a run that continues an adapter (DPO after SFT) compares against that adapter, not the bare base
            lora_base = recipe.method.name == "lora" and not recipe.model.adapter
            mode = "none" if name in REFERENCE_FREE else ("adapter_off" if lora_base else "copy")
        reference = copy.deepcopy(model).eval().requires_grad_(False) if mode == "copy" else None
        return cls(name, cfg, reference, recipe.train.loss_chunk)

    @classmethod
    def load(cls, recipe, tokenizer):
        from ..data.preference import load_pairs

        return load_pairs(recipe.data, tokenizer, seed=recipe.train.seed)

    def length(self, item) -> int:
        return len(item["chosen"]["input_ids"]) + len(item["rejected"]["input_ids"])

    def units(self, item) -> int:
        return 1

    def rows(self, items) -> list:
        from ..data.preference import flatten_pairs

        return flatten_pairs(items)

    def finish(self, items, batch: dict) -> dict:
        if self.precomputed:  # [S] reference sums in segment order: c1, r1, c2, r2, ...
            batch["ref_logps"] = torch.tensor([p[side]["ref_logp"] for p in items for side in ("chosen", "rejected")])
        return batch

    def prepare(self, run) -> None:
        """`precompute_reference`: reference log-probs of every pair, once; the copy is then released."""
        if not getattr(self.cfg, "precompute_reference", False):
            return
        if self.name in REFERENCE_FREE:
            raise ObjectiveError(f"{self.name} uses no reference model: precompute_reference does not apply")
        for items in (run.splits.train, run.splits.val or []):
            self.precompute(run.model, items, pad_id=run.pad_id, device=run.device,
                            precision=run.recipe.train.precision, batch_tokens=run.recipe.train.batch_tokens)
        run.print_main("[tunesmith] reference log-probs precomputed")

    def precompute(self, model, items, *, pad_id: int, device, precision: str, batch_tokens: int) -> None:
        from ..data import collate, plan_batches
        from ..runtime import autocast

        ref, adapters_off = (self.reference, False) if self.reference is not None else (model, True)
        plan = plan_batches([self.length(p) for p in items], packing=True, batch_tokens=batch_tokens,
                            batch_size=1, seed=0, epoch=0, shuffle=False)
        for group in plan:
            pairs = [items[i] for i in group]
            batch = {k: v.to(device) for k, v in collate(self.rows(pairs), packing=True, pad_id=pad_id).items()}
            with autocast(device, precision):
                logps = reference_logps(ref, batch, adapters_off=adapters_off, chunk=self.chunk).tolist()
            for i, p in enumerate(pairs):
                p["chosen"]["ref_logp"], p["rejected"]["ref_logp"] = logps[2 * i], logps[2 * i + 1]
        self.precomputed, self.reference = True, None

    def __call__(self, model, batch):
        return preference_objective(model, batch, self.name, self.cfg, reference=self.reference, chunk=self.chunk)
