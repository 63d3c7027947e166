"""The objective protocol: what the run harness (`tunesmith.train.loop`) needs from a training objective.

An objective is a loss over batches plus the few facts that make batching, logging and guarding it
right. The harness owns everything else — run folder, resume, optimizer, schedule, method hooks,
divergence guard, checkpoints, evaluation, report — the same for every objective.

    class MyObjective(ObjectiveBase):
        name, unit = "my", "trained_tokens"

        @classmethod
        def build(cls, recipe, model, **extras):        # the recipe's options, a teacher, a task...
            return cls(recipe.train.loss_chunk)

        def __call__(self, model, batch):               # (loss_sum, loss units, metric sums)
            ...

A new objective is one module in this folder — its class and, if it has options, their class (a
`config.Config`) named by `Options`/`block` — and one line in `REGISTRY` (objectives/__init__.py);
the recipe's `objective` section is assembled from the registry.

Losses are *sums* over loss units (a trained token, a pair, ...), never means: the harness divides by
the units of the whole accumulation window on all ranks, which keeps gradient accumulation exact.
Metrics are sums over units too (the harness averages them).

Fixed-data objectives (SFT, the preference family, distillation) say how to read their data
(`load`) and how long an item is, how many units it holds and what to collate (`length`, `units`,
`rows`, `finish`); the harness streams micro-batches of it. An objective that makes its own batches
(GRPO samples completions) returns a batch source from `source(run)` instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class ObjectiveError(ValueError):
    """An objective configured in a way that cannot run; the message says what to change."""


class Objective(Protocol):
    name: str
    "The recipe's `objective.name`."
    unit: str
    "What one loss unit is, as logged (`trained_tokens`, `pairs`, `completion_tokens`)."
    token_loss: bool
    "The loss is a mean token cross-entropy, so ln(vocab) means uniform predictions (divergence guard)."
    trends_down: bool
    "The loss should fall over a run (not a policy-gradient loss hovering at 0): unrecovered spikes stop it."
    multi_process: bool
    "Runs under DDP/FSDP with several processes."
    evaluates_at_end: bool
    "Measures `eval.task` once training ends (and saves eval-<split>.json) even when eval.every is 0."
    fixed_data: bool
    "Trains on a fixed data set read by `load` (False: `source` makes the batches)."
    Options: type | None
    "The options class (config.Config) of its recipe block `objective.<block>`; None: no options."
    block: str | None
    "The recipe block it reads (several objectives may share one, e.g. `preference`)."

    def __call__(self, model, batch: dict) -> tuple:
        """(loss_sum, n_units, metric sums) for one collated micro-batch."""

    def load(self, recipe, tokenizer):
        """(A classmethod: called before the objective is built.) The data splits (`.train`, `.val`, `.stats`) of a fixed-data objective."""

    def length(self, item) -> int:
        """Tokens an item takes in a micro-batch (its whole packed length)."""

    def units(self, item) -> int:
        """Loss units of an item."""

    def rows(self, items) -> list:
        """The samples to collate for these items."""

    def finish(self, items, batch: dict) -> dict:
        """Add what the loss needs beyond the collated tensors (e.g. precomputed reference log-probs)."""

    def prepare(self, run) -> None:
        """Once the model, data and device are ready, before the first step (e.g. precompute a reference)."""

    def source(self, run):
        """A batch source (`window(step)`, `state(step)`, `restore(state, step)`) when the objective
        makes its own batches; None: the harness streams `load`'s data."""

    def report_sections(self, run_dir, rows: list[dict], eval_result) -> list[str]:
        """Extra markdown sections of the run report (`rows`: the run's metrics.jsonl)."""


class ObjectiveBase:
    """Defaults for every optional part of the protocol: a fixed-data objective over plain samples."""

    name = "objective"
    unit = "trained_tokens"
    token_loss = False
    trends_down = True
    multi_process = True
    evaluates_at_end = False
    fixed_data = True
    Options = None  # the options class of its recipe block (`objective.<block>`), if it has options
    block: str | None = None
    block_doc = ""

    @classmethod
    def resolve(cls, name: str, options) -> None:
        """Fill in option defaults that depend on the chosen objective name (in place)."""
        return None

    @classmethod
    def load(cls, recipe, tokenizer):
        from ..data import load_data

        return load_data(recipe.data, tokenizer, seed=recipe.train.seed)

    def length(self, item) -> int:
        return len(item["input_ids"])

    def units(self, item) -> int:
        return sum(w > 0 for w in item["weights"])  # weights[0] is always 0

    def rows(self, items) -> list:
        return items

    def finish(self, items, batch: dict) -> dict:
        return batch

    def prepare(self, run) -> None:
        return None

    def source(self, run):
        return None

    def report_sections(self, run_dir, rows: list[dict], eval_result) -> list[str]:
        return []


@dataclass
class Window:
    """The micro-batches of one optimizer step, as a batch source hands them to the harness."""

    batches: list[dict]
    "This rank's micro-batches (collated; non-tensor values travel with them as they are)."
    units: int
    "Loss units of the whole window on all ranks: the divisor of every micro-batch's loss sum."
    epoch: int = 0
    "The epoch (pass over the data) the window starts in: method hooks run once per epoch."
    metrics: dict = field(default_factory=dict)
    "Logged as they are (e.g. GRPO's rewards)."
    passes: int = 1
    "Optimizer updates on these same batches (GRPO's iterations); the schedule advances once."
    tokens: int | None = None
    "Tokens the step processed, for tokens/s (default: the real tokens of the batches)."
    metric_units: int | None = None
    "Divisor of the objective's metric sums (default: `units`)."
