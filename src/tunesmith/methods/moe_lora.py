"""MoE-LoRA: a router over several LoRA adapters per MLP, on the frozen shared MLP (a mixture of
LoRA experts, as in MoLoRA, Zadouri et al., 2023, and LoRAMoE, Dou et al., 2024; the MoE-LoRA branch
of the MoE survey, Cai et al., 2024).

In every chosen layer the MLP becomes an `MoEMLP` (`models.moe`) of E experts. Each expert is the
SAME pretrained MLP — its weights are shared tensors, not copies, so E experts cost no extra base
memory — with its own LoRA (`methods.lora.LoRALinear`) on each of the MLP's linears (gate/up/down for
Llama; `intermediate.dense` and `output.dense` for BERT). Expert e computes

    mlp_e(x) = down_e(act(gate_e(x)) · up_e(x)),   W_e = W + s·B_e A_e for each of the three linears.

Routing (`routing`):
- `learned`: Mixtral's top-k gate (`models.moe.TopKRouter`): out = Σ_j g_j · mlp_{i_j}(x) over the k
  experts of highest router probability, their probabilities renormalised. The router's
  load-balancing and z-losses come in through `aux_loss` (weights `balance_weight`, `z_weight`, as
  method `moe`). Decoders only (BERT splits its MLP over two modules, which one gate cannot span).
- `enforced`: no router; a sample's `domain` picks its expert (`models.moe.routing`: the data's k-th
  domain in sorted order runs expert k; `tunesmith generate|eval --domain NAME` at inference). A
  forward without a route runs expert 0. Enforced routing, when given, wins over a learned router.

At initialisation every B is zero, so every expert is the base MLP and the model computes what the
base model does (exactly with one expert per token; with top-k, Σ g_j = 1 up to rounding).

What trains: the LoRA factors of every expert and the router; everything else is frozen. The saved
adapter is exactly those tensors (the experts' shared base weights are not saved: they are the base
model's). It cannot be merged into one dense MLP: a token's output mixes its experts' outputs after
each expert's non-linearity, with gates that depend on the token, so no single weight matrix
computes it. `expand(model)` instead turns each MoE-LoRA layer into E full experts (expert e = the
shared MLP with LoRA e merged into its weights) behind the same router: a plain upcycled MoE, the
form method `moe` trains, which a Mixtral-style export can write.
"""
from __future__ import annotations

import copy
from typing import Literal

from pydantic import Field
from torch import nn

from ..models.moe import MoEError, MoEMLP, TopKRouter, choose_layers, mlp_slots
from .base import MethodBase, MethodError, set_module
from .catalog import Variant
from .lora import LoRALinear
from .moe import RouterConfig, router_aux_loss, router_ids


class MoeLoraConfig(RouterConfig):
    experts: int = Field(4, ge=1)
    "LoRA experts per MLP (with enforced routing: one per domain, the data's k-th domain in sorted order runs expert k)."
    routing: Literal["learned", "enforced"] = "learned"
    "`learned`: a top-k router (Mixtral's gate) picks each token's experts; `enforced`: the data's `domain` does."
    rank: int = Field(8, gt=0)
    "LoRA rank r of every expert's linears."
    alpha: float = Field(16.0, gt=0)
    "LoRA alpha; each expert's update is scaled by alpha/r."
    dropout: float = Field(0.0, ge=0, lt=1)
    "Dropout on the LoRA input."
    layers: Literal["all"] | list[int] = "all"
    "Layers whose MLP becomes LoRA experts: `all`, or indices such as [0, -1]."


def shared_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose parameters and buffers ARE the original's (the memo maps each
    tensor to itself): a new module structure on the same storage, for another expert's LoRA."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def with_lora(module: nn.Module, rank: int, alpha: float, dropout: float) -> nn.Module:
    """`module` with every nn.Linear in it (or itself, if it is one) wrapped in a LoRALinear."""
    if isinstance(module, nn.Linear):
        return LoRALinear(module, rank, alpha, dropout)
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.Linear) and not isinstance(child, LoRALinear):
            set_module(module, name, LoRALinear(child, rank, alpha, dropout))
    return module


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


