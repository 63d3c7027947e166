"""(IA)³, Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al., NeurIPS 2022,
"Few-shot parameter-efficient fine-tuning is better and cheaper than in-context learning").

A learned vector l, initialised to 1, rescales an activation elementwise:

- an ordinary target (keys, values): its output, y = (x W^T + b) ⊙ l, with l of size out;
- a feed-forward target (down_proj): its input, the FFN's inner activation, y = (x ⊙ l) W^T + b,
  with l of size in.

Both are weight deltas (row scaling W ← diag(l) W, b ← l ⊙ b; column scaling W ← W diag(l)), so
(IA)³ merges into the base weights. It trains the fewest parameters of any method here (about
0.01% of a model), which suits few-shot tasks and many cheap per-task adapters; with more data,
LoRA or adapters have more capacity. PEFT has it, so adapters are also written in PEFT's layout.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..config import Config
from .base import MethodBase, MethodError, select_modules, set_module


class IA3Linear(nn.Linear):
    """An nn.Linear that keeps its own `weight`/`bias` keys and adds the scaling vector `ia3_l`
    (fp32; size out, or size in when `feedforward`)."""

    def __init__(self, base: nn.Linear, feedforward: bool):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same tensors: keys and storage unchanged
        self.feedforward = feedforward
        size = self.in_features if feedforward else self.out_features
        self.ia3_l = nn.Parameter(torch.ones(size, device=base.weight.device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feedforward:
            return F.linear((x * self.ia3_l).to(x.dtype), self.weight, self.bias)
        y = F.linear(x, self.weight, self.bias)
        return (y * self.ia3_l).to(y.dtype)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with l folded in (in the base weight's dtype)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        l = self.ia3_l.detach()
        with torch.no_grad():
            scale = l[None, :] if self.feedforward else l[:, None]  # columns (inputs) or rows (outputs)
            out.weight.copy_((self.weight.float() * scale).to(self.weight.dtype))
            if self.bias is not None:
                bias = self.bias.float() if self.feedforward else self.bias.float() * l
                out.bias.copy_(bias.to(self.bias.dtype))
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feedforward={self.feedforward}"


class Ia3Config(Config):
    targets: list[str] = Field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    "Linear layers whose activations get a learned scale (IA3: keys, values and the FFN)."
    feedforward: list[str] = Field(default_factory=lambda: ["down_proj"])
    "Of those, the ones scaled on their input (the FFN's inner activation) rather than their output."


class IA3(MethodBase):
    """The `ia3` method: wrap the targets in IA3Linear; only the `ia3_l` vectors train."""

    name = "ia3"
    mergeable = True
    Options = Ia3Config
    paper = "Liu et al., 2022 (IA3)"
    when = "the fewest parameters: learned scales of keys, values and FFN"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.targets: list[str] = []

    def resolve(self, model: nn.Module) -> tuple[list[tuple[str, nn.Linear]], set[str]]:
        """(the target Linears, the names of those scaled on their input); errors name the option."""
        try:
            targets = select_modules(model, self.cfg.targets)
        except MethodError as e:
            raise MethodError(f"method.ia3.targets: {e}") from None
        feedforward = set()
        for pattern in self.cfg.feedforward:  # matched like a target, but among the targets only
            hits = {n for n, _ in targets if n == pattern or n.endswith("." + pattern) or re.fullmatch(pattern, n)}
            if not hits:
                raise MethodError(f"method.ia3.feedforward: `{pattern}` is not among the modules method.ia3.targets "
                                  f"selects ({', '.join(sorted({n.rsplit('.', 1)[-1] for n, _ in targets}))}); "
                                  "a feed-forward module must also be a target")
            feedforward |= hits
        return targets, feedforward

    def apply(self, model: nn.Module) -> None:
        targets, feedforward = self.resolve(model)
        for name, mod in targets:
            if isinstance(mod, IA3Linear):
                continue
            set_module(model, name, IA3Linear(mod, feedforward=name in feedforward))
            self.targets.append(name)

    def is_trainable(self, name: str, param) -> bool:
        return name.endswith(".ia3_l")

    def optimizer_options(self, name: str, param) -> dict:
        return {"decay": False}  # decay would pull the scales toward 0, not toward the base model's 1

    def merge(self, model: nn.Module) -> None:
        for name, mod in list(model.named_modules()):
            if isinstance(mod, IA3Linear):
                set_module(model, name, mod.merged())
