"""Objectives: plain functions `(model, batch) -> (loss_sum, n_units, metrics)`.

They return the *sum* of per-unit losses (a unit is a trained token for SFT, a pair for the
preference losses) and the number of units, never a mean: the loop divides by the units of the
whole accumulation window (and of all ranks), which is what makes gradient accumulation exact.

`build_objective` wraps one in what the loop needs to batch its data: how long an item is, how
many loss units it holds, and which samples to collate for it.
"""
from __future__ import annotations

from .sft import causal_lm_loss, forward_hidden

PREFERENCE = ("dpo", "ipo", "hinge", "simpo", "orpo")


class SFT:
    """Causal LM loss over the weighted tokens of plain samples."""

    name = "sft"

    def __init__(self, chunk: int = 1024):
        self.chunk = chunk

    def length(self, item) -> int:
        return len(item["input_ids"])

    def units(self, item) -> int:
        return sum(w > 0 for w in item["weights"])  # weights[0] is always 0

    def rows(self, items) -> list:
        return items

    def finish(self, items, batch: dict) -> dict:
        return batch

    def __call__(self, model, batch):
        return causal_lm_loss(model, batch, self.chunk)


class Preference:
    """A DPO-family loss over (chosen, rejected) pairs; one loss unit per pair."""

    def __init__(self, name: str, cfg, reference=None, chunk: int = 1024):
        self.name, self.cfg, self.reference, self.chunk = name, cfg, reference, chunk
        self.precomputed = False

    def length(self, item) -> int:
        return len(item["chosen"]["input_ids"]) + len(item["rejected"]["input_ids"])

    def units(self, item) -> int:
        return 1

    def rows(self, items) -> list:
        from ..data.preference import flatten_pairs

        return flatten_pairs(items)

    def finish(self, items, batch: dict) -> dict:
        if self.precomputed:  # [S] reference sums in segment order: c1, r1, c2, r2, ...
            import torch

            batch["ref_logps"] = torch.tensor([p[side]["ref_logp"] for p in items for side in ("chosen", "rejected")])
        return batch

    def precompute(self, model, items, *, pad_id: int, device, precision: str, batch_tokens: int) -> None:
        """Reference log-probs of every pair, once (`precompute_reference`); the reference copy, if
        any, is released afterwards."""
        from ..data import collate, plan_batches
        from ..train.runtime import autocast
        from .preference import reference_logps

        ref, adapters_off = (self.reference, False) if self.reference is not None else (model, True)
        plan = plan_batches([self.length(p) for p in items], packing=True, batch_tokens=batch_tokens,
                            batch_size=1, seed=0, epoch=0, shuffle=False)
        for group in plan:
            pairs = [items[i] for i in group]
            batch = {k: v.to(device) for k, v in collate(self.rows(pairs), packing=True, pad_id=pad_id).items()}
            with autocast(device, precision):
                logps = reference_logps(ref, batch, adapters_off=adapters_off, chunk=self.chunk).tolist()
            for i, p in enumerate(pairs):
                p["chosen"]["ref_logp"], p["rejected"]["ref_logp"] = logps[2 * i], logps[2 * i + 1]
        self.precomputed, self.reference = True, None

    def __call__(self, model, batch):
        from .preference import preference_objective

        return preference_objective(model, batch, self.name, self.cfg, reference=self.reference)


def build_objective(recipe, model=None):
    """The recipe's objective; for preference losses with a full-tuning reference, a frozen copy of
    `model` is taken now (LoRA runs use the model itself with its adapter switched off)."""
    name, chunk = recipe.objective.name, recipe.train.loss_chunk
    if name == "sft":
        return SFT(chunk)
    if name in PREFERENCE:
        cfg = recipe.objective.preference
        reference = None
        mode = cfg.reference
        if mode == "auto":
            # a run that continues an adapter (DPO after SFT) compares against that adapter, not the bare base
            lora_base = recipe.method.name == "lora" and not recipe.model.adapter
            mode = "none" if name in ("simpo", "orpo") else ("adapter_off" if lora_base else "copy")
        if mode == "copy":
            import copy

            reference = copy.deepcopy(model).eval().requires_grad_(False)
        return Preference(name, cfg, reference, chunk)
    raise ValueError(f"objective `{name}` has its own trainer (tunesmith.train.{name})")


__all__ = ["causal_lm_loss", "forward_hidden", "build_objective", "SFT", "Preference", "PREFERENCE"]
