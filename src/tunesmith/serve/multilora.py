"""Many LoRA adapters on one base model, chosen per row of a batch (as vLLM's multi-LoRA does).

A target Linear becomes a MultiLoRALinear holding the same weight and bias plus, per loaded
adapter, its factors (A (r, in), B (out, r), scale). Its forward is the base product for every
row, then for each adapter present in the batch, y[rows] += s · B A x[rows], computed the way
LoRALinear computes it (in A's dtype, then cast back), so a row gets what the adapter gives it alone.
The rows of each adapter come from the engine's `Route`, set before every forward.

Only plain LoRA (and rsLoRA, which only changes the scale) has this form; DoRA's per-row
normalisation does not, and other methods are served as their own merged model instead.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from tunesmith.export.atomic import ExportError
from tunesmith.export.peft_format import adapter_folder, read_peft
from tunesmith.export.tuned import DELTA_FILE, METHOD_FILE, read_method
from tunesmith.methods.base import set_module
from tunesmith.models.rope import rope_record

from .engine import Route


class MultiLoRALinear(nn.Linear):
    """An nn.Linear (same weight and bias tensors) plus the factors of every loaded LoRA adapter."""

    def __init__(self, base: nn.Linear, route: Route):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.route = route
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (B, T, out)
        for name, rows in self.route.groups:
            factors = self.factors.get(name)
            if factors is None:  # this adapter leaves the module alone
                continue
            a, b, scale = factors
            if len(rows) == x.shape[0]:  # every row: no gather or scatter
                y = y + (scale * F.linear(F.linear(x.to(a.dtype), a), b)).to(y.dtype)
                continue
            h = x.index_select(0, rows).to(a.dtype)
            # index_copy_ rather than index_add_: on CPU the latter runs a scatter that took ~40 ms for a
            # (1, 1, 128) update (measured, torch 2.13), longer than the whole layer
            y.index_copy_(0, rows, y.index_select(0, rows) + (scale * F.linear(F.linear(h, a), b)).to(y.dtype))
        return y


def lora_factors(path, model: nn.Module) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None:
    """(scale, {module: (A, B)}) of a plain-LoRA adapter folder (ours or PEFT's) on `model`; None when
    the adapter is another method, a LoRA variant without this form (DoRA), or trained on other RoPE
    positions than `model` runs with (it then needs a base of its own)."""
    folder = adapter_folder(path)
    cfg, meta = read_method(folder)
    if cfg.name != "lora" or cfg.lora.dora or cfg.lora.init != "default":
        return None
    if meta.get("rope") and meta["rope"] != rope_record(model):
        return None
    opts = cfg.lora
    if (folder / METHOD_FILE).is_file():
        try:
            tensors = load_file(str(folder / DELTA_FILE))
        except Exception as e:  # safetensors raises its own error types for a corrupt file
            raise ExportError(f"{folder / DELTA_FILE}: cannot read ({e})") from None
    else:
        tensors = read_peft(folder, model)[3]
    return opts.alpha / (math.sqrt(opts.rank) if opts.rslora else opts.rank), _pairs(tensors, model, folder)


def _pairs(tensors: dict[str, torch.Tensor], model: nn.Module, folder: Path):
    modules = dict(model.named_modules())
    pairs = {}
    for key in tensors:
        name, _, part = key.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            raise ExportError(f"{folder}: unexpected tensor `{key}` in a LoRA adapter")
        target = modules.get(name)
        if not isinstance(target, nn.Linear):
            raise ExportError(f"{folder}: `{name}` is not a Linear of this base model: is the adapter for another base?")
        a, b = tensors.get(f"{name}.lora_a"), tensors.get(f"{name}.lora_b")
        if a is None or b is None:
            raise ExportError(f"{folder}: `{name}` has only one of lora_a/lora_b")
        if a.shape[1] != target.in_features or b.shape[0] != target.out_features or a.shape[0] != b.shape[1]:
            raise ExportError(f"{folder}: `{name}`: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit a Linear of "
                              f"{target.in_features} in, {target.out_features} out: is the adapter for another base?")
        pairs[name] = (a, b)
    if not pairs:
        raise ExportError(f"{folder}: the adapter holds no LoRA tensors")
    return pairs


def install(model: nn.Module, route: Route, adapter: str, scale: float, pairs) -> None:
    """Add an adapter's factors to `model`, wrapping its target Linears in MultiLoRALinear on first use."""
    device = next(model.parameters()).device
    for name, (a, b) in pairs.items():
        module = model.get_submodule(name)
        if not isinstance(module, MultiLoRALinear):
            module = MultiLoRALinear(module, route)
            set_module(model, name, module)
        # fp32 factors, as LoRALinear keeps them, whatever the base dtype
        module.factors[adapter] = (a.to(device, torch.float32), b.to(device, torch.float32), scale)


def uninstall(model: nn.Module, adapter: str) -> None:
    """Drop an adapter's factors (its memory goes back; the wrappers stay, cheap without factors)."""
    for module in model.modules():
        if isinstance(module, MultiLoRALinear):
            module.factors.pop(adapter, None)
