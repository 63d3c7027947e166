"""What a task is: examples with a prompt and a reference, and a scorer.

Every evaluation — built-in generated tasks, JSONL task files, HumanEval — goes through this one
shape, so `tunesmith eval`, evaluation during training and the quickstart share one runner.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

SPLITS = ("train", "validation", "test")


@dataclass
class Example:
    id: str
    prompt: str
    "The user message the model answers (rendered with the chat template at generation time)."
    reference: str
    "The gold answer, as the model should write it (what SFT trains on)."
    meta: dict = field(default_factory=dict)
    "Task-specific facts: the template it came from, its values, a database path, unit tests, ..."


@dataclass
class Verdict:
    correct: bool
    score: float = 0.0
    "1.0/0.0 for pass/fail metrics; a fraction for partial-credit metrics."
    error: str | None = None
    "Why it failed, when it did (a SQL error, a failing test, a timeout, ...)."
    extracted: str | None = None
    "What was actually scored after pulling the answer out of the model's text."


class Task(Protocol):
    name: str
    metric: str
    "Name of the main metric, e.g. `execution_accuracy`, `exact_match`, `pass@1`."
    system_prompt: str | None

    def examples(self, split: str) -> list[Example]:
        """The examples of `split` (one of SPLITS); deterministic for the task's seed."""

    def score(self, prediction: str, example: Example) -> Verdict:
        """Judge one model output against one example."""
