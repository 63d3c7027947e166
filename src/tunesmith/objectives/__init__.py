"""Objectives: plain functions `(model, batch) -> (loss_sum, n_tokens, metrics)`.

They return the *sum* of per-token losses and the number of trained tokens, never a mean: the
loop divides by the trained tokens of the whole accumulation window (and, later, of all ranks),
which is what makes gradient accumulation exact.
"""
from .sft import causal_lm_loss, forward_hidden

__all__ = ["causal_lm_loss", "forward_hidden"]
