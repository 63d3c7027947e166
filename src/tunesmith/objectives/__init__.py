"""Objectives: the losses the run harness trains with (protocol in `base.py`).

    objective = build_objective(recipe, model)      # the recipe's objective.name, from REGISTRY
    loss_sum, n_units, metrics = objective(model, batch)

A new objective is one module here and one line in REGISTRY; the harness, `bench` and `estimate`
handle it through the protocol.
"""
from __future__ import annotations

from ..registry import load_entry
from .base import Objective, ObjectiveBase, ObjectiveError
from .sft import causal_lm_loss, forward_hidden

# objective.name -> "module:Class"; imported on first use
REGISTRY = {
    "sft": "sft:SFT",
    "dpo": "preference:Preference",
    "ipo": "preference:Preference",
    "hinge": "preference:Preference",
    "simpo": "preference:Preference",
    "orpo": "preference:Preference",
    "grpo": "grpo:GRPO",
    "distill": "distill:Distill",
    "knowledge_fusion": "knowledge_fusion:KnowledgeFusion",
    "contrastive": "contrastive:Contrastive",
    "grl": "grl:GRL",
    "listwise": "listwise:Listwise",
    "many_icl": "many_icl:ManyICL",
}


def objective_class(name: str):
    return load_entry(REGISTRY, __name__, name, "objective", ObjectiveError)


def build_objective(recipe, model=None, **extras) -> Objective:
    """The recipe's objective, built from its options (`extras`: e.g. a Task object for grpo)."""
    return objective_class(recipe.objective.name).build(recipe, model, **extras)


__all__ = ["Objective", "ObjectiveBase", "ObjectiveError", "REGISTRY", "build_objective", "objective_class",
           "causal_lm_loss", "forward_hidden"]
