"""Full fine-tuning: every weight trains (optionally keeping the embeddings frozen)."""
from __future__ import annotations

from torch import nn

from .base import MethodBase


class Full(MethodBase):
    name = "full"
    output = "model"
    mergeable = True  # nothing to fold: the weights are the model

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
