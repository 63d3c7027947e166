"""Verifiable rewards for GRPO: functions `(prediction: str, example) -> float`, summed.

    rewards = build_rewards(["task", "format"], get_eval_task("sql"))
    r = rewards(predictions, examples)          # Tensor[N]: the sum of every reward per completion

Names:
- `task`: 1.0 when the task's own verifier accepts the answer (`task.score(...).correct`), else 0.0.
  For `sql` that runs the query on the task's database read-only (2 s limit); for HumanEval and
  `python` task files it runs the code and its tests in the sandbox.
- `exact_match`: 1.0 when the answer equals the reference after SQuAD normalisation.
- `format`: 0.1 for a well-formed answer. `sql`: a single SELECT statement and nothing else (no
  code fence, no prose). Other tasks: non-empty and not repetitive (no 4 words repeated 3 times).
- `module:function` or `path/to/file.py:function`: your own function with the same signature.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

RewardFn = Callable[[str, object], float]
FORMAT_BONUS = 0.1


class RewardError(ValueError):
    """A reward that cannot be built or returned something unusable; the message says which."""


def task_reward(task) -> RewardFn:
    def task_(prediction: str, example) -> float:
        return 1.0 if task.score(prediction, example).correct else 0.0

    return task_


def exact_match_reward(prediction: str, example) -> float:
    from ..eval.metrics import exact_match

    return 1.0 if exact_match(prediction, example.reference) else 0.0


# A later line that reads like a sentence (a capitalised word, then two lower-case words).
_PROSE_LINE = re.compile(r"^\s*[A-Z][a-z]+\s+[a-z]+\s+[a-z]+")


def sql_format_reward(prediction: str, example=None) -> float:
    """FORMAT_BONUS if the answer is one SELECT statement with nothing around it, else 0."""
    text = prediction.strip()
    if text.endswith(";"):
        text = text[:-1].rstrip()
    if not re.match(r"select\b", text, re.I) or "```" in text or re.search(r"\n[ \t]*\n", text):
        return 0.0
    quote = None
    for ch in text:  # one statement: no `;` outside quotes, and every quote closed
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"`":
            quote = ch
        elif ch == ";":
            return 0.0
    if quote is not None or not sqlite3.complete_statement(text + ";"):
        return 0.0
    if any(_PROSE_LINE.match(line) for line in text.splitlines()[1:]):
        return 0.0
    return FORMAT_BONUS


def repetitive(text: str, n: int = 4, times: int = 3) -> bool:
    """Whether some run of `n` words occurs `times` times or more (a degenerate loop)."""
    words = text.split()
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= times


def generic_format_reward(prediction: str, example=None) -> float:
    """FORMAT_BONUS for a non-empty, non-repetitive answer."""
    text = prediction.strip()
    return FORMAT_BONUS if text and not repetitive(text) else 0.0


def format_reward(task) -> RewardFn:
    return sql_format_reward if getattr(task, "name", None) == "sql" else generic_format_reward


def load_function(spec: str) -> RewardFn:
    """`package.module:function` (imported) or `path/to/file.py:function` (loaded from the file)."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise RewardError(f"reward `{spec}`: a custom reward is `module:function` or `file.py:function`")
    try:
        if where.endswith(".py") or "/" in where:
            path = Path(where).expanduser()
            if not path.is_file():
                raise RewardError(f"reward `{spec}`: file not found: {path}")
            module_spec = importlib.util.spec_from_file_location(f"tunesmith_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except RewardError:
        raise
    except Exception as e:  # the user's module failed to import: say so in one line
        raise RewardError(f"reward `{spec}`: cannot import `{where}`: {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise RewardError(f"reward `{spec}`: `{where}` has no attribute `{attr}`")
    if not callable(fn):
        raise RewardError(f"reward `{spec}`: `{attr}` is a {type(fn).__name__}, not a function "
                          "(prediction, example) -> float")
    return fn


BUILTIN = ("task", "exact_match", "format")


def get_reward(name: str, task) -> RewardFn:
    if name == "task":
        return task_reward(task)
    if name == "exact_match":
        return exact_match_reward
    if name == "format":
        return format_reward(task)
    if ":" in name:
        return load_function(name)
    raise RewardError(f"unknown reward `{name}`; choose from {', '.join(BUILTIN)} or give module:function")


class Rewards:
    """Named reward functions; calling it returns their sum per completion."""

    def __init__(self, names: list[str], task):
        if not names:
            raise RewardError("objective.grpo.reward is empty: name at least one reward (e.g. [task])")
        self.names = list(names)
        self.fns = {name: get_reward(name, task) for name in self.names}

    def components(self, predictions: list[str], examples: list) -> dict[str, torch.Tensor]:
        """{reward name: Tensor[N]} for N completions and their examples."""
        if len(predictions) != len(examples):
            raise RewardError(f"{len(predictions)} predictions for {len(examples)} examples")
        out = {}
        for name, fn in self.fns.items():
            values = []
            for pred, ex in zip(predictions, examples):
                try:
                    v = fn(pred, ex)
                except Exception as e:
                    raise RewardError(f"reward `{name}` failed on example {getattr(ex, 'id', '?')}: "
                                      f"{type(e).__name__}: {e}") from e
                if isinstance(v, bool):
                    v = float(v)
                if not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise RewardError(f"reward `{name}` returned {v!r} on example {getattr(ex, 'id', '?')}: "
                                      "expected a finite number")
                values.append(float(v))
            out[name] = torch.tensor(values, dtype=torch.float32)
        return out

    def __call__(self, predictions: list[str], examples: list) -> torch.Tensor:
        return torch.stack(list(self.components(predictions, examples).values())).sum(0)


def build_rewards(names: list[str], task) -> Rewards:
    """The summed reward of `names` (see the module docstring) for `task`."""
    return Rewards(names, task)
