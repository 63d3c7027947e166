"""Logit fusion: steer a large base model with the shift that tuning caused in a small model.

Models L (large base), S (small base) and experts S_t (S tuned on task t) share one vocabulary;
M are their next-token logits, P = softmax(M_L), Q = softmax(M_S), Q_t = softmax(M_t). Each
decoding step samples from

    P̃ = softmax(M_L + Σ_t α_t (M_t − M_S))

- `proxy` (proxy tuning, Liu et al., 2024): α fixed (1 by default) for every expert.
- `dynamic` (Dynamic Logit Fusion, Fan et al., NeurIPS 2024): α is chosen afresh at every step so
  that L moves away from its base as far as the expert moved away from S, in both KL directions:

      α* = argmin_{α∈[0,2]} (KL(P̃‖P) − KL(Q_t‖Q))² + (KL(P‖P̃) − KL(Q‖Q_t))²

  searched on a grid over [0, 2] (all grid values in one batched pass over the vocabulary), then
  on a finer grid around the best point. With several experts only one is active per step
  (the paper's speed-up): the one that moved furthest from S at this token, by the symmetric KL
  KL(Q_t‖Q) + KL(Q‖Q_t). An expert that barely moves has nothing to add here; choosing instead
  the expert with the lowest objective would always pick such an idle expert (α = 0 matches a
  zero shift perfectly), which turns fusion off exactly where an expert knows something.

Every step costs T + 2 forward passes (L, S and T experts), each batched over the prompts and
each model with its own KV cache. `FusedLM` wraps the models behind the small part of
transformers' `generate` contract that `tunesmith.infer.generate` uses, so `generate`,
`generate_file`, `chat` and `tunesmith.eval.runner.evaluate` all take a FusedLM in place of a model.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .generate import InferError, load_for_inference
from .sampling import next_tokens

MODES = ("proxy", "dynamic")
MAX_ALPHA = 2.0  # the paper's search interval is [0, 2]


class FuseError(InferError):
    """Models that cannot be fused, or bad fusion settings; the message says which."""


# ---- the fusion rule on one step's logits (rows = prompts of a batch)

# Logits of -inf (a token a model forbids) would make M_t − M_S and the KL terms NaN; a finite floor
# far below any real logit gives the token zero probability all the same.
_FLOOR = -1e4


def _finite(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().clamp_min(_FLOOR)


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) per row, from log-probabilities (..., V)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def fusion_objective(large, small, expert, alphas: torch.Tensor) -> torch.Tensor:
    """The paper's objective (B, K) at `alphas` (K,) or per row (B, K), for logits (B, V) of L, S
    and one expert.

    With Δ = M_t − M_S and P̃_α ∝ P·e^{αΔ}: log P̃_α − log P = αΔ − (lse(M_L + αΔ) − lse(M_L)), so
    KL(P̃‖P) = α E_P̃[Δ] − c_α and KL(P‖P̃) = c_α − α E_P[Δ] with c_α = lse(M_L + αΔ) − lse(M_L):
    one softmax over the vocabulary per α, all α at once.
    """
    large, small, expert = _finite(large), _finite(small), _finite(expert)
    log_q, log_qt = F.log_softmax(small, -1), F.log_softmax(expert, -1)
    target_fwd, target_rev = kl(log_qt, log_q), kl(log_q, log_qt)  # (B,)
    delta = expert - small  # (B, V)
    a = alphas.to(large).expand(large.shape[0], -1)[..., None]  # (B, K, 1)
    shifted = large[:, None, :] + a * delta[:, None, :]  # (B, K, V)
    c = torch.logsumexp(shifted, -1) - torch.logsumexp(large, -1)[:, None]  # (B, K)
    mean_fused = (F.softmax(shifted, -1) * delta[:, None, :]).sum(-1)  # E_P̃[Δ] (B, K)
    mean_base = (F.softmax(large, -1) * delta).sum(-1)[:, None]  # E_P[Δ] (B, 1)
    a = a[..., 0]
    kl_fwd = (a * mean_fused - c).clamp_min(0)  # KL(P̃‖P) ≥ 0; rounding can dip below
    kl_rev = (c - a * mean_base).clamp_min(0)
    return (kl_fwd - target_fwd[:, None]) ** 2 + (kl_rev - target_rev[:, None]) ** 2


def search_alpha(large, small, expert, grid: int = 11, refine: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """(α*, objective at α*) per row: the best of `grid` evenly spaced values in [0, 2], then of
    `refine` values spanning one coarse step either side of it (0 = no refinement)."""
    if grid < 2:
        raise FuseError(f"the α grid needs at least 2 points, got {grid}")
    coarse = torch.linspace(0, MAX_ALPHA, grid, device=large.device)
    values = fusion_objective(large, small, expert, coarse)  # (B, grid)
    best, where = values.min(-1)
    alpha = coarse[where]
    if refine > 1:
        step = MAX_ALPHA / (grid - 1)
        offsets = torch.linspace(-step, step, refine, device=large.device)
        fine = (alpha[:, None] + offsets[None, :]).clamp(0, MAX_ALPHA)  # (B, refine), per row
        fine_best, fine_where = fusion_objective(large, small, expert, fine).min(-1)
        better = fine_best < best
        alpha = torch.where(better, fine.gather(1, fine_where[:, None])[:, 0], alpha)
        best = torch.where(better, fine_best, best)
    return alpha, best


def fuse_logits(large, small, experts: list[torch.Tensor], mode: str = "dynamic", alpha: float = 1.0,
                grid: int = 11, refine: int = 11):
    """One step's fused logits (B, V), the α used per row (B,) and the active expert per row (B,;
    -1 = all experts, as in proxy mode)."""
    large, small = _finite(large), _finite(small)
    if mode == "proxy":
        shift = sum(_finite(e) - small for e in experts)
        rows = large.shape[0]
        return large + alpha * shift, large.new_full((rows,), alpha), torch.full((rows,), -1, dtype=torch.long)
    if mode != "dynamic":
        raise FuseError(f"fusion mode must be one of {', '.join(MODES)}, got {mode!r}")
    stacked = torch.stack([_finite(e) for e in experts])  # (T, B, V)
    if len(experts) == 1:
        chosen = torch.zeros(large.shape[0], dtype=torch.long, device=large.device)
    else:
        log_q, log_qt = F.log_softmax(small, -1), F.log_softmax(stacked, -1)
        moved = kl(log_qt, log_q[None]) + kl(log_q[None], log_qt)  # (T, B) symmetric KL from S
        chosen = moved.argmax(0)
    expert = stacked[chosen, torch.arange(large.shape[0], device=large.device)]  # (B, V)
    a, _ = search_alpha(large, small, expert, grid, refine)
    return large + a[:, None] * (expert - small), a, chosen.cpu()


# ---- the models, decoded together


@dataclass
class FusionStats:
    """What dynamic fusion chose: one α (and active expert) per decoded token of each row."""

    alphas: list[float] = field(default_factory=list)
    experts: list[int] = field(default_factory=list)

    def add(self, alpha: torch.Tensor, expert: torch.Tensor, live: torch.Tensor) -> None:
        self.alphas += alpha[live].tolist()
        self.experts += expert[live].tolist()

    def summary(self) -> dict:
        if not self.alphas:
            return {"tokens": 0}
        a = torch.tensor(self.alphas)
        out = {"tokens": len(self.alphas), "alpha_mean": float(a.mean()), "alpha_std": float(a.std(unbiased=False)),
               "alpha_min": float(a.min()), "alpha_max": float(a.max()),
               "alpha_at_0": float((a == 0).float().mean()), "alpha_at_2": float((a == MAX_ALPHA).float().mean()),
               "alpha_quartiles": [float(q) for q in torch.quantile(a, torch.tensor([0.25, 0.5, 0.75]))]}
        if any(e >= 0 for e in self.experts):
            counts = torch.bincount(torch.tensor(self.experts).clamp_min(0))
            out["expert_share"] = [round(float(c) / len(self.experts), 4) for c in counts]
        return out


class FusedLM(torch.nn.Module):
    """A large model steered by small experts, usable wherever tunesmith takes a model to generate.

    It implements `generate(input_ids, attention_mask, ...)` as `tunesmith.infer.generate` calls it
    (left-padded batch in, prompt + new tokens out, rows padded after their stop token), greedy or
    sampled, so batching, stop tokens, JSONL files, chat and evaluation need no second code path.
    `stats` accumulates the α chosen per generated token.
    """

    def __init__(self, large, small, experts: list, mode: str = "dynamic", alpha: float = 1.0,
                 grid: int = 11, refine: int = 11):
        super().__init__()
        if mode not in MODES:
            raise FuseError(f"fusion mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not experts:
            raise FuseError("logit fusion needs at least one expert (a tuned small model)")
        if mode == "dynamic" and grid < 2:
            raise FuseError(f"the α grid needs at least 2 points, got {grid}")
        self.large, self.small, self.experts = large, small, torch.nn.ModuleList(experts)
        self.mode, self.alpha, self.grid, self.refine = mode, alpha, grid, refine
        self.stats = FusionStats()

    @property
    def generation_config(self):
        return getattr(self.large, "generation_config", None)

    @property
    def members(self) -> list:
        return [self.large, self.small, *self.experts]

    def _step_logits(self, caches, input_ids, mask, positions):
        """Last-position logits (B, V) of every member, each continuing its own KV cache."""
        out = []
        for i, m in enumerate(self.members):
            name = _cache_keyword(m)
            res = m(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{name: caches[i]})
            caches[i] = getattr(res, name)
            out.append(res.logits[:, -1])
        return out

    @torch.inference_mode()
    def generate(self, input_ids, attention_mask, max_new_tokens: int, eos_token_id, pad_token_id: int,
                 streamer=None, temperature=None, top_p=None, top_k=None, do_sample: bool = False, **_):
        """Prompt + generated tokens (B, prompt + steps); the transformers keywords tunesmith uses."""
        stops = torch.tensor(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])
        device = input_ids.device
        mask = attention_mask.clone()
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        caches = [None] * len(self.members)
        live = torch.ones(input_ids.shape[0], dtype=torch.bool, device=device)
        seq, step_ids = input_ids, input_ids
        if streamer is not None:
            streamer.put(input_ids.cpu())
        for _ in range(max_new_tokens):
            large, small, *experts = self._step_logits(caches, step_ids, mask, positions)
            fused, alpha, chosen = fuse_logits(large, small, experts, self.mode, self.alpha, self.grid, self.refine)
            nxt = next_tokens(fused, temperature if do_sample else None, top_p, top_k)
            self.stats.add(alpha.cpu(), chosen, live.cpu())
            nxt = torch.where(live, nxt, torch.full_like(nxt, pad_token_id))
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            if streamer is not None:
                streamer.put(nxt.cpu())
            live &= ~torch.isin(nxt, stops.to(device))
            if not live.any():
                break
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            positions = positions[:, -1:] + 1
            step_ids = nxt[:, None]
        if streamer is not None:
            streamer.end()
        return seq


def _cache_keyword(model) -> str:
    """The KV cache's name in `forward` and its output: `cache` in recent transformers, else
    `past_key_values` (the old name, deprecated)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# ---- building one from model names


