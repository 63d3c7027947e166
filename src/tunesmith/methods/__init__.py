"""Tuning methods. Each is a transform (`apply`) plus a parameter filter (`is_trainable`), with
optional hooks (optimizer options, per-epoch and per-step callbacks, the delta to save); see `base.py`.

A new method is one module here and one line in REGISTRY. The module holds the method's class and
its options (a `config.Config` subclass, the class's `Options`); the class also declares `paper`,
`when` (what to pick it for), `tiny` (options small enough for a tiny test model) and named
`variants`. The recipe's `method` section, `tunesmith methods` and the invariant tests are all
derived from REGISTRY. Compositions (`mam`, `longlora`) are built from other methods, not copied.
"""
from __future__ import annotations

from ..registry import load_entry
from .base import (Compose, Method, MethodBase, MethodError, attach, cast_frozen, count_parameters, delta_state,
                   mark_trainable)
from .lora import LoRA, LoRALinear, adapters_disabled

# name -> "module:Class"; imported on first use
REGISTRY = {
    "full": "full:Full",
    "freeze": "freeze:Freeze",
    "hft": "hft:HFT",
    "lora": "lora:LoRA",
    "sparse": "sparse:Sparse",
    "adapter": "adapters:Adapters",
    "prefix": "prefix:Prefix",
    "ia3": "ia3:IA3",
    "mam": "compose:MAM",
    "longlora": "compose:LongLoRA",
    "moe": "moe:MoE",
    "moe_lora": "moe_lora:MoELoRA",
}


def method_class(name: str):
    return load_entry(REGISTRY, __name__, name, "method", MethodError)


def build_method(cfg) -> Method:
    """The method named by `cfg.name` (a MethodConfig), configured by its options block."""
    return method_class(cfg.name)(getattr(cfg, cfg.name))


__all__ = ["Method", "MethodBase", "MethodError", "Compose", "REGISTRY", "build_method", "method_class", "attach",
           "mark_trainable", "cast_frozen", "count_parameters", "delta_state", "LoRALinear", "adapters_disabled"]
