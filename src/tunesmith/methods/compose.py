"""Methods made of other methods (He et al., 2022: a method is a point in a design space, so a
combination is a composition, not a copy)."""
from __future__ import annotations

from pydantic import Field
from torch import nn

from ..config import Config
from .adapters import AdapterConfig, Adapters
from .base import Compose
from .freeze import Freeze, FreezeConfig, head_is_tied
from .lora import LoRA, LoraConfig
from .prefix import Prefix, PrefixConfig


class MamConfig(Config):
    prefix_length: int = Field(30, gt=0)
    "Prefix vectors on attention (He et al., 2022: 30)."
    prefix_hidden: int = Field(512, gt=0)
    "Hidden width of the prefix reparameterisation MLP."
    prefix_reparam: bool = True
    "Train the prefixes through the MLP (folded into plain prefixes at save)."
    bottleneck: int = Field(512, gt=0)
    "Bottleneck of the scaled parallel adapter on the FFN (He et al., 2022: 512)."
    scale: float = Field(4.0, gt=0)
    "Scale s of the parallel adapter."


class LongLoraConfig(Config):
    rank: int = Field(8, gt=0)
    "LoRA rank on attention."
    alpha: float = Field(16.0, gt=0)
    "LoRA alpha."
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    "Attention projections that get LoRA."
    embeddings: bool = True
    "Train the token embeddings (LongLoRA: yes)."
    norms: bool = True
    "Train every norm layer (LongLoRA: yes)."
    shifted_attention: bool = True
    "Train with S²-Attn (overrides model.attention; group size model.s2_group); inference uses full attention."
    target_length: int | None = Field(None, gt=0)
    "Stretch positions to this many tokens: linear interpolation by ⌈target/original⌉, unless model.rope says otherwise."


class MAM(Compose):
    """MAM adapter: prefix tuning on attention + a scaled parallel adapter on the FFN."""

    mergeable = False
    Options = MamConfig
    paper = "He et al., 2022 (MAM adapter)"
    when = "prefix on attention + scaled parallel adapter on the FFN"
    tiny = {"prefix_length": 4, "prefix_hidden": 16, "bottleneck": 8}

    def __init__(self, cfg):
        self.prefix = Prefix(PrefixConfig(length=cfg.prefix_length, hidden=cfg.prefix_hidden, reparam=cfg.prefix_reparam))
        self.adapter = Adapters(AdapterConfig(form="parallel", sublayers=["ffn"], bottleneck=cfg.bottleneck, scale=cfg.scale))
        super().__init__("mam", [self.prefix, self.adapter], cfg)

    def export_delta(self, model: nn.Module):
        """The prefix part saves folded (no MLP); the options record that."""
        prefix_tensors, prefix_options = self.prefix.export_delta(model)
        adapter_tensors, _ = self.adapter.export_delta(model)
        options = self.cfg.model_copy(update={"prefix_reparam": prefix_options.reparam})
        return {**prefix_tensors, **adapter_tensors}, options


class LongLoRA(Compose):
    """LongLoRA's trainable set: LoRA on the attention projections + trainable embeddings and norms;
    the lm_head stays frozen (a tied one is untied first, see `untie_head`). Its training attention
    (`shifted_attention`) and positions (`target_length`) are set by the training set-up, which reads
    these options before the method applies."""

    mergeable = True
    output = "adapter"
    Options = LongLoraConfig
    paper = "Chen et al., 2024 (LongLoRA)"
    when = "longer context: LoRA on attention with trainable embeddings and norms"
    tiny = {"rank": 4}

    def __init__(self, cfg):
        parts = [LoRA(LoraConfig(rank=cfg.rank, alpha=cfg.alpha, targets=list(cfg.targets)))]
        if cfg.embeddings or cfg.norms:
            parts.append(Freeze(FreezeConfig(layers=0, embeddings=cfg.embeddings, norms=cfg.norms)))
        super().__init__("longlora", parts, cfg, output="adapter")

    def apply(self, model: nn.Module) -> None:
        if self.cfg.embeddings:
            untie_head(model)
        super().apply(model)


def untie_head(model: nn.Module) -> None:
    """Give a tied lm_head its own frozen copy of the embeddings, so training the embeddings leaves
    the head as it was (LongLoRA keeps the head frozen). The config says untied from then on: a
    merged export saves both tensors, and an adapter's saved embeddings load into the embeddings
    alone (this runs again, before they are copied in)."""
    if not head_is_tied(model):
        return
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)  # nothing re-ties it
