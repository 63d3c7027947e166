"""A task read from a JSONL file: one example per line.

    {"prompt": "Translate to French: cheese", "reference": "fromage"}
    {"prompt": "...", "reference": "...", "tests": "assert f(2) == 4", "entry_point": "f"}   # metric python
    {"prompt": "...", "reference": "SELECT ...", "db": "shop.sqlite"}                          # metric sql

The metric is chosen with `metric=` (exact_match by default); `bleu`, `chrf` and `chrf++` are corpus
metrics, so each example's verdict there is a sentence-level chrF (chrF++ for `chrf++`).
"""
from __future__ import annotations

from pathlib import Path

from ..jsonl import read_jsonl
from ..data.tasks.base import Example, Verdict

METRICS = ("exact_match", "contains", "bleu", "chrf", "chrf++", "sql", "python")


class FileTaskError(ValueError):
    """A task file or its metric cannot be used; the message names the file and line."""


class FileTask:
    system_prompt = None

    def __init__(self, path: str | Path, metric: str = "exact_match"):
        self.path = Path(path)
        if metric not in METRICS:
            raise FileTaskError(f"metric `{metric}` is unknown; choose one of {', '.join(METRICS)}")
        if not self.path.is_file():
            raise FileTaskError(f"task file not found: {self.path}")
        self.name, self.metric = self.path.stem, metric
        self._examples = self._read()

    def _read(self) -> list[Example]:
        examples = []
        for where, row in read_jsonl(self.path, FileTaskError):
            if not isinstance(row, dict):
                raise FileTaskError(f"{where}: expected a JSON object")
            for key in ("prompt", "reference"):
                if not isinstance(row.get(key), str):
                    raise FileTaskError(f"{where}: needs a string field `{key}`")
            if self.metric == "python" and not isinstance(row.get("tests"), str):
                raise FileTaskError(f"{where}: metric python needs a string field `tests`")
            if self.metric == "sql":
                if not isinstance(row.get("db"), str):
                    raise FileTaskError(f"{where}: metric sql needs a field `db` (a sqlite file)")
                db = Path(row["db"])
                row["db"] = str(db if db.is_absolute() else self.path.parent / db)
            meta = {k: v for k, v in row.items() if k not in ("prompt", "reference")}
            examples.append(Example(str(row.get("id", where.rsplit(":", 1)[1])), row["prompt"], row["reference"], meta))
        if not examples:
            raise FileTaskError(f"{self.path}: no examples")
        return examples

    def examples(self, split: str = "test") -> list[Example]:
        return self._examples

    def score(self, prediction: str, example: Example) -> Verdict:
        from .metrics import chrf, chrf_pp, exact_match, normalize_answer

        if self.metric == "exact_match":
            ok = exact_match(prediction, example.reference)
            return Verdict(ok, float(ok), extracted=prediction.strip())
        if self.metric == "contains":
            ok = normalize_answer(example.reference) in normalize_answer(prediction)
            return Verdict(ok, float(ok), extracted=prediction.strip())
        if self.metric in ("bleu", "chrf", "chrf++"):
            s = (chrf_pp if self.metric == "chrf++" else chrf)([prediction.strip()], [example.reference])
            return Verdict(s >= 99.99, s / 100, extracted=prediction.strip())
        if self.metric == "python":
            from .code import score_python

            return score_python(prediction, example.meta["tests"], entry_point=example.meta.get("entry_point"))
        from ..data.tasks.sql import score_sql

        return score_sql(prediction, example.reference, example.meta["db"], ordered=example.meta.get("ordered"))
