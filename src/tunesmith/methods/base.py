"""The method protocol (He et al., ICLR 2022, "a unified view of parameter-efficient tuning").

A method says *where* it acts (modules chosen by type and name), *what* it adds (a weight delta,
an activation delta, extra keys/values), *how* that composes, and *which base parameters train*.
In code a method is two things: `apply(model)`, a transform that wraps the chosen modules in
place, and `is_trainable(name, param)`, a filter naming the parameters the optimizer sees.
There is no model subclass per method, and base checkpoint keys never change: a wrapped
`q_proj` still holds `q_proj.weight`, its new tensors sit beside it (`q_proj.lora_a`, ...).

A new method is one file in this folder (the class and its options) plus one line in
`methods/__init__.py`; the recipe, the catalog, the loop, checkpoints and export do not change.
"""
from __future__ import annotations

import re
from typing import Protocol

import torch
from torch import nn


class MethodError(ValueError):
    """A method was configured in a way that cannot apply to this model."""


class Method(Protocol):
    """What the loop, checkpoints and export need from a method. `MethodBase` gives every optional
    hook a default, so a method defines only what it changes."""

    name: str
    output: str  # "adapter": a delta saved on its own; "model": it trains base weights, save the model
    mergeable: bool  # merge() folds the delta into the base weights

    def apply(self, model: nn.Module) -> None:
        """Wrap the chosen modules of `model` in place (base keys unchanged; new tensors beside them)."""

    def is_trainable(self, name: str, param: nn.Parameter) -> bool:
        """Whether the parameter `name` trains."""

    def merge(self, model: nn.Module) -> None:
        """Fold the method's deltas into the base weights, leaving a plain transformers model.
        Methods that cannot merge raise MethodError."""

    def optimizer_options(self, name: str, param: nn.Parameter) -> dict:
        """Per-parameter optimizer options: `lr_scale` (a multiple of train.lr, e.g. LoRA+'s B) and
        `decay` (whether weight decay applies). {} keeps the defaults."""

    def on_train_start(self, model: nn.Module, total_steps: int) -> None:
        """Called once the run's length is known (e.g. SpIEL's regrow fraction decays over it)."""

    def on_epoch(self, model: nn.Module, epoch: int, optimizer=None) -> None:
        """Called before the first step of every epoch (and of a resumed run), with the optimizer (e.g.
        HFT redraws its half and drops the optimizer state of parameters that left it)."""

    def after_step(self, model: nn.Module, step: int, optimizer) -> None:
        """Called after every optimizer step, gradients still present; e.g. SpIEL's prune/regrow."""

    def peft_export(self, model: nn.Module, base_model: str) -> tuple[dict, dict] | None:
        """(adapter_config.json, tensors in PEFT's names) where PEFT has this method, else None."""

    def describe(self, model: nn.Module) -> str:
        """One line the loop prints after applying the method (e.g. HFT's exact trained fraction); may be ''."""

    def export_delta(self, model: nn.Module) -> tuple[dict, object]:
        """(tensors, options block) to save as the adapter: by default the delta state and this
        method's options. A method whose training form differs from its inference form (prefix
        tuning's MLP reparameterisation) returns the folded tensors and the options that rebuild them."""


class MethodBase:
    """Defaults for the optional parts of the protocol."""

    name = ""
    output = "adapter"
    mergeable = False

    def __init__(self, cfg=None):
        self.cfg = cfg

    def apply(self, model: nn.Module) -> None:
        raise NotImplementedError

    def is_trainable(self, name: str, param) -> bool:
        raise NotImplementedError

    def merge(self, model: nn.Module) -> None:
        raise MethodError(f"method `{self.name}` cannot be merged into the base weights (its delta is not "
                          "a weight delta); load the adapter with the base model instead")

    def optimizer_options(self, name: str, param) -> dict:
        return {}

    def on_train_start(self, model: nn.Module, total_steps: int) -> None:
        return None

    def on_epoch(self, model: nn.Module, epoch: int, optimizer=None) -> None:
        return None

    def after_step(self, model: nn.Module, step: int, optimizer) -> None:
        return None

    def peft_export(self, model: nn.Module, base_model: str):
        return None

    def describe(self, model: nn.Module) -> str:
        return ""

    def export_delta(self, model: nn.Module):
        return delta_state(model), self.cfg


class Compose(MethodBase):
    """Several methods as one (e.g. MAM = prefix on attention + parallel adapter on the FFN): applied
    in order; a parameter trains if any part trains it; merging needs every part to merge."""

    def __init__(self, name: str, parts: list, cfg=None, output: str | None = None):
        super().__init__(cfg)
        self.name, self.parts = name, list(parts)
        self.output = output or ("model" if all(p.output == "model" for p in self.parts) else "adapter")
        self.mergeable = all(p.mergeable for p in self.parts)

    def apply(self, model: nn.Module) -> None:
        for part in self.parts:
            part.apply(model)

    def is_trainable(self, name: str, param) -> bool:
        return any(part.is_trainable(name, param) for part in self.parts)

    def merge(self, model: nn.Module) -> None:
        if not self.mergeable:
            odd = [p.name for p in self.parts if not p.mergeable]
            raise MethodError(f"method `{self.name}` cannot be merged: its part(s) {', '.join(odd)} do not merge")
        for part in self.parts:
            part.merge(model)

    def optimizer_options(self, name: str, param) -> dict:
        options = {}
        for part in self.parts:
            if part.is_trainable(name, param):
                options.update(part.optimizer_options(name, param))
        return options

    def on_train_start(self, model: nn.Module, total_steps: int) -> None:
        for part in self.parts:
            part.on_train_start(model, total_steps)

    def on_epoch(self, model: nn.Module, epoch: int, optimizer=None) -> None:
        for part in self.parts:
            part.on_epoch(model, epoch, optimizer)

    def after_step(self, model: nn.Module, step: int, optimizer) -> None:
        for part in self.parts:
            part.after_step(model, step, optimizer)

    def describe(self, model: nn.Module) -> str:
        return " · ".join(d for d in (part.describe(model) for part in self.parts) if d)


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
    model._tunesmith_trained = tuple(names)
    return names


def attach(model: nn.Module, method: Method) -> list[str]:
    """Apply `method` to a plain model and mark what trains; remember the base keys, so the delta
    (trained parameters + every tensor the method added) can be saved and loaded on its own."""
    base_keys = frozenset(model.state_dict())
    method.apply(model)
    model._tunesmith_base_keys = base_keys
    return mark_trainable(model, method)


def delta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that make a tuned model differ from its base: every parameter marked trainable
    (also while a method has frozen it for an epoch) and every tensor the method added (e.g. sparse
    indices). Without `attach` bookkeeping, the parameters that require grad."""
    trained = set(getattr(model, "_tunesmith_trained", ()))
    base_keys = getattr(model, "_tunesmith_base_keys", None)
    state = {}
    for name, t in model.state_dict(keep_vars=True).items():
        param = isinstance(t, nn.Parameter)
        if name in trained or (param and t.requires_grad) or (base_keys is not None and name not in base_keys):
            state[name] = t.detach()
    return state


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
