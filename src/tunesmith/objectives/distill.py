"""Logit distillation from a teacher model (Hinton et al., 2015): on every trained position, the KL
divergence from the teacher's next-token distribution to the student's, both softened by a
temperature τ and scaled by τ² (so gradients keep their size as τ changes):

    loss = Σ_t w_t · τ² · KL(softmax(z_T/τ) ‖ softmax(z_S/τ))  [+ ce_weight · Σ_t w_t · CE(y_t, z_S)]

summed over trained tokens like the SFT loss (the harness divides by the window's trained tokens).
The teacher runs without gradients; like the SFT loss, only trained positions go through the two
lm_heads, `chunk` at a time, each chunk recomputed in backward, so no (T, vocab) logits are kept.

    objective:
      name: distill
      distill: {teacher: path/to/teacher, temperature: 2.0}

`teacher` is a model folder or name (as `model.name`), or an adapter folder written by tunesmith
(the adapter on its own base model). Teacher and student must share the vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.utils.checkpoint import checkpoint

from ..config import Config
from .base import ObjectiveBase, ObjectiveError
from .sft import forward_hidden


class DistillConfig(Config):
    teacher: str | None = None
    "The teacher: a model folder or name, or an adapter folder tunesmith wrote (that adapter on its base)."
    temperature: float = Field(2.0, gt=0)
    "Softmax temperature τ of both distributions; the KL is scaled by τ² (Hinton et al., 2015)."
    ce_weight: float = Field(0.0, ge=0)
    "Weight of the ordinary next-token cross-entropy added to the KL (0 = pure distillation)."


def head_chunks(fn, rows: tuple, fixed: tuple, chunk: int, anchor: torch.Tensor) -> torch.Tensor:
    """Σ over chunks of `chunk` trained positions of `fn(*fixed, *(r[i:i + chunk] for r in rows))`, a
    float32 scalar: the lm_head pass of distillation (and of `knowledge_fusion`). With gradients on,
    each chunk is recomputed in backward (torch.utils.checkpoint) and `fn` makes the logits — the
    student's and the teachers' — from hidden states, so no (chunk, vocab) logits outlive their
    chunk. `anchor` (the student's hidden states) keeps the graph connected on an empty micro-batch."""
    n = rows[0].shape[0]
    total = anchor.new_zeros((), dtype=torch.float32)
    chunk = chunk if chunk > 0 else max(n, 1)
    for i in range(0, n, chunk):
        args = (*fixed, *(r[i:i + chunk] for r in rows))
        total = total + (checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args))
    if n == 0:
        total = total + 0.0 * anchor.sum()
    return total


def _chunk_kl(head, t_head, temperature: float, ce_weight: float, h, t_h, targets, weights):
    logits = head(h).float()
    with torch.no_grad():
        teacher_logits = t_head(t_h)
    log_student = F.log_softmax(logits / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1) * temperature ** 2
    if ce_weight:
        kl = kl + ce_weight * F.cross_entropy(logits, targets, reduction="none")
    return (kl * weights).sum()


def distill_loss(student, teacher, batch: dict, temperature: float = 2.0, ce_weight: float = 0.0,
                 chunk: int = 1024):
    """(loss_sum, n_trained_tokens, metrics) for a batch from `tunesmith.data.collate`."""
    keep = batch["weights"][:, 1:] > 0  # position t predicts token t+1
    with torch.no_grad():
        t_hidden = forward_hidden(teacher, batch)[:, :-1][keep]
    hidden = forward_hidden(student, batch)
    h = hidden[:, :-1][keep]
    targets = batch["input_ids"][:, 1:][keep]
    w = batch["weights"][:, 1:][keep].to(torch.float32)
    head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    total = head_chunks(_chunk_kl, (h, t_hidden, targets, w), (head, t_head, temperature, ce_weight), chunk, hidden)
    return total, int(keep.sum()), {}


class Distill(ObjectiveBase):
    """Distillation from a frozen teacher on the trained tokens of plain samples (chat or text data)."""

    name, unit = "distill", "trained_tokens"
    Options, block, block_doc = DistillConfig, "distill", "Options of distill: the teacher and the temperature."

    def __init__(self, teacher, temperature: float = 2.0, ce_weight: float = 0.0, chunk: int = 1024):
        if temperature <= 0:
            raise ObjectiveError(f"objective.distill.temperature must be > 0, got {temperature}")
        self.teacher, self.temperature, self.ce_weight, self.chunk = teacher, temperature, ce_weight, chunk

    @classmethod
    def build(cls, recipe, model=None, teacher=None, **extras):
        """`teacher` (a model object) replaces `objective.distill.teacher`."""
        cfg = recipe.objective.distill
        if teacher is None:
            if not cfg.teacher:
                raise ObjectiveError("objective.distill.teacher is not set: give a model folder or name, "
                                     "or an adapter folder")
            teacher = load_teacher(cfg.teacher, recipe.model.dtype)
        _same_attention(teacher, recipe.model.attention)
        if model is not None and teacher.config.vocab_size != model.config.vocab_size:
            raise ObjectiveError(f"objective.distill.teacher has a vocabulary of {teacher.config.vocab_size} tokens, "
                                 f"the student {model.config.vocab_size}: distillation needs the same tokenizer")
        if model is not None:
            teacher.to(next(model.parameters()).device)
        return cls(teacher.eval().requires_grad_(False), cfg.temperature, cfg.ce_weight, recipe.train.loss_chunk)

    def __call__(self, model, batch):
        return distill_loss(model, self.teacher, batch, self.temperature, self.ce_weight, self.chunk)


def _same_attention(teacher, attention: str) -> None:
    """The teacher attends as the student does (packed rows: per-sample attention)."""
    from ..models.attention import use_attention, use_packed_attention

    if attention == "packed":
        use_packed_attention(teacher)
    else:
        use_attention(teacher, attention)


def load_teacher(name: str, dtype: str):
    """A model folder or name, or a tunesmith adapter folder (the adapter on its own base)."""
    from pathlib import Path

    from ..models.load import load_model

    if not (Path(name) / "tunesmith_method.json").is_file():
        return load_model(name, dtype)[0]
    from ..export.tuned import load_tuned, read_method

    _, meta = read_method(name)
    if not meta.get("base_model_name_or_path"):
        raise ObjectiveError(f"objective.distill.teacher: the adapter {name} names no base model")
    teacher, _ = load_model(meta["base_model_name_or_path"], dtype)
    load_tuned(teacher, name)
    return teacher
