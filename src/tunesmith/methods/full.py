"""Full fine-tuning: every weight trains (optionally keeping the embeddings frozen)."""
from __future__ import annotations

from torch import nn

from ..config import Config
from .base import MethodBase


class FullConfig(Config):
    train_embeddings: bool = True
    "Train the token embeddings (and a tied lm_head)."


class Full(MethodBase):
    """The `full` method: every weight trains."""

    name = "full"
    output = "model"
    mergeable = True  # nothing to fold: the weights are the model
    Options = FullConfig
    paper = "—"
    when = "the most capacity; needs memory for weights, gradients and optimizer state of everything"

    def __init__(self, cfg):
        super().__init__(cfg)
        self._frozen: set[int] = set()

    def apply(self, model: nn.Module) -> None:
        if not self.cfg.train_embeddings:
            emb = model.get_input_embeddings()
            self._frozen = {id(p) for p in emb.parameters()}

    def is_trainable(self, name: str, param) -> bool:
        return id(param) not in self._frozen

    def merge(self, model: nn.Module) -> None:
        return None
