"""One optimizer step's arithmetic: the model with its objective as one module, forward/backward of
an accumulation window, and the mean loss of validation batches.

The loss of one optimizer step is the sum of unit losses over *all* micro-batches of the window
divided by the loss units of the whole window (not a mean of per-batch means, which over-weights
short batches).
"""
from __future__ import annotations

import contextlib

import torch

from ..objectives.sft import SFT
from ..data import to_device
from .batches import trained_tokens
from ..runtime import autocast


class LossModule(torch.nn.Module):
    """The model with its objective as `forward`, so DDP/FSDP wrap one module whose output is the
    loss (the chunked lm_head never runs outside a wrapped forward).

    With a `method`, its auxiliary loss (e.g. a learned MoE router's load balance) joins the loss of
    training forwards: the objective's loss is a sum over units that the harness divides by the
    window's units, so a per-step mean aux counts as aux · (this micro-batch's units) — over the
    window that is the units-weighted mean of the micro-batches' aux values, whatever the
    accumulation. Its metrics are scaled the same way (the harness averages metric sums over units).
    Validation forwards (no grad) get the objective's loss only."""

    def __init__(self, model, objective=None, method=None):
        super().__init__()
        self.model = model
        self.objective = objective or SFT()
        self.method = method

    def forward(self, batch: dict):
        loss_sum, n_units, metrics = self.objective(self.model, batch)
        if self.method is not None and torch.is_grad_enabled():
            aux, aux_metrics = self.method.aux_loss(self.model)
            units = float(n_units)
            if aux is not None:
                loss_sum = loss_sum + aux.to(loss_sum.dtype) * units
            if aux_metrics:
                metrics = {**metrics, **{k: float(v) * units for k, v in aux_metrics.items()}}
        return loss_sum, metrics


def backward_window(runner, batches: list[dict], device, precision: str, window_units: int | None = None,
                    scale: float = 1.0):
    """Forward/backward every micro-batch of one accumulation window, each divided by the loss
    units of the *whole* window (all ranks' micro-batches included), so the summed gradient is
    that of one big batch. `scale` undoes the averaging of data-parallel gradient reduction.
    Returns (this rank's loss sum / window units, window units, this rank's tokens, metric sums)."""
    if window_units is None:
        window_units = sum(trained_tokens(b) for b in batches)
    loss_total, n_tokens, metrics = 0.0, 0, {}
    for i, batch in enumerate(batches):
        batch = to_device(batch, device)
        last = i == len(batches) - 1
        # DDP: sum gradients across ranks once, at the last micro-batch of the window
        sync = runner.no_sync() if hasattr(runner, "no_sync") and not last else contextlib.nullcontext()
        with sync:
            with autocast(device, precision):
                loss_sum, batch_metrics = runner(batch)
            (loss_sum * (scale / max(window_units, 1))).backward()
        loss_total += float(loss_sum.detach())
        n_tokens += int((batch["segment_ids"] > 0).sum())
        for k, v in batch_metrics.items():
            metrics[k] = metrics.get(k, 0.0) + float(v)
    return loss_total / max(window_units, 1), window_units, n_tokens, metrics


@torch.no_grad()
def mean_loss(runner, batches, device, precision: str = "fp32", limit: int = 0, reduce: bool = True):
    """Mean loss per unit over `batches` — (batch, units) pairs, or plain batches counted in
    trained tokens — for validation loss and perplexity; with reduce=False, (loss sum, units)
    for summing across ranks first. `runner` is a LossModule (possibly wrapped) or a causal LM."""
    if hasattr(runner, "config"):  # a plain transformers model
        runner = LossModule(runner)
    was_training = runner.training
    runner.eval()
    total, count = 0.0, 0
    for i, item in enumerate(batches):
        if limit and i >= limit:
            break
        batch, units = item if isinstance(item, tuple) else (item, trained_tokens(item))
        with autocast(device, precision):
            total += float(runner(to_device(batch, device))[0])
        count += units
    runner.train(was_training)
    return (total / max(count, 1), count) if reduce else (total, count)