class MoELoRA(MethodBase):
    """The `moe_lora` method: E LoRA experts on the frozen shared MLP of each chosen layer, routed by a
    learned top-k router or by the data's domain."""

    name = "moe_lora"
    output = "adapter"
    mergeable = False
    Options = MoeLoraConfig
    paper = "Zadouri et al., 2023 (MoLoRA); Dou et al., 2024 (LoRAMoE)"
    when = "several skills in one small adapter: a router over LoRA experts on the frozen MLP; does not merge"
    tiny = {"experts": 2, "rank": 4, "alpha": 8}
    variants = {
        "moe_lora-enforced": Variant({"routing": "enforced"}, "Dou et al., 2024 (LoRAMoE); Hallee et al., 2024",
                                     "one LoRA expert per data domain, picked by the record's `domain`"),
    }

    def __init__(self, cfg):
        super().__init__(cfg)
        self._layers: list[int] = []
        self._trainable: set[int] = set()
        self._router_ids: set[int] = set()

    def apply(self, model: nn.Module) -> None:
        c = self.cfg
        try:
            slots = mlp_slots(model)
            self._layers = choose_layers(len(slots), c.layers)
            chosen = [(i, parent, attr) for i in self._layers for parent, attr in slots[i]]
            self._check(chosen, learned=c.routing == "learned")
            for _, parent, attr in chosen:
                setattr(parent, attr, self._moe(getattr(parent, attr)))
        except MoEError as e:
            raise MethodError(f"moe_lora: {e}") from None
        self._router_ids = router_ids(model)

    def _check(self, chosen, learned: bool) -> None:
        """Refuse before any module changes: a layer already upcycled, a rank the linears cannot hold,
        a router over a split MLP, top_k over the experts."""
        c = self.cfg
        if learned and len({i for i, _, _ in chosen}) != len(chosen):
            raise MoEError("a learned router needs one MLP module per layer (a decoder); this model splits its "
                           "MLP over two modules (BERT): set method.moe_lora.routing=enforced")
        if learned and c.top_k > c.experts:
            raise MoEError(f"top_k={c.top_k} is more than the {c.experts} experts")
        for i, parent, attr in chosen:
            base = getattr(parent, attr)
            if isinstance(base, MoEMLP):
                raise MoEError(f"layer {i} is already upcycled")
            for lin in _linears(base):
                if c.rank > min(lin.in_features, lin.out_features):
                    raise MoEError(f"rank={c.rank} is too large for a Linear of {lin.in_features} in, "
                                   f"{lin.out_features} out in layer {i}: at most {min(lin.in_features, lin.out_features)}")

    def _moe(self, base: nn.Module) -> MoEMLP:
        """The MoE of one MLP slot: expert 0 is `base` itself (its keys unchanged), experts 1..E-1 share
        its weights; each gets its own LoRA."""
        c = self.cfg
        copies = [shared_copy(base) for _ in range(c.experts - 1)]
        experts = [with_lora(e, c.rank, c.alpha, c.dropout) for e in [base, *copies]]
        router = None
        if c.routing == "learned":
            first = _linears(base)[0]
            router = TopKRouter(first.in_features, c.experts, c.top_k, c.jitter, c.capacity_factor)
            router = router.to(first.weight.device)
            self._trainable.add(id(router.weight))
        loras = [m for e in experts for m in e.modules() if isinstance(m, LoRALinear)]
        self._trainable |= {id(p) for m in loras for p in (m.lora_a, m.lora_b)}
        return MoEMLP(experts, router)

    def is_trainable(self, name: str, param) -> bool:
        return id(param) in self._trainable

    def optimizer_options(self, name: str, param) -> dict:
        return {"lr_scale": self.cfg.router_lr_scale} if id(param) in self._router_ids else {}

    def aux_loss(self, model: nn.Module):
        """balance_weight·moe_balance + z_weight·moe_z of the last forward's routers, with the expert
        shares and entropies to log; (None, {}) with enforced routing or when no router ran."""
        return router_aux_loss(self.cfg, model) if self.cfg.routing == "learned" else (None, {})

    def merge(self, model: nn.Module) -> None:
        raise MethodError("moe_lora cannot be merged into the base weights: a token's output is a router-weighted "
                          "sum of different experts' outputs after each one's non-linearity, which no single MLP "
                          "computes. Load the adapter with its base model (tunesmith generate/eval --adapter), or "
                          "expand it into full experts (methods.moe_lora.expand) for a Mixtral-style export")

    def describe(self, model: nn.Module) -> str:
        c = self.cfg
        n = len(self._layers)
        how = f"learned top-{c.top_k} router" if c.routing == "learned" else "enforced routing by domain"
        return (f"the MLP of {n} layer{'s' if n != 1 else ''} → {c.experts} LoRA experts (rank {c.rank}) on the "
                f"frozen shared MLP; {how}")


def expand(model: nn.Module) -> list[MoEMLP]:
    """Turn every MoE-LoRA layer of `model` into E full experts, in place: expert e = the shared MLP
    with LoRA e merged into its weights (W + s·B_e A_e), behind the same router. The result computes
    what the MoE-LoRA did (up to rounding) and is a plain upcycled MoE (method `moe`'s form): E times
    the MLP weights, no LoRA left. Returns the new MoE modules."""
    made = []
    for slot in [s for layer in mlp_slots(model) for s in layer]:
        parent, attr = slot
        moe = getattr(parent, attr)
        if not isinstance(moe, MoEMLP) or not any(isinstance(m, LoRALinear) for m in moe.modules()):
            continue
        experts = [_merged_copy(moe.expert(k)) for k in range(moe.n_experts)]
        full = MoEMLP(experts, moe.router)
        setattr(parent, attr, full)
        made.append(full)
    if not made:
        raise MethodError("expand: this model has no MoE-LoRA layers (method moe_lora)")
    return made


def _merged_copy(expert: nn.Module) -> nn.Module:
    """A copy of one LoRA expert with its LoRALinears replaced by merged nn.Linears (new tensors)."""
    if isinstance(expert, LoRALinear):
        return expert.merged()
    out = shared_copy(expert)
    for name, m in list(out.named_modules()):
        if isinstance(m, LoRALinear):
            set_module(out, name, m.merged())
    return out

