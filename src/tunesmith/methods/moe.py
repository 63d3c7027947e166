"""MoE upcycling (methods.md §15; sparse upcycling, Komatsuzaki et al., 2023): the MLP of every chosen
layer becomes N copies of itself, the experts, routed one of two ways (`models.moe`).

`routing: enforced` (default; Hallee et al., 2024): no learned gate, one expert per domain. Routing
comes from the data: contrastive records carry a `domain`; the data's domains are numbered 0..N-1 in
sorted order (saved with the run as `tunesmith_domains.json`) and a text of domain k runs through
expert k (sentence-wise). Token-wise routing passes (B, T) ids, e.g. token-type ids, to
`models.moe.routing`. Text without a domain runs through expert 0.

`routing: learned` (decoders): a Mixtral top-k router per upcycled MLP sends each token to `top_k`
experts, their outputs weighted by the renormalised router probabilities. The router's
load-balancing loss (weight `balance_weight`) and z-loss (`z_weight`) join the training loss through
the harness's `aux_loss` hook, as per-step means; the step metrics (metrics.jsonl, the report) log
each expert's share of the assignments, the load and router entropies and both losses. `jitter` and
`capacity_factor` are the Switch Transformer's router noise and expert capacity (dropless by
default; the drop policy is in `models.moe`). `noise` perturbs the copies at upcycling (0: exact).

Either way the model computes exactly what the dense one did until the experts diverge in training
(learned routing: up to float rounding of Σ gates = 1). What trains: `experts` (default) trains the
MLP experts (and the routers) only — attention, embeddings and norms stay shared and frozen; `all`
also trains the shared weights, as the contrastive-MoE paper does. The saved delta holds every expert
and router, so the folder reloads on the base model with the same outputs (a whole-model copy with
`all`). The experts cannot be merged into one MLP; a learned-routing model upcycled in every layer
exports as a transformers Mixtral folder (`export.mixtral`), anything else stays in our adapter format.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from ..config import Config
from ..models.moe import MoEError, aux_losses, choose_layers, expert_stats, mlp_slots, moe_modules, upcycle
from .base import MethodBase, MethodError
from .catalog import Variant


class RouterConfig(Config):
    """The learned router's options, shared by `moe` and `moe_lora`."""

    top_k: int = Field(2, ge=1)
    "Learned routing: experts per token (at most `experts`); their outputs are weighted by the renormalised router probabilities."
    balance_weight: float = Field(0.01, ge=0)
    "Learned routing: weight of the load-balancing loss E·Σ f_e·P_e (Switch, Mixtral: 0.01-0.02)."
    z_weight: float = Field(0.001, ge=0)
    "Learned routing: weight of the router z-loss mean(logsumexp(logits)²) (ST-MoE: 0.001)."
    jitter: float = Field(0.0, ge=0)
    "Learned routing: multiply the router's input by U(1-jitter, 1+jitter) while training (Switch: 0.01); 0: off."
    capacity_factor: float | None = Field(None, gt=0)
    "Learned routing: each expert takes at most ceil(c·tokens·top_k/experts) assignments while training, the rest drop (zero output); null: dropless."
    router_lr_scale: float = Field(1.0, gt=0)
    "Learned routing: the routers' learning rate as a multiple of train.lr (routers start near uniform and move slowly at a full-tuning lr)."


def router_ids(model: nn.Module) -> set[int]:
    """The learned routers' parameters (by id), for their own learning rate (`router_lr_scale`)."""
    return {id(p) for m in moe_modules(model) if m.router is not None for p in m.router.parameters()}


def router_aux_loss(cfg: RouterConfig, model: nn.Module):
    """balance_weight·moe_balance + z_weight·moe_z of the last forward's routers, with both losses and
    the expert statistics (shares, entropies) as metrics; (None, {}) when no router ran."""
    losses = aux_losses(model)
    if not losses:
        return None, {}
    total = cfg.balance_weight * losses["moe_balance"] + cfg.z_weight * losses["moe_z"]
    return total, {"moe/balance": float(losses["moe_balance"].detach()), "moe/z": float(losses["moe_z"].detach()),
                   **expert_stats(model)}


