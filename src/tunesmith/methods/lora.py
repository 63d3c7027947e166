"""LoRA (Hu et al., 2021): a frozen Linear plus a low-rank update, y = W x + s · B A x.

A is (r, in), Kaiming-uniform; B is (out, r), zero — so training starts exactly at the base model.
The scale s is alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023), which keeps the
update's magnitude stable as r grows.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import MethodBase, select_modules, set_module


class LoRALinear(nn.Linear):
    """An nn.Linear that keeps its own `weight`/`bias` keys and adds `lora_a`, `lora_b`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same tensors: keys and storage unchanged
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scale = alpha / (math.sqrt(rank) if rslora else rank)
        dev = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_b @ self.lora_a)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return y
        h = self.lora_dropout(x)
        if not torch.is_autocast_enabled(h.device.type):
            h = h.to(self.lora_a.dtype)
        return y + (self.scale * F.linear(F.linear(h, self.lora_a), self.lora_b)).to(y.dtype)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + s·BA (in the base weight's dtype)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_((self.weight.float() + self.delta_weight().float()).to(self.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, rslora={self.rslora}"


class LoRA(MethodBase):
    """The `lora` method: wrap target Linears in LoRALinear; only lora_a/lora_b train."""

    name = "lora"
    mergeable = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.targets: list[str] = []

    def apply(self, model: nn.Module) -> None:
        for name, mod in select_modules(model, self.cfg.targets):
            if isinstance(mod, LoRALinear):
                continue
            set_module(model, name, LoRALinear(mod, self.cfg.rank, self.cfg.alpha, self.cfg.dropout, self.cfg.rslora))
            self.targets.append(name)

    def is_trainable(self, name: str, param) -> bool:
        return name.endswith((".lora_a", ".lora_b"))

    def merge(self, model: nn.Module) -> None:
        for name, mod in list(model.named_modules()):
            if isinstance(mod, LoRALinear):
                set_module(model, name, mod.merged())

    def peft_export(self, model: nn.Module, base_model: str):
        from ..export.peft_format import lora_payload

        return lora_payload(model, self.cfg, base_model)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model without its LoRA deltas (a reference model without a second copy)."""
    mods = list(lora_modules(model).values())
    previous = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(mods, previous):
            m.disabled = d
