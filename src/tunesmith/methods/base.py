"""The method protocol (He et al., ICLR 2022, "a unified view of parameter-efficient tuning").

A method says *where* it acts (modules chosen by type and name), *what* it adds (a weight delta,
an activation delta, extra keys/values), *how* that composes, and *which base parameters train*.
In code a method is two things: `apply(model)`, a transform that wraps the chosen modules in
place, and `is_trainable(name, param)`, a filter naming the parameters the optimizer sees.
There is no model subclass per method, and base checkpoint keys never change: a wrapped
`q_proj` still holds `q_proj.weight`, its new tensors sit beside it (`q_proj.lora_a`, ...).

What every method has:
- `name`; `output`: "adapter" (its delta is saved on its own) or "model" (it trains base weights:
  the whole model is saved); `mergeable`;
- `apply(model)`: the transform; `is_trainable(name, param)`: the filter;
- `merge(model)`: fold the delta into the base weights, or raise MethodError saying why it cannot;
- the delta keys: `attach(model, method)` records on the method the plain model's state-dict keys
  (`method.base_keys`) and the parameters marked trainable (`method.trained_names`);
  `delta_state(model, method)` is then every trained parameter plus every tensor `apply` added.

Optional hooks (`MethodBase` gives each a no-op default), called by the loop in this order:
- `optimizer_options(name, param)`: per-parameter `lr_scale` / `decay` for the optimizer groups;
- `on_train_start(model, total_steps)`: once the run's length is known;
- `on_epoch(model, epoch, optimizer)`: before each epoch's first step (and a resumed run's);
- `after_step(model, step, optimizer)`: after every optimizer step, gradients still present;
- `describe(model)`: one line printed after the method is applied;
- `export_delta(model)`: (tensors, options) to save, when the inference form differs from the
  training form (prefix tuning folds its MLP; PiSSA saves plain LoRA on the original base);
- `make_optimizer(model, param_groups, train_cfg)`, probed with hasattr: a method with its own update
  rule (SpIEL);
- `aux_loss(model)`: (a loss tensor or None, metrics) read after each training forward, e.g. a learned
  MoE router's load-balancing and z-losses and its expert shares. The loss is a per-step mean: the
  harness's LossModule adds it times the micro-batch's loss units to the objective's loss sum (the
  metrics the same way), so after the window's division it counts once per step whatever the
  accumulation. It is not added to validation loss (no-grad forwards), which stays the objective's.

A method keeps what it knows about the model on itself, never on the transformers model (no
attributes set on it). It knows nothing of file formats: `tunesmith.export` writes our adapter
folder and PEFT's layout from the method's options and the model; nothing here imports `export`.

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
    base_keys: frozenset[str] | None  # the plain model's state-dict keys, recorded by `attach`
    trained_names: tuple[str, ...]  # the parameters marked trainable, recorded by `attach`

    def apply(self, model: nn.Module) -> None:
        """Wrap the chosen modules of `model` in place (base keys unchanged; new tensors beside them)."""

    def is_trainable(self, name: str, param: nn.Parameter) -> bool:
        """Whether the parameter `name` trains."""

    def merge(self, model: nn.Module) -> None:
        """Fold the method's deltas into the base weights, leaving a plain transformers model.
        Methods that cannot merge raise MethodError."""

    def record(self, base_keys: frozenset[str] | None, trained_names) -> None:
        """Called by `mark_trainable`/`attach`: remember the base keys and the trainable parameters."""

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

    def describe(self, model: nn.Module) -> str:
        """One line the loop prints after applying the method (e.g. HFT's exact trained fraction); may be ''."""

    def aux_loss(self, model: nn.Module) -> tuple[torch.Tensor | None, dict[str, float]]:
        """(an auxiliary loss of the last forward, as a per-step mean, or None; metrics to log as
        per-step means). E.g. a learned router's load balance; (None, {}) for most methods."""

    def export_delta(self, model: nn.Module) -> tuple[dict, object]:
        """(tensors, options block) to save as the adapter: by default the delta state and this
        method's options. A method whose training form differs from its inference form (prefix
        tuning's MLP reparameterisation) returns the folded tensors and the options that rebuild them."""


class MethodBase:
    """Defaults for the optional parts of the protocol."""

    name = ""
    output = "adapter"
    mergeable = False
    base_keys: frozenset[str] | None = None  # set by `record`, per instance
    trained_names: tuple[str, ...] = ()

    def __init__(self, cfg=None):
        self.cfg = cfg

    def record(self, base_keys: frozenset[str] | None, trained_names) -> None:
        self.base_keys = None if base_keys is None else frozenset(base_keys)
        self.trained_names = tuple(trained_names)

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

    def describe(self, model: nn.Module) -> str:
        return ""

    def aux_loss(self, model: nn.Module):
        return None, {}

    def export_delta(self, model: nn.Module):
        return delta_state(model, self), self.cfg


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

    def record(self, base_keys: frozenset[str] | None, trained_names) -> None:
        """Every part sees the whole record (a part's own export filters the delta by its names)."""
        super().record(base_keys, trained_names)
        for part in self.parts:
            part.record(base_keys, trained_names)

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

    def aux_loss(self, model: nn.Module):
        """The parts' auxiliary losses summed (None if no part has one); their metrics together."""
        total, metrics = None, {}
        for part in self.parts:
            loss, part_metrics = part.aux_loss(model)
            if loss is not None:
                total = loss if total is None else total + loss
            metrics.update(part_metrics)
        return total, metrics


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear inside the transformer blocks (not the lm_head, not embeddings): a decoder's
    `layers.N` (`h.N`, `blocks.N`), a BERT-like encoder's `encoder.layer.N` (the bare body has no prefix)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and mod is not head and re.search(r"(^|\.)(layers|layer|h|blocks)\.\d+\.", name + ".")
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


def mark_trainable(model: nn.Module, method: Method, base_keys: frozenset[str] | None = None) -> list[str]:
    """Set requires_grad from the method's filter; record on the method the names of the trainable
    parameters (and `base_keys`, the plain model's keys, when known); return those names."""
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(bool(method.is_trainable(name, p)))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise MethodError(f"method `{method.name}` left no parameter trainable")
    method.record(base_keys, names)
    return names


def attach(model: nn.Module, method: Method) -> list[str]:
    """Apply `method` to a plain model and mark what trains. The method records the base keys and the
    trained names, so its delta (trained parameters + every tensor it added) saves and loads on its own."""
    base_keys = frozenset(model.state_dict())
    method.apply(model)
    return mark_trainable(model, method, base_keys)


def delta_state(model: nn.Module, method: Method) -> dict[str, torch.Tensor]:
    """The tensors that make a tuned model differ from its base: every parameter the method marked
    trainable (also while it has frozen one for an epoch) and every tensor it added to the plain
    model (e.g. sparse indices), as `attach` recorded them on the method. A new name for a base tensor
    (MoE-LoRA's experts share the frozen MLP's weights) is not a new tensor: it is left out."""
    trained = set(method.trained_names)
    base_keys = method.base_keys
    full = model.state_dict(keep_vars=True)
    base_ids = {id(t) for n, t in full.items() if base_keys is not None and n in base_keys}
    state = {}
    for name, t in full.items():
        param = isinstance(t, nn.Parameter)
        added = base_keys is not None and name not in base_keys and id(t) not in base_ids
        if name in trained or (param and t.requires_grad) or added:
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
