"""Listwise full ranking (Liu et al., ACL 2025; methods.md §9): the model reads a query and its
candidates as "[i] passage" lines and writes their whole order, "[a] > [b] > ...". The loss is the
importance-aware token-weighted NLL over that answer:

    loss = Σ_t w_t · NLL_t / #trained tokens,   w_t = 1 + 1/log2(r+1) on the tokens of the id ranked r,
                                                w_t = 1 on separator tokens (" >") and the terminator

so a mistake at the top of the list costs up to 2x one at the bottom. In the harness's protocol
the loss sum is Σ w·NLL over the trained tokens of a micro-batch and its units are those tokens
(answer plus turn terminator); the harness divides by the units of the whole accumulation window,
which is the reference's per-batch mean over non-pad label tokens. The weights are built with the
data (`data.ranking`), so the loss is SFT's weighted token loss unchanged.

    objective:
      name: listwise
      listwise: {passage_tokens: 100, shuffle: true}
    data:
      train: rankings.jsonl     # {"query", "passages": [...], "ranking": [ids] | "relevance": [...]}
"""
from __future__ import annotations

from pydantic import Field

from ..config import Config
from .base import ObjectiveBase
from .sft import causal_lm_loss


class ListwiseConfig(Config):
    passage_tokens: int = Field(100, gt=0)
    "Each passage is cut to this many tokens in the prompt (the paper's 100)."
    shuffle: bool = True
    "Show the candidates in a seeded random order, so the model cannot learn to keep the input (e.g. BM25) order."
    importance: bool = True
    "Weigh the tokens of the id ranked r by 1 + 1/log2(r+1) (false: every answer token weighs 1, plain SFT)."
    min_passages: int | None = Field(None, gt=0)
    "Show each training list cut to a random length from this many candidates to all (the gold first kept), so sliding windows shorter than the lists are in distribution; null: whole lists."


class Listwise(ObjectiveBase):
    """Token-weighted NLL of the gold ranking of ranking records (weights from `data.ranking`)."""

    name, unit = "listwise", "trained_tokens"
    token_loss = False  # a weighted mean (weights up to 2): ln(vocab) is not its uniform value
    Options, block = ListwiseConfig, "listwise"
    block_doc = "Options of listwise: how the candidates are shown and whether the top ranks weigh more."

    def __init__(self, chunk: int = 1024):
        self.chunk = chunk

    @classmethod
    def build(cls, recipe, model=None, **extras):
        return cls(recipe.train.loss_chunk)

    @classmethod
    def load(cls, recipe, tokenizer):
        from ..data.ranking import load_rankings

        opts = recipe.objective.listwise
        return load_rankings(recipe.data, tokenizer, passage_tokens=opts.passage_tokens, shuffle=opts.shuffle,
                             importance=opts.importance, min_passages=opts.min_passages, seed=recipe.train.seed)

    def __call__(self, model, batch):
        return causal_lm_loss(model, batch, self.chunk)
