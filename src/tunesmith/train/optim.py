"""AdamW with decoupled weight decay, and warm-up + cosine/linear/constant schedules."""
from __future__ import annotations

import math

import torch


def no_decay(name: str, param) -> bool:
    """Biases, norms, embeddings' 1-D params and low-rank adapters take no weight decay."""
    return param.ndim < 2 or "norm" in name.lower() or ".lora_" in name


def build_optimizer(model, cfg) -> torch.optim.AdamW:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": plain, "weight_decay": 0.0}) if g["params"]]
    device = next(iter(groups[0]["params"])).device
    # fused AdamW exists for CPU and CUDA in recent torch; foreach is the safe fallback.
    kwargs = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), foreach=True)


def warmup_steps(cfg, total_steps: int) -> int:
    return int(round(cfg.warmup * total_steps)) if cfg.warmup < 1 else int(cfg.warmup)


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer, cfg, total_steps: int):
    w = warmup_steps(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, w, cfg.schedule, cfg.min_lr_ratio)
    )
