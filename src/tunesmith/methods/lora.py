"""LoRA (Hu et al., 2021) and its family: a frozen Linear plus a low-rank update, y = W x + s · B A x.

A is (r, in), Kaiming-uniform; B is (out, r), zero — so training starts exactly at the base model.
The scale s is alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023), which keeps the
update's magnitude stable as r grows. Options of the same method:

- LoRA+ (Hayou et al., 2024): B learns `plus_ratio` times faster than A (the paper suggests 16).
  Pick it when plain LoRA learns slowly at a learning rate that is already at A's stable limit.
- DoRA (Liu et al., 2024): W' = m ⊙ (W + s·BA) / ||W + s·BA||_row, a trained per-output magnitude m
  (initialised to ||W||_row) times a LoRA-updated direction. The norm is treated as a constant in
  backward (paper §4.3; as PEFT does). Pick it to get closer to full fine-tuning at a low rank, for
  the price of one extra (out, in) norm per layer and step.
- PiSSA (Meng et al., 2024): A and B start from the top-r singular triplets of W = U S Vᵀ,
  B₀ = U_r diag(sqrt(S_r / s)), A₀ = diag(sqrt(S_r / s)) V_rᵀ (so s·B₀A₀ is W's rank-r principal part),
  and the frozen weight becomes the residual W − s·B₀A₀: training starts at the base model's function
  but updates its principal directions, which converges faster than a zero-initialised B. The saved
  adapter is the equivalent plain LoRA of rank 2r on the original weights,
  s·(BA − B₀A₀) = s·[B, −B₀]·[A; A₀], with alpha adjusted so the scale stays s.
"""
from __future__ import annotations

import contextlib
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..config import Config
from ..models.quant import dense, linear
from .base import MethodBase, MethodError, select_modules, set_module
from .catalog import Variant
from .lora_kernel import applies as fused_applies, lora_linear


class LoraConfig(Config):
    rank: int = Field(16, gt=0)
    "LoRA rank r."
    alpha: float = Field(32.0, gt=0)
    "LoRA alpha; the update is scaled by alpha/r (or alpha/sqrt(r) with rslora)."
    dropout: float = Field(0.0, ge=0, lt=1)
    "Dropout on the LoRA input."
    targets: list[str] = Field(default_factory=lambda: ["all-linear"])
    "Module names or regexes to adapt; `all-linear` = every Linear in the decoder layers (not lm_head)."
    rslora: bool = False
    "Rank-stabilised scaling alpha/sqrt(r) (Kalajdzievski, 2023)."
    dora: bool = False
    "DoRA (Liu et al., 2024): train a per-output magnitude and the LoRA direction of W + s·BA separately."
    plus_ratio: float = Field(1.0, gt=0)
    "LoRA+ (Hayou et al., 2024): B learns this many times faster than A (the paper suggests 16); 1 = plain LoRA."
    init: Literal["default", "pissa"] = "default"
    "`default`: A Kaiming, B zero. `pissa` (Meng et al., 2024): A, B from the top-r singular vectors of W, which keeps the residual."


