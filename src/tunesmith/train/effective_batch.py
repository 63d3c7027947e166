"""`train.effective_batch`: the batch an optimizer step sees, in samples or tokens, with the
gradient accumulation worked out from the micro-batch and the number of processes.

The SFT-of-small-LLMs study (methods.md §12) trains with ~3,840 or 7,680 samples a step at a low
learning rate; nobody fits that in one micro-batch, so the recipe states the effective batch and
the harness picks `grad_accum`:

    grad_accum = round(effective_batch / (per micro-batch × processes)),  at least 1

A micro-batch is what `train.batch_tokens` (packed) or `train.batch_size` (padded) make it — size
those to memory (`tunesmith estimate` predicts it). Packed micro-batches hold a varying number of
samples and tokens, so "per micro-batch" is the mean over epoch 0's plan: it depends only on the
data and the seed, so a resumed run picks the same `grad_accum`. Tokens are the tokens the model
reads (prompts included), the way batch sizes in tokens are usually counted.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import parse_effective_batch
from .safety import TrainError


@dataclass
class Accumulation:
    target: int  # the effective batch asked for
    unit: str  # "samples" or "tokens"
    per_micro: float  # mean samples or tokens of one micro-batch
    world: int  # processes
    grad_accum: int
    epoch_size: float  # samples or tokens of one epoch

    @property
    def realised(self) -> float:
        """What a step holds on average with the chosen grad_accum."""
        return self.grad_accum * self.world * self.per_micro

    def describe(self, micro: str) -> str:
        procs = f" × {self.world} processes" if self.world > 1 else ""
        text = (f"effective batch {self.target:,} {self.unit}: grad_accum {self.grad_accum}{procs} × "
                f"{self.per_micro:,.1f} {self.unit} per micro-batch ({micro}, mean of epoch 0) = "
                f"{self.realised:,.0f} {self.unit} a step")
        if self.realised > self.epoch_size:
            text += f" — more than one epoch ({self.epoch_size:,.0f} {self.unit})"
        return text


def plan_accumulation(target: str, plan: list[list[int]], lengths, world: int) -> Accumulation:
    """The grad_accum that brings `world` processes' micro-batches (`plan`: one epoch's micro-batches
    as item indices; `lengths`: tokens per item) closest to `target` (`train.effective_batch`)."""
    count, unit = parse_effective_batch(target)
    if not plan:
        raise TrainError("train.effective_batch: the training data makes no micro-batches")
    if unit == "samples":
        epoch_size = float(sum(len(b) for b in plan))
    else:
        epoch_size = float(sum(int(lengths[j]) for b in plan for j in b))
        if epoch_size == 0:
            raise TrainError(f"train.effective_batch={target}: this objective's items have no token lengths; "
                             "give the effective batch in samples")
    per_micro = epoch_size / len(plan)
    accum = max(1, round(count / (per_micro * world)))
    return Accumulation(count, unit, per_micro, world, accum, epoch_size)


def apply_effective_batch(source, cfg, world: int) -> str:
    """Set `cfg.grad_accum` (and the stream's micro-batches a step) from `cfg.effective_batch`;
    return the line that says what was chosen. `source` is the run's DataStream."""
    stream = source.stream
    acc = plan_accumulation(cfg.effective_batch, stream.plan(0), stream.lengths, world)
    replaced = f" (in place of train.grad_accum={cfg.grad_accum})" if cfg.grad_accum not in (1, acc.grad_accum) else ""
    cfg.grad_accum = acc.grad_accum
    source.per_step = acc.grad_accum * world
    micro = (f"train.batch_tokens={cfg.batch_tokens:,}, packed" if stream.packing
             else f"train.batch_size={cfg.batch_size}, padded")
    return f"[tunesmith] {acc.describe(micro)}{replaced}"
