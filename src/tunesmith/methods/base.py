"""The method protocol (He et al., ICLR 2022, "a unified view of parameter-efficient tuning").

A method says *where* it acts (modules chosen by type and name), *what* it adds (a weight delta,
an activation delta, extra keys/values), *how* that composes, and *which base parameters train*.
In code a method is two things: `apply(model)`, a transform that wraps the chosen modules in
place, and `is_trainable(name, param)`, a filter naming the parameters the optimizer sees.
There is no model subclass per method, and base checkpoint keys never change: a wrapped
`q_proj` still holds `q_proj.weight`, its new tensors sit beside it (`q_proj.lora_a`, ...).

A new method is one file in this folder plus one line in `methods/__init__.py` (and its options
block in `recipe.py`); the loop, checkpoints and export do not change.
"""
from __future__ import annotations

import re
from typing import Protocol

import torch
from torch import nn


class MethodError(ValueError):
    """A method was configured in a way that cannot apply to this model."""


class Method(Protocol):
    name: str

    def apply(self, model: nn.Module) -> None:
        """Wrap the chosen modules of `model` in place."""

    def is_trainable(self, name: str, param: nn.Parameter) -> bool:
        """Whether the parameter `name` trains."""

    def merge(self, model: nn.Module) -> None:
        """Fold the method's deltas into the base weights, leaving a plain transformers model.
        Methods that cannot merge raise MethodError."""


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear inside the transformer blocks (not the lm_head, not embeddings)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and mod is not head and re.search(r"\.(layers|h|blocks)\.\d+\.", name + ".")
    ]


def select_modules(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Linear]]:
    """Resolve target patterns to Linear modules; raise naming any target that matched nothing.

    A target is `all-linear`, a module's last name (`q_proj`), a dotted suffix
    (`self_attn.q_proj`), or a regular expression matched against the full name.
    """
    candidates = decoder_linears(model)
    if not candidates:
        raise MethodError("found no Linear layers inside transformer blocks to adapt")
    chosen: dict[str, nn.Linear] = {}
    for target in targets:
        if target == "all-linear":
            hits = candidates
        else:
            hits = [
                (n, m)
                for n, m in candidates
                if n == target or n.endswith("." + target) or re.fullmatch(target, n)
            ]
        if not hits:
            names = sorted({n.split(".")[-1] for n, _ in candidates})
            raise MethodError(f"target `{target}` matches no Linear layer; this model has: {', '.join(names)}")
        chosen.update(hits)
    return sorted(chosen.items(), key=lambda kv: kv[0])


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def mark_trainable(model: nn.Module, method: Method) -> list[str]:
    """Set requires_grad from the method's filter; return the names of trainable parameters."""
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(bool(method.is_trainable(name, p)))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise MethodError(f"method `{method.name}` left no parameter trainable")
    return names


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Store frozen parameters in `dtype` (e.g. bf16 base weights under LoRA); trainable stay fp32."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors count once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
