"""Tuning methods. Each is a transform (`apply`) plus a parameter filter (`is_trainable`)."""
from __future__ import annotations

from .base import Method, MethodError, cast_frozen, count_parameters, mark_trainable
from .full import Full
from .lora import LoRA, LoRALinear, adapters_disabled

REGISTRY = {"lora": LoRA, "full": Full}


def build_method(cfg) -> Method:
    """The method named by `cfg.name` (a MethodConfig), configured by its options block."""
    if cfg.name not in REGISTRY:
        raise MethodError(f"unknown method `{cfg.name}`; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[cfg.name](getattr(cfg, cfg.name))


__all__ = ["Method", "MethodError", "REGISTRY", "build_method", "mark_trainable", "cast_frozen",
           "count_parameters", "LoRALinear", "adapters_disabled"]