class LoRALinear(nn.Linear):
    """An nn.Linear that keeps its own `weight`/`bias` keys and adds `lora_a`, `lora_b` (plus
    `lora_magnitude` with DoRA, and the buffers `lora_a0`, `lora_b0` with PiSSA)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dora: bool = False, init: str = "default"):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same tensors: keys and storage unchanged
        self.rank, self.alpha, self.rslora, self.dora, self.init = rank, alpha, rslora, dora, init
        self.scale = alpha / (math.sqrt(rank) if rslora else rank)
        dev = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        if init == "pissa":
            self._pissa_init()
        elif init != "default":
            raise MethodError(f"lora.init: `{init}` is not an initialisation; choose default or pissa")
        if dora:
            self.lora_magnitude = nn.Parameter(self.weight_norm().detach().clone())
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False

    def _pissa_init(self) -> None:
        if self.rank > min(self.in_features, self.out_features):
            raise MethodError(f"lora.rank: PiSSA takes the top-r singular vectors, so rank must be at most "
                              f"{min(self.in_features, self.out_features)} here, got {self.rank}")
        if not self.weight.is_floating_point():
            raise MethodError(f"lora.init=pissa needs floating-point base weights, got {self.weight.dtype}")
        w = self.weight.detach().float()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(s[: self.rank] / self.scale)
        b0 = (u[:, : self.rank] * root).contiguous()  # (out, r)
        a0 = (root[:, None] * vh[: self.rank]).contiguous()  # (r, in)
        with torch.no_grad():
            self.lora_a.copy_(a0)
            self.lora_b.copy_(b0)
            self.weight.copy_((w - self.scale * (b0 @ a0)).to(self.weight.dtype))
        # the starting point, saved with checkpoints: exports subtract it (the adapter is s·(BA − B₀A₀))
        self.register_buffer("lora_a0", a0.clone())
        self.register_buffer("lora_b0", b0.clone())

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_b @ self.lora_a)  # (out, in)

    def weight_norm(self) -> torch.Tensor:
        """DoRA's ||W + s·BA|| per output row, in fp32, with no gradient into B and A (paper §4.3)."""
        with torch.autocast(self.weight.device.type, enabled=False):
            return torch.linalg.norm(dense(self.weight).float() + self.delta_weight().detach(), dim=1)  # (out,)

    def _original(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The layer before any training: the frozen weight, plus PiSSA's principal part taken out of it."""
        if self.init != "pissa":
            return y
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_a0.dtype)
        return y + (self.scale * F.linear(F.linear(h, self.lora_a0), self.lora_b0)).to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.disabled or self.dora or self._dropping()) and fused_applies(x, self.weight, self.lora_a,
                                                                                self.lora_b):
            return lora_linear(x, self.weight, self.bias, self.lora_a, self.lora_b, self.scale)  # one node
        y = linear(x, self.weight, self.bias)  # a quantised base (model.quantize) dequantises here
        if self.disabled:
            return self._original(x, y)
        h = self.lora_dropout(x)
        h_lora = h if torch.is_autocast_enabled(h.device.type) else h.to(self.lora_a.dtype)
        lora = self.scale * F.linear(F.linear(h_lora, self.lora_a), self.lora_b)
        if not self.dora:
            return y + lora.to(y.dtype)
        # y + (m/n − 1)·W x + (m/n)·s·BA x = (m/n)·(W + s·BA) x + bias. With dropout active the
        # direction sees the dropped input on both terms, as in PEFT.
        factor = self.lora_magnitude / self.weight_norm()  # (out,)
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            base = linear(h, self.weight)
        else:
            base = y if self.bias is None else y - self.bias
        return y + ((factor - 1) * base + factor * lora).to(y.dtype)

    def _dropping(self) -> bool:
        return self.training and isinstance(self.lora_dropout, nn.Dropout)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + s·BA, with DoRA m ⊙ (W + s·BA)/||W + s·BA|| (in the base weight's dtype);
        a quantised W is dequantised first: the adapter was trained against dequant(W_q)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            w = dense(self.weight).float() + self.delta_weight().float()
            if self.dora:
                w = (self.lora_magnitude / self.weight_norm())[:, None] * w
            out.weight.copy_(w.to(self.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def plain_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the same update on the original base weight: PiSSA's [A; A₀] and [B, −B₀] (rank 2r)."""
        if self.init != "pissa":
            return self.lora_a, self.lora_b
        return torch.cat([self.lora_a, self.lora_a0], dim=0), torch.cat([self.lora_b, -self.lora_b0], dim=1)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, rslora={self.rslora}, "
                f"dora={self.dora}, init={self.init}")


class LoRA(MethodBase):
    """The `lora` method: wrap target Linears in LoRALinear; only lora_a/lora_b (and DoRA's magnitude) train."""

    name = "lora"
    mergeable = True
    Options = LoraConfig
    paper = "Hu et al., 2021"
    when = "the default: small adapter, merges into the weights"
    tiny = {"rank": 4, "alpha": 8}
    variants = {
        "rslora": Variant({"rslora": True}, "Kalajdzievski, 2023", "LoRA at large ranks (scale alpha/sqrt(r))"),
        "dora": Variant({"dora": True}, "Liu et al., 2024 (DoRA)",
                        "closer to full tuning than LoRA at the same rank; magnitude and direction train apart"),
        "lora+": Variant({"plus_ratio": 16.0}, "Hayou et al., 2024 (LoRA+)", "faster LoRA convergence: B learns 16× faster"),
        "pissa": Variant({"init": "pissa"}, "Meng et al., 2024 (PiSSA)",
                         "LoRA that starts on the principal singular directions: converges faster"),
    }

    def __init__(self, cfg):
        super().__init__(cfg)
        self.targets: list[str] = []

    def apply(self, model: nn.Module) -> None:
        c = self.cfg
        chosen = [(name, mod) for name, mod in select_modules(model, c.targets) if not isinstance(mod, LoRALinear)]
        for name, mod in chosen:  # checked before any module changes
            if c.rank > min(mod.in_features, mod.out_features):  # B·A could not reach that rank
                raise MethodError(f"lora.rank={c.rank} is too large for {name} (a Linear of {mod.in_features} "
                                  f"in, {mod.out_features} out): the rank can be at most "
                                  f"{min(mod.in_features, mod.out_features)} = min(in, out); lower lora.rank "
                                  "or leave that module out of lora.targets")
        for name, mod in chosen:
            set_module(model, name, LoRALinear(mod, c.rank, c.alpha, c.dropout, c.rslora, dora=c.dora, init=c.init))
            self.targets.append(name)

    def is_trainable(self, name: str, param) -> bool:
        return name.endswith((".lora_a", ".lora_b", ".lora_magnitude"))

    def optimizer_options(self, name: str, param) -> dict:
        # LoRA+: B faster than A. DoRA's magnitude, like B a per-output vector, goes with B (as PEFT's
        # create_loraplus_optimizer puts every 1-D trained tensor in B's group).
        if self.cfg.plus_ratio != 1.0 and name.endswith((".lora_b", ".lora_magnitude")):
            return {"lr_scale": float(self.cfg.plus_ratio)}
        return {}

    def merge(self, model: nn.Module) -> None:
        for name, mod in list(model.named_modules()):
            if isinstance(mod, LoRALinear):
                set_module(model, name, mod.merged())

    def describe(self, model: nn.Module) -> str:
        c = self.cfg
        extras = [("DoRA", c.dora), (f"LoRA+ (B's lr ×{c.plus_ratio:g})", c.plus_ratio != 1),
                  ("PiSSA init (base weights hold the residual)", c.init == "pissa")]
        return " · ".join(text for text, on in extras if on)

    def export_delta(self, model: nn.Module):
        """The delta and options of the adapter on the original base: PiSSA's is converted to plain LoRA."""
        if self.cfg.init != "pissa":
            return super().export_delta(model)
        tensors = {}
        for name, mod in lora_modules(model).items():
            a, b = mod.plain_factors()
            tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"] = a.detach(), b.detach()
            if mod.dora:
                tensors[f"{name}.lora_magnitude"] = mod.lora_magnitude.detach()
        return tensors, saved_config(self.cfg)


def saved_config(cfg):
    """The options a saved adapter records: PiSSA's becomes plain LoRA of rank 2r with the same scale
    (alpha × 2, or × sqrt(2) with rsLoRA), as PEFT's `path_initial_model_for_weight_conversion` does."""
    if cfg.init != "pissa":
        return cfg
    alpha = cfg.alpha * (math.sqrt(2) if cfg.rslora else 2)
    return cfg.model_copy(update={"init": "default", "rank": 2 * cfg.rank, "alpha": alpha,
                                  "targets": list(cfg.targets)})


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model without its LoRA deltas (a reference model without a second copy). With
    PiSSA the layers then compute the original W x (the residual plus the removed principal part)."""
    mods = list(lora_modules(model).values())
    previous = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(mods, previous):
            m.disabled = d
