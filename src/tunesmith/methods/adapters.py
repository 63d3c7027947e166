"""Bottleneck adapters in the unified view (He et al., ICLR 2022, "Towards a unified view of
parameter-efficient transfer learning"; Houlsby et al., 2019; Pfeiffer et al., 2021).

An adapter is a small two-layer MLP whose output is added to a sublayer's output:

    Δh(z) = s · (ReLU(z W_down + b1) W_up + b2),   W_down (d, r), W_up (r, d)

- sequential (Houlsby at attention and FFN, Pfeiffer at the FFN only): z is the sublayer's output h,
  and the sublayer returns h + Δh(h);
- parallel (He et al.): z is the sublayer's input x (for a Llama block, the normed hidden state the
  attention or the FFN reads), and the sublayer returns sublayer(x) + Δh(x).

W_down is Kaiming-uniform (a=√5), W_up and both biases are zero, so training starts exactly at the
base model. He et al. find parallel > sequential, the FFN the better place at larger budgets, and
a scaled add (s = 4) better than a plain one (s = 1). Pick adapters when a LoRA weight delta is not
wanted or to reproduce these baselines; the ReLU makes the delta non-linear, so it cannot be merged.

The adapter is a child module of its sublayer (`mlp.adapter.down.weight`) applied by a forward
hook, so base keys, the block's code, activation checkpointing and generation are untouched.
"""
from __future__ import annotations

import math
import re
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..config import Config
from .base import MethodBase, MethodError, delta_state
from .catalog import Variant

# child names of a decoder block that hold its attention and its feed-forward sublayer
SUBLAYER_NAMES = {
    "attn": ("self_attn", "attn", "attention", "self_attention"),
    "ffn": ("mlp", "feed_forward", "ffn"),
}
_BLOCK = re.compile(r"(^|\.)(layers|h|blocks)\.\d+$")  # an entry of the blocks' ModuleList
_PARAM = re.compile(r"\.adapter\.(down|up)\.(weight|bias)$")


class BottleneckAdapter(nn.Module):
    """Δh(z) = s · (ReLU(z W_down + b1) W_up + b2), fp32 parameters whatever the base dtype."""

    def __init__(self, dim: int, bottleneck: int, scale: float, form: str, device=None):
        super().__init__()
        self.form, self.scale = form, float(scale)
        self.down = nn.Linear(dim, bottleneck, device=device, dtype=torch.float32)
        self.up = nn.Linear(bottleneck, dim, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Δh(z) in z's dtype (under autocast the Linears run in the autocast dtype)."""
        h = z if torch.is_autocast_enabled(z.device.type) else z.to(self.down.weight.dtype)
        return (self.scale * self.up(F.relu(self.down(h)))).to(z.dtype)

    def extra_repr(self) -> str:
        return f"form={self.form}, scale={self.scale}"


def _adapter_hook(module: nn.Module, args, kwargs, output):
    """Forward hook of an adapted sublayer. It finds the adapter on `module` (not in a closure), so a
    deep-copied model runs its own copy. Attention returns (output, weights): only output changes."""
    adapter = module.adapter
    h = output[0] if isinstance(output, tuple) else output
    if adapter.form == "parallel":
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        h = h + adapter(x)
    else:
        h = h + adapter(h)
    return (h, *output[1:]) if isinstance(output, tuple) else h


def find_sublayers(model: nn.Module, kinds: list[str]) -> list[tuple[str, nn.Module]]:
    """(name, module) of every decoder block's attention / FFN sublayer asked for; a kind no
    block has is a MethodError."""
    blocks = [(n, m) for n, m in model.named_modules()
              if _BLOCK.search(n) and isinstance(model.get_submodule(n.rpartition(".")[0]), nn.ModuleList)]
    if not blocks:
        raise MethodError("adapter: found no decoder blocks (a ModuleList named layers, h or blocks) in this model")
    found = []
    for kind in kinds:
        hits = []
        for block_name, block in blocks:
            child = next((c for c in SUBLAYER_NAMES[kind] if isinstance(getattr(block, c, None), nn.Module)), None)
            if child is not None:
                hits.append((f"{block_name}.{child}", getattr(block, child)))
        if not hits:
            children = sorted({c for _, b in blocks for c, _ in b.named_children()})
            raise MethodError(f"method.adapter.sublayers: `{kind}` needs a block child named one of "
                              f"{', '.join(SUBLAYER_NAMES[kind])}; this model's blocks have: {', '.join(children)}")
        found += hits
    return found


def hidden_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    return int(size) if size else model.get_input_embeddings().embedding_dim


class AdapterConfig(Config):
    form: Literal["sequential", "parallel"] = "parallel"
    "`sequential` takes the sublayer's output (Houlsby, Pfeiffer); `parallel` its input (He et al., 2022)."
    sublayers: list[Literal["attn", "ffn"]] = Field(default_factory=lambda: ["ffn"], min_length=1)
    "Where: after/beside attention, the FFN, or both (Houlsby = sequential at both, Pfeiffer = sequential at ffn)."
    bottleneck: int = Field(64, gt=0)
    "Bottleneck width of the down/up projection."
    scale: float = Field(4.0, gt=0)
    "s in h + s·f(x W_down) W_up; 1 = plain add, 4 = He et al.'s scaled parallel adapter."


class Adapters(MethodBase):
    """The `adapter` method: a BottleneckAdapter on each chosen sublayer; only adapters train."""

    name = "adapter"
    mergeable = False
    Options = AdapterConfig
    paper = "He et al., 2022 (scaled parallel adapter)"
    when = "an FFN-side adapter: strong at larger budgets; does not merge"
    tiny = {"bottleneck": 8}
    variants = {
        "houlsby": Variant({"form": "sequential", "sublayers": ["attn", "ffn"], "scale": 1.0}, "Houlsby et al., 2019",
                           "the classic sequential adapter after attention and FFN"),
        "pfeiffer": Variant({"form": "sequential", "sublayers": ["ffn"], "scale": 1.0}, "Pfeiffer et al., 2021",
                            "a sequential adapter after the FFN only"),
        "adapter-both": Variant({"sublayers": ["attn", "ffn"]}, "He et al., 2022 (scaled parallel adapter)",
                                "scaled parallel adapters beside attention and the FFN: more capacity, twice the size"),
    }

    def __init__(self, cfg):
        super().__init__(cfg)
        self.sublayers: list[str] = []

    def apply(self, model: nn.Module) -> None:
        sublayers = find_sublayers(model, list(dict.fromkeys(self.cfg.sublayers)))
        dim = hidden_size(model)
        for name, mod in sublayers:
            existing = getattr(mod, "adapter", None)
            if isinstance(existing, BottleneckAdapter):
                continue
            if existing is not None:
                raise MethodError(f"adapter: {name} already has an attribute `adapter`; cannot attach one")
            device = next(mod.parameters()).device
            mod.adapter = BottleneckAdapter(dim, self.cfg.bottleneck, self.cfg.scale, self.cfg.form, device=device)
            mod.register_forward_hook(_adapter_hook, with_kwargs=True)
            self.sublayers.append(name)

    def is_trainable(self, name: str, param) -> bool:
        return bool(_PARAM.search(name))

    def export_delta(self, model: nn.Module):
        """Only the adapters' tensors: inside a composition (MAM) the other parts save their own."""
        return {n: t for n, t in delta_state(model, self).items() if _PARAM.search(n)}, self.cfg

    def describe(self, model: nn.Module) -> str:
        return (f"{self.cfg.form} adapters (bottleneck {self.cfg.bottleneck}, scale {self.cfg.scale:g}) "
                f"on {len(self.sublayers)} sublayers")
