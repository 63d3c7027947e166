"""AdamW with decoupled weight decay, and warm-up + cosine/linear/constant schedules."""
from __future__ import annotations

import math

import torch


def no_decay(name: str, param) -> bool:
    """Biases, norms, embeddings' 1-D params and low-rank adapters take no weight decay."""
    return param.ndim < 2 or "norm" in name.lower() or ".lora_" in name


def build_optimizer(model, cfg, method=None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, one group per (weight decay, lr scale); a method may set
    both per parameter (`optimizer_options`: LoRA+'s faster B, SpIEL's decay toward the base)."""
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            options = method.optimizer_options(name, p) if method is not None else {}
            decay = bool(options.get("decay", not no_decay(name, p)))
            groups.setdefault((decay, float(options.get("lr_scale", 1.0))), []).append(p)
    param_groups = [{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": cfg.lr * scale}
                    for (decay, scale), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]
    if hasattr(method, "make_optimizer"):  # a method with its own update rule (SpIEL: per-entry Adam, SM3)
        return method.make_optimizer(model, param_groups, cfg)
    device = param_groups[0]["params"][0].device
    # fused AdamW exists for CPU and CUDA in recent torch; foreach is the safe fallback.
    impl = getattr(cfg, "adamw", "fused")
    if impl == "fused" and device.type not in ("cuda", "cpu"):
        impl = "foreach"
    kwargs = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[impl]
    try:
        return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), foreach=True)


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
