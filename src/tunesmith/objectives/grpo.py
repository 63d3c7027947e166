"""GRPO's math (Shao et al., 2024, DeepSeekMath §4.1): group-relative advantages, per-token
log-probs of sampled completions, and the clipped surrogate with a k3 KL penalty.

    A = group_advantages(rewards)                       # (P, G): P prompts, G completions each
    logp = token_logps(model, batch)                    # (N,) one per completion token of the batch
    loss_sum, n, metrics = grpo_loss(logp, old_logp, adv_per_token, ref_logp, epsilon=0.2, kl_beta=0.04)

Like the SFT objective, the loss is a *sum* over tokens: the caller divides by the completion
tokens of the whole step (token-level aggregation, DAPO §3.3), so a long answer counts per token
rather than per sample and micro-batching does not change the gradient.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .sft import forward_hidden


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(P, G) rewards -> (P, G) advantages: the reward minus its group's mean, divided by the
    group's standard deviation + eps when `scale` (GRPO), only centred otherwise (Dr. GRPO,
    Liu et al., 2025: the std division up-weights groups that are nearly all right or all wrong).
    The std is the sample std (n − 1), as in the paper's reference implementations."""
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be (prompts, samples), got shape {tuple(rewards.shape)}")
    r = rewards.to(torch.float32)
    centred = r - r.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    std = r.std(dim=1, keepdim=True) if r.shape[1] > 1 else torch.zeros_like(r[:, :1])
    return centred / (std + eps)


def _chunk_logps(head, h, targets, temperature: float):
    logits = head(h).float()  # (n, vocab), fp32 whatever the autocast dtype
    if temperature != 1.0:
        logits = logits / temperature
    # log_softmax gathered at the target, without materialising the (n, vocab) log-probs
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps(model, batch: dict, chunk: int = 1024, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) for every trained target of a collated batch: (N,) in the order of
    `batch["weights"][:, 1:] > 0` flattened (row by row, left to right).

    As in the SFT loss, only trained positions go through the lm_head, `chunk` at a time, each
    chunk recomputed in backward. `temperature` divides the logits, so the log-probs are those of
    the distribution the completions were sampled from (TRL does the same)."""
    hidden = forward_hidden(model, batch)  # (B, T, d)
    keep = batch["weights"][:, 1:] > 0  # position t predicts token t+1
    h = hidden[:, :-1][keep]  # (N, d)
    targets = batch["input_ids"][:, 1:][keep]  # (N,)
    head = model.get_output_embeddings()
    parts = []
    chunk = chunk if chunk > 0 else max(h.shape[0], 1)  # 0: one piece
    for i in range(0, h.shape[0], chunk):
        sl = slice(i, i + chunk)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logps, head, h[sl], targets[sl], temperature, use_reentrant=False))
        else:
            parts.append(_chunk_logps(head, h[sl], targets[sl], temperature))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
              ref_logp: torch.Tensor | None = None, epsilon: float = 0.2, kl_beta: float = 0.0):
    """The clipped surrogate per token, summed.

    ratio = exp(logp − old_logp); objective = min(ratio·A, clip(ratio, 1−ε, 1+ε)·A);
    loss = −objective + kl_beta · KL, with KL the k3 estimator exp(ref − logp) − (ref − logp) − 1
    (unbiased for KL(π‖π_ref), always ≥ 0; Schulman, 2020).

    Args:
        logp: (N,) log-probs of the current policy (with grad).
        old_logp: (N,) log-probs of the policy that sampled the completions (no grad).
        advantages: (N,) each completion's advantage repeated over its tokens.
        ref_logp: (N,) log-probs of the reference model; needed when kl_beta > 0.

    Returns:
        (loss_sum, n_tokens, metrics): metrics are means over these tokens: `clip_fraction` (tokens
        whose ratio is clipped, i.e. carry no gradient), `ratio`, and `kl` when a reference is given.
    """
    if kl_beta > 0 and ref_logp is None:
        raise ValueError("kl_beta > 0 needs the reference log-probs (ref_logp)")
    old_logp, advantages = old_logp.detach(), advantages.detach().to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    n = logp.numel()
    with torch.no_grad():
        is_clipped = ((ratio > 1.0 + epsilon) & (advantages > 0)) | ((ratio < 1.0 - epsilon) & (advantages < 0))
        metrics = {"clip_fraction": float(is_clipped.float().mean()) if n else 0.0,
                   "ratio": float(ratio.mean()) if n else 1.0}
    if ref_logp is not None:
        d = ref_logp.detach() - logp
        kl = torch.exp(d) - d - 1.0
        metrics["kl"] = float(kl.detach().mean()) if n else 0.0
        if kl_beta > 0:
            per_token = per_token + kl_beta * kl
    return per_token.sum(), n, metrics