def check_vocab(named: list[tuple[str, object, object]]) -> None:
    """Raise FuseError unless every (name, model, tokenizer) shares the first one's vocabulary:
    the same tokens with the same ids, and the same logit width (fusion adds logits id by id)."""
    ref_name, ref_model, ref_tok = named[0]
    ref_vocab, ref_width = ref_tok.get_vocab(), ref_model.get_output_embeddings().weight.shape[0]
    for name, model, tok in named[1:]:
        if len(tok) != len(ref_tok):
            raise FuseError(f"{name}: its tokenizer has {len(tok)} tokens, {ref_name}'s {len(ref_tok)}: "
                            "logit fusion needs one shared vocabulary")
        if tok.get_vocab() != ref_vocab:
            raise FuseError(f"{name}: its tokenizer maps tokens to other ids than {ref_name}'s: "
                            "logit fusion needs one shared vocabulary")
        width = model.get_output_embeddings().weight.shape[0]
        if width != ref_width:
            raise FuseError(f"{name}: it outputs {width} logits, {ref_name} {ref_width}: "
                            "logit fusion needs one shared vocabulary")


def _load_expert(expert: str, small: str, dtype: str):
    """A full model (folder or full-tuning run folder), else an adapter applied to `small`."""
    p = Path(expert).expanduser()
    if (p / "config.json").is_file() or (p / "model" / "config.json").is_file():
        return load_for_inference(expert, dtype=dtype)
    return load_for_inference(small, adapter=expert, dtype=dtype)