class MoeConfig(RouterConfig):
    experts: int = Field(2, ge=1)
    "Experts per MLP. Enforced routing: one per domain (the data's k-th domain in sorted order runs through expert k)."
    layers: Literal["all"] | list[int] = "all"
    "Layers whose MLP is upcycled: `all`, or indices such as [0, 5] (the paper: all; one layer keeps ~85% of the gain)."
    train: Literal["experts", "all"] = "experts"
    "`experts`: only the MLP experts (and learned routers) train; `all`: the shared attention, embeddings and norms train too."
    routing: Literal["enforced", "learned"] = "enforced"
    "`enforced`: the data's domain picks the expert; `learned`: a top-k router per layer (Mixtral), trained with the model."
    noise: float = Field(0.0, ge=0)
    "Std of the noise added to the expert copies at upcycling, relative to each weight's std; 0: exact copies."


class MoE(MethodBase):
    """The `moe` method: upcycle MLPs into experts, routed by the data's domain or by a learned router."""

    name = "moe"
    output = "adapter"
    mergeable = False
    Options = MoeConfig
    paper = "Hallee et al., 2024 (contrastive MoE embeddings); Komatsuzaki et al., 2023 (sparse upcycling)"
    when = ("one model for several domains: MLP experts per layer, routed by the data's domain (enforced) "
            "or by a learned top-k router")
    tiny = {"experts": 2}
    variants = {"moe-learned": Variant({"routing": "learned", "experts": 4, "top_k": 2},
                                       "Komatsuzaki et al., 2023 (sparse upcycling); Jiang et al., 2024 (Mixtral)",
                                       "grow a dense model into a sparse MoE: 4 experts per MLP, a learned top-2 "
                                       "router, load-balance and z losses")}

    def __init__(self, cfg):
        super().__init__(cfg)
        self._trained_ids: set[int] = set()
        self._router_ids: set[int] = set()
        self._layers: list[int] = []

    @property
    def learned(self) -> bool:
        return self.cfg.routing == "learned"

    def apply(self, model: nn.Module) -> None:
        cfg = self.cfg
        router = None
        if self.learned:
            if cfg.top_k > cfg.experts:
                raise MethodError(f"moe top_k: {cfg.top_k} is more than the {cfg.experts} experts")
            router = {"k": cfg.top_k, "jitter": cfg.jitter, "capacity_factor": cfg.capacity_factor}
        try:
            self._layers = choose_layers(len(mlp_slots(model)), cfg.layers)
            layers = upcycle(model, cfg.experts, self._layers, router=router, noise=cfg.noise)
        except MoEError as e:
            raise MethodError(str(e)) from None
        self._trained_ids = {id(p) for m in layers for p in m.parameters()}  # experts and routers
        self._router_ids = router_ids(model)

    def is_trainable(self, name: str, param) -> bool:
        return self.cfg.train == "all" or id(param) in self._trained_ids

    def optimizer_options(self, name: str, param) -> dict:
        return {"lr_scale": self.cfg.router_lr_scale} if id(param) in self._router_ids else {}

    def aux_loss(self, model: nn.Module):
        """Learned routing: balance_weight·moe_balance + z_weight·moe_z of the last forward, and the
        expert statistics (shares, entropies) with both losses as metrics."""
        return router_aux_loss(self.cfg, model) if self.learned else (None, {})

    def describe(self, model: nn.Module) -> str:
        n = len(self._layers)
        how = (f"a learned top-{self.cfg.top_k} router each" if self.learned else "routed by domain")
        return (f"the MLP of {n} layer{'s' if n != 1 else ''} upcycled into {self.cfg.experts} experts, {how}; "
                f"trains {self.cfg.train}")
