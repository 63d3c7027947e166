"""Built-in generated tasks: train, validation and test splits built by code from a seed, with a
scorer. Nothing is downloaded and no data files are shipped.

    task = get_task("sql", seed=0)          # or "json"
    task.examples("test")                   # list[Example]
    task.score(model_text, example)         # Verdict
    task_records(task, "train")             # chat records for SFT (also: data.train=task:sql/train)
"""
from __future__ import annotations

from .base import SPLITS, Task
from .extract import ExtractTask
from .intent import IntentTask
from .knowledge import KnowledgeTask
from .retrieval import RetrievalTask
from .sql import SqlTask
from .translation import TranslationTask

BUILTIN = {"sql": SqlTask, "json": ExtractTask, "retrieval": RetrievalTask, "intent": IntentTask,
           "knowledge": KnowledgeTask}


def get_task(name: str, **options) -> Task:
    """The built-in task `name`, constructed with `options` (e.g. seed=1, n_train=400)."""
    if name.startswith("translate-"):  # a family of tasks: translate-XX, translate-XX-YY, translate-all
        return TranslationTask(name, **options)
    if name not in BUILTIN:
        raise ValueError(f"unknown task `{name}`; built-in tasks: {', '.join(sorted(BUILTIN))}, translate-XX")
    return BUILTIN[name](**options)


def task_records(task: Task, split: str) -> list[dict]:
    """The examples of `split` as chat records: system prompt (if any), question, gold answer; a task
    with records of its own shape (retrieval: query, positive, negatives) gives those."""
    if split not in SPLITS:
        raise ValueError(f"unknown split `{split}`; choose one of {', '.join(SPLITS)}")
    if hasattr(task, "records"):
        return task.records(split)
    system = [{"role": "system", "content": task.system_prompt}] if task.system_prompt else []
    return [{"messages": system + [{"role": "user", "content": ex.prompt},
                                   {"role": "assistant", "content": ex.reference}]}
            for ex in task.examples(split)]


__all__ = ["BUILTIN", "ExtractTask", "RetrievalTask", "SqlTask", "TranslationTask", "get_task", "task_records"]
