"""Where a run's micro-batches come from: the deterministic stream over fixed data.

`MicroBatches` orders a data set into micro-batches; epoch e's order depends only on (seed, e), so
the data position of a resumed run is just the number of micro-batches already consumed.
`DataStream` turns it into the harness's batch source: one `Window` (the micro-batches of one
optimizer step, this rank's share) per step. Objectives that make their own batches (GRPO) bring
their own source with the same three methods: `window(step)`, `state(step)`, `restore(state, step)`.
"""
from __future__ import annotations

import math

from ..data import DataError, collate, plan_batches
from ..objectives.base import ObjectiveBase, Window
from . import distributed


class MicroBatches:
    """A data set's micro-batches, counted across epochs. `objective` says how long an item is,
    how many loss units it holds and what to collate."""

    def __init__(self, items, objective, data_cfg, train_cfg, seed: int, pad_id: int, shuffle: bool | None = None):
        self.items, self.objective, self.pad_id, self.seed = items, objective, pad_id, seed
        self.packing = data_cfg.packing
        self.shuffle = data_cfg.shuffle if shuffle is None else shuffle
        self.batch_tokens, self.batch_size = train_cfg.batch_tokens, train_cfg.batch_size
        self.lengths, self.unit_counts = measure(items, objective)
        if not getattr(objective, "group_by_length", True):  # padded batches drawn at random, not by length
            self.lengths = [0] * len(items)  # (contrastive: the in-batch negatives stay a random sample)
        self._plans: dict[int, list[list[int]]] = {}

    def plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            self._plans = {epoch: plan_batches(
                self.lengths, packing=self.packing, batch_tokens=self.batch_tokens,
                batch_size=self.batch_size, seed=self.seed, epoch=epoch, shuffle=self.shuffle)}
        return self._plans[epoch]

    def locate(self, index: int) -> tuple[int, int]:
        epoch = 0
        while index >= len(self.plan(epoch)):
            index -= len(self.plan(epoch))
            epoch += 1
        return epoch, index

    def units(self, index: int) -> int:
        """Loss units (trained tokens, or pairs) of micro-batch `index`, without building it."""
        epoch, i = self.locate(index)
        return sum(self.unit_counts[j] for j in self.plan(epoch)[i])

    def get(self, index: int) -> tuple[dict, int]:
        """Micro-batch number `index` (counted across epochs) and its epoch."""
        epoch, i = self.locate(index)
        items = [self.items[j] for j in self.plan(epoch)[i]]
        batch = collate(self.objective.rows(items), packing=self.packing, pad_id=self.pad_id)
        return self.objective.finish(items, batch), epoch

    def epoch_batches(self, epoch: int = 0) -> list[tuple[dict, int]]:
        """Every micro-batch of one epoch with its loss units (validation)."""
        plan = self.plan(epoch)
        return [(self.get(i)[0], sum(self.unit_counts[j] for j in plan[i])) for i in range(len(plan))]


def measure(items, objective) -> tuple[list[int], list[int]]:
    """Each item's length and loss units. Lazy data (a shard folder) knows both as arrays, read
    without loading a sample, and they are what a plain-sample objective would compute."""
    plain = type(objective).length is ObjectiveBase.length and type(objective).units is ObjectiveBase.units
    if plain and hasattr(items, "lengths") and hasattr(items, "unit_counts"):
        return items.lengths.tolist(), items.unit_counts.tolist()
    return [objective.length(x) for x in items], [objective.units(x) for x in items]


class DataStream:
    """The batch source of a fixed-data objective: `grad_accum` micro-batches per rank and step,
    normalised by the loss units of the whole window on all ranks."""

    def __init__(self, items, objective, recipe, d, pad_id: int):
        self.cfg, self.d = recipe.train, d
        self.stream = MicroBatches(items, objective, recipe.data, self.cfg, self.cfg.seed, pad_id)
        self.per_step = self.cfg.grad_accum * d.world  # micro-batches of one optimizer step, all ranks
        self.start_step = self.start_micro = 0

    @property
    def per_epoch(self) -> int:
        return len(self.stream.plan(0))

    def total_steps(self) -> int:
        return self.cfg.steps or max(1, math.ceil(self.cfg.epochs * self.per_epoch / self.per_step))

    def _first(self, step: int) -> int:
        return self.start_micro + (step - self.start_step) * self.per_step  # global micro-batch index

    def window(self, step: int) -> Window:
        first = self._first(step)
        units = sum(self.stream.units(first + k) for k in range(self.per_step))
        mine = [self.stream.get(i) for i in distributed.window(first, self.cfg.grad_accum, self.d)]
        return Window(batches=[b for b, _ in mine], units=units, epoch=self.stream.locate(first)[0],
                      metrics={"epoch": mine[-1][1]})

    def fingerprint(self) -> dict:
        """What a data position refers to: resuming over other data would silently train on other batches."""
        return {"samples": len(self.stream.unit_counts), "units": int(sum(self.stream.unit_counts))}

    def state(self, step: int) -> dict:
        return {"micro_batches": self._first(step), "world": self.d.world, "data": self.fingerprint()}

    def restore(self, state: dict, step: int) -> None:
        saved, now = state.get("data"), self.fingerprint()
        if saved is not None and saved != now:
            raise DataError(f"the training data changed since the checkpoint ({saved['samples']:,} samples, "
                            f"{saved['units']:,} loss units then; {now['samples']:,} and {now['units']:,} now): "
                            "a resumed run needs the data it stopped in")
        self.start_step, self.start_micro = step, state.get("micro_batches", step * self.per_step)

    def describe(self, n_items: int, n_val: int, total_steps: int) -> str:
        return (f"data: {n_items:,} train samples ({self.per_epoch:,} micro-batches an epoch), {n_val:,} validation · "
                f"{total_steps:,} steps × {self.per_step} micro-batches")


def trained_tokens(batch: dict) -> int:
    return int((batch["weights"][:, 1:] > 0).sum())