def load_fused(large: str | None, small: str, experts: list[str], mode: str = "dynamic", alpha: float = 1.0,
               dtype: str = "fp32", grid: int = 11, refine: int = 11):
    """(FusedLM, tokenizer): `large` (None: the embedded model), its small base `small`, and each
    expert as a small-model folder, full-tuning run folder, or adapter/run folder on `small`."""
    big, tok = load_for_inference(large, dtype=dtype)
    base, base_tok = load_for_inference(small, dtype=dtype)
    named = [(large or "the large model", big, tok), (small, base, base_tok)]
    for e in experts:
        m, t = _load_expert(e, small, dtype)
        named.append((e, m, t))
    check_vocab(named)
    fused = FusedLM(big, base, [m for _, m, _ in named[2:]], mode=mode, alpha=alpha, grid=grid, refine=refine)
    return fused.eval(), tok


def format_stats(fused: FusedLM) -> str:
    """One line on the α fusion used, for the CLI."""
    s = fused.stats.summary()
    head = f"fusion {fused.mode}, {len(fused.experts)} expert(s)"
    if not s["tokens"]:
        return f"{head}: no tokens generated"
    if fused.mode == "proxy":
        return f"{head}: α = {fused.alpha:g} on {s['tokens']} tokens"
    q1, q2, q3 = s["alpha_quartiles"]
    line = (f"{head}: {s['tokens']} tokens, α mean {s['alpha_mean']:.2f} ± {s['alpha_std']:.2f}, "
            f"quartiles {q1:.2f}/{q2:.2f}/{q3:.2f}, α=0 {100 * s['alpha_at_0']:.0f}%, α=2 {100 * s['alpha_at_2']:.0f}%")
    if len(fused.experts) > 1:
        line += ", active expert share " + "/".join(f"{100 * x:.0f}%" for x in s["expert_share"])
    return line


def load_fused_args(large, adapter, small, experts, mode, alpha, dtype):
    """`load_fused` from command-line values, with their combinations checked first."""
    if adapter is not None:
        raise FuseError("--adapter does not combine with fusion: give the tuned small model as --fuse-expert")
    if not small:
        raise FuseError("--fuse-expert needs --fuse-small, the small base model the experts were tuned from")
    if not experts:
        raise FuseError("--fuse-small needs at least one --fuse-expert (a tuned small model)")
    return load_fused(large, small, list(experts), mode=mode, alpha=alpha, dtype=dtype)
