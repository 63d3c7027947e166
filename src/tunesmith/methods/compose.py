"""Methods made of other methods (He et al., 2022: a method is a point in a design space, so a
combination is a composition, not a copy)."""
from __future__ import annotations

import dataclasses

from torch import nn

from tunesmith.recipe import AdapterConfig, FreezeConfig, LoraConfig, PrefixConfig

from .base import Compose


class MAM(Compose):
    """MAM adapter: prefix tuning on attention + a scaled parallel adapter on the FFN."""

    mergeable = False

    def __init__(self, cfg):
        from .adapters import Adapters
        from .prefix import Prefix

        self.prefix = Prefix(PrefixConfig(length=cfg.prefix_length, hidden=cfg.prefix_hidden, reparam=cfg.prefix_reparam))
        self.adapter = Adapters(AdapterConfig(form="parallel", sublayers=["ffn"], bottleneck=cfg.bottleneck, scale=cfg.scale))
        super().__init__("mam", [self.prefix, self.adapter], cfg)

    def export_delta(self, model: nn.Module):
        """The prefix part saves folded (no MLP); the options record that."""
        prefix_tensors, prefix_options = self.prefix.export_delta(model)
        adapter_tensors, _ = self.adapter.export_delta(model)
        return {**prefix_tensors, **adapter_tensors}, dataclasses.replace(self.cfg, prefix_reparam=prefix_options.reparam)


class LongLoRA(Compose):
    """LongLoRA's trainable set: LoRA on the attention projections + trainable embeddings and norms."""

    mergeable = True
    output = "adapter"

    def __init__(self, cfg):
        from .freeze import Freeze
        from .lora import LoRA

        parts = [LoRA(LoraConfig(rank=cfg.rank, alpha=cfg.alpha, targets=list(cfg.targets)))]
        if cfg.embeddings or cfg.norms:
            parts.append(Freeze(FreezeConfig(layers=0, embeddings=cfg.embeddings, norms=cfg.norms)))
        super().__init__("longlora", parts, cfg, output="adapter")
