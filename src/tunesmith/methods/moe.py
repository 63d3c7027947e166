"""Domain-expert MoE (Hallee et al., 2024; methods.md §15): the MLP of every chosen layer becomes N
copies of itself, one per domain, with enforced routing (no learned gate; `models.moe`).

The model computes exactly what the dense one did until the experts diverge in training. Routing comes
from the data: contrastive records carry a `domain`; the data's domains are numbered 0..N-1 in sorted
order (saved with the run as `tunesmith_domains.json`) and a text of domain k runs through expert k
(sentence-wise). Token-wise routing passes (B, T) ids, e.g. token-type ids, to `models.moe.routing`.
Text without a domain runs through expert 0.

What trains: `experts` (default) trains the MLP experts only — attention, embeddings and norms stay
shared and frozen, each domain gets its own FFN; `all` also trains the shared weights, as the paper
does. Either way the saved delta holds every expert, so the folder reloads on the base model with
the same vectors (it is a whole-model copy with `all`). The experts cannot be merged into one MLP.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from ..config import Config
from ..models.moe import MoEError, choose_layers, mlp_slots, upcycle
from .base import MethodBase, MethodError


class MoeConfig(Config):
    experts: int = Field(2, ge=1)
    "Experts per MLP, one per domain: the data's k-th domain in sorted order runs through expert k."
    layers: Literal["all"] | list[int] = "all"
    "Layers whose MLP is upcycled: `all`, or indices such as [0, 5] (the paper: all; one layer keeps ~85% of the gain)."
    train: Literal["experts", "all"] = "experts"
    "`experts`: only the MLP experts train; `all`: the shared attention, embeddings and norms train too (the paper)."


class MoE(MethodBase):
    """The `moe` method: upcycle MLPs into per-domain experts with enforced routing."""

    name = "moe"
    output = "adapter"
    mergeable = False
    Options = MoeConfig
    paper = "Hallee et al., 2024 (contrastive MoE embeddings)"
    when = "one embedding model for several domains: an MLP expert per domain, routed by the data's domain"
    tiny = {"experts": 2}

    def __init__(self, cfg):
        super().__init__(cfg)
        self._expert_ids: set[int] = set()
        self._layers: list[int] = []

    def apply(self, model: nn.Module) -> None:
        try:
            self._layers = choose_layers(len(mlp_slots(model)), self.cfg.layers)
            layers = upcycle(model, self.cfg.experts, self._layers)
        except MoEError as e:
            raise MethodError(str(e)) from None
        self._expert_ids = {id(p) for m in layers for p in m.parameters()}

    def is_trainable(self, name: str, param) -> bool:
        return self.cfg.train == "all" or id(param) in self._expert_ids

    def describe(self, model: nn.Module) -> str:
        n = len(self._layers)
        return (f"the MLP of {n} layer{'s' if n != 1 else ''} upcycled into {self.cfg.experts} experts each; "
                f"trains {self.cfg.train}")
