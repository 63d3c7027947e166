"""Reading a runs folder for the dashboard: which runs there are, their status, curves and evaluations.

A run is a folder directly under the runs folder holding a `recipe.yaml`, a `metrics.jsonl`, a
`stages.json` (a staged job, whose stages are listed too, as `<job>/<stage>`) or a `train.log` (a
training the dashboard launched, before it wrote anything). Run ids are these
relative names and nothing else: every request names a run by id and the id is looked up in the
listing, so no request can reach a file outside the runs folder (a symlinked run folder that
points outside it is not listed).

Status, from what `tunesmith train` leaves on disk (it writes no lock or pid file):
- finished: the run saved its output (`adapter/` or `model/`; a staged job: every stage completed);
- running: the dashboard launched it and the process is alive, or a file of the run (metrics,
  recipe, checkpoints, stage state) changed within the last `live_window` seconds (or three of its
  last steps' `step_s`, when its steps take longer than that);
- interrupted: neither, and a checkpoint is there (`resume=true` continues it);
- failed: neither, and no checkpoint (it stopped before its first save).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from ..train.metrics import read_metrics

LIVE_WINDOW_S = 120.0  # a run whose files changed this recently is taken as training
MARKERS = ("recipe.yaml", "metrics.jsonl", "stages.json")
OUTPUTS = ("adapter", "model")
MAX_EXAMPLES = 500  # per-example rows one eval request returns at most


class UnknownRun(LookupError):
    """A run id that is not in the runs folder's listing."""


class RunsFolder:
    """The runs under `root`; `alive(path)` says whether a process the dashboard started for that
    run folder still runs (None: it started none)."""

    def __init__(self, root: str | Path, live_window: float = LIVE_WINDOW_S, alive=None):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"runs folder {root} does not exist (train a recipe first, or name "
                                    "the folder that holds your runs)")
        self.live_window = live_window
        self.alive = alive or (lambda path: None)
        self._cache: dict[tuple[Path, str], tuple[tuple, object]] = {}

    # ---------------------------------------------------------------------------------------------
    # the listing

    def ids(self) -> dict[str, Path]:
        """Run id → folder, in name order (a job's stages right after the job)."""
        found: dict[str, Path] = {}
        for folder in sorted(self.root.iterdir(), key=lambda p: p.name):
            if not _is_run(folder) or not _inside(folder, self.root):
                continue
            found[folder.name] = folder
            for stage in _stage_names(folder):
                sub = folder / stage
                if sub.is_dir() and _inside(sub, self.root):
                    found[f"{folder.name}/{stage}"] = sub
        return found

    def find(self, run_id: str) -> Path:
        folder = self.ids().get(run_id)
        if folder is None:
            raise UnknownRun(f"no run `{run_id}` in {self.root.name}/ (see /api/runs for the runs there)")
        return folder

    def list(self) -> list[dict]:
        return [self.summary(run_id, folder) for run_id, folder in self.ids().items()]

    def summary(self, run_id: str, folder: Path) -> dict:
        """One row of the runs table: what ran, how far, how well."""
        recipe = read_recipe(folder)
        rows = self.rows(folder)
        train = [r for r in rows if "loss" in r]
        val = [r["val_loss"] for r in rows if isinstance(r.get("val_loss"), (int, float))]
        section = lambda name: recipe.get(name) if isinstance(recipe.get(name), dict) else {}  # noqa: E731
        return {
            "id": run_id, "name": folder.name, "kind": "job" if (folder / "stages.json").is_file() else
            ("stage" if "/" in run_id else "run"),
            "status": self.status(folder), "updated": _newest_change(folder),
            "model": section("model").get("name"), "method": section("method").get("name"),
            "objective": section("objective").get("name"), "data": section("data").get("train"),
            "steps": train[-1]["step"] if train else 0, "total_steps": section("train").get("steps"),
            "loss": train[-1]["loss"] if train else None, "best_val_loss": min(val) if val else None,
            "evals": self._eval_summaries(folder),
        }

    def status(self, folder: Path) -> str:
        if (folder / "stages.json").is_file():
            stages = _read_json(folder / "stages.json").get("stages", [])
            if stages and all(s.get("status") == "completed" for s in stages):
                return "finished"
        elif any((folder / name).exists() for name in OUTPUTS):
            return "finished"
        alive = self.alive(folder)
        if alive or (alive is None and time.time() - _newest_change(folder) < self.quiet_allowed(folder)):
            return "running"
        checkpoints = list(folder.glob("checkpoints/step-*")) + list(folder.glob("*/checkpoints/step-*"))
        return "interrupted" if checkpoints else "failed"

    def quiet_allowed(self, folder: Path) -> float:
        """How long a training may write nothing and still count as running: the live window, or three
        of its last steps when its steps are slower than that (a large model on a CPU)."""
        rows = self.rows(folder)
        step_s = rows[-1].get("step_s") if rows else None
        return max(self.live_window, 3 * step_s) if isinstance(step_s, (int, float)) else self.live_window

    # ---------------------------------------------------------------------------------------------
    # one run

    def rows(self, folder: Path) -> list[dict]:
        """The run's metric rows; a staged job's are its stages' rows one after the other, each step
        shifted by the steps of the stages before it and tagged with its stage."""
        if (folder / "stages.json").is_file():
            out, offset = [], 0
            for stage in _stage_names(folder):
                rows = self._metrics(folder / stage / "metrics.jsonl")
                out += [{**r, "step": r.get("step", 0) + offset, "stage": stage} for r in rows]
                offset = out[-1]["step"] if out else offset
            return out
        return self._metrics(folder / "metrics.jsonl")

    def _metrics(self, path: Path) -> list[dict]:
        """read_metrics (which stops at a torn last line), read again only when the file changed."""
        return self._cached(path, _metric_rows, [])

    def _cached(self, path: Path, read, missing):
        """`read(path)`, kept until the file's size or modification time changes: the page asks for
        the listing every few seconds, and evaluation files can hold thousands of answers."""
        try:
            st = path.stat()
        except OSError:
            return missing
        key = (st.st_mtime_ns, st.st_size)
        cached = self._cache.get((path, read.__name__))
        if cached is None or cached[0] != key:
            cached = (key, read(path))
            self._cache[(path, read.__name__)] = cached
        return cached[1]

    def _eval_summaries(self, folder: Path) -> dict:
        out = {}
        for label, path in eval_files(folder):
            found = self._cached(path, eval_summary, None)
            if found is not None:
                out[label] = found
        return out

    def metrics(self, run_id: str, since: int = 0) -> dict:
        """Rows from index `since` on, and the index to ask from next. A cursor by row rather than by
        step: a validation row shares its step with the training row before it. When the file has
        fewer rows than `since` (a resumed run drops the rows after its checkpoint), every row comes
        back with `reset` set, so the page redraws instead of keeping stale points."""
        rows = self.rows(self.find(run_id))
        reset = since > len(rows)
        start = 0 if reset else max(since, 0)
        return {"rows": rows[start:], "next": len(rows), "reset": reset}

    def evals(self, run_id: str, limit: int = MAX_EXAMPLES) -> dict:
        return compare_evals(self.find(run_id), limit)

    def recipe_text(self, run_id: str) -> str:
        path = self.find(run_id) / "recipe.yaml"
        return path.read_text() if path.is_file() else ""

    def log_tail(self, run_id: str, chars: int = 8000) -> str:
        """The end of `train.log`: the output of a training the dashboard launched."""
        path = self.find(run_id) / "train.log"
        if not path.is_file():
            return ""
        with open(path, "rb") as f:
            f.seek(max(path.stat().st_size - chars, 0))
            return f.read().decode("utf-8", "replace")


# -------------------------------------------------------------------------------------------------
# evaluations: eval-<label>.json (tunesmith.eval.runner.save_result); quickstart: base and tuned


def eval_files(folder: Path) -> list[tuple[str, Path]]:
    """(label, path) of each evaluation, `base` first and `tuned` after it: before, then after."""
    order = {"base": 0, "tuned": 1}
    found = [(p.stem[len("eval-"):], p) for p in folder.glob("eval-*.json")]
    return sorted(found, key=lambda lp: (order.get(lp[0], 2), lp[0]))


def eval_summary(path: Path) -> dict | None:
    """An evaluation's task, split and main metric; None for a file that is not one."""
    data = _read_json(path)
    summary, metric = data.get("summary") or {}, data.get("metric")
    if not (isinstance(summary, dict) and isinstance(metric, str) and metric in summary):
        return None
    return {"task": data.get("task"), "split": data.get("split"), "metric": metric,
            "value": summary[metric], "examples": summary.get("examples")}


def compare_evals(folder: Path, limit: int = MAX_EXAMPLES) -> dict:
    """Every evaluation's summary, and the examples side by side: one row per example (joined on the
    record's id, else its position) with each evaluation's answer — the before/after view."""
    files, examples, index = [], [], {}
    for label, path in eval_files(folder):
        data = _read_json(path)
        records = data.get("records") if isinstance(data.get("records"), list) else []
        files.append({"label": label, "task": data.get("task"), "split": data.get("split"),
                      "metric": data.get("metric"), "summary": data.get("summary") or {}, "model": data.get("model"),
                      "adapter": data.get("adapter")})
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                continue
            key = str(rec.get("id", i))
            if key not in index:
                if len(examples) >= limit:
                    continue
                index[key] = len(examples)
                examples.append({"id": key, "prompt": rec.get("prompt"), "reference": rec.get("reference"),
                                 "answers": {}})
            examples[index[key]]["answers"][label] = {
                "prediction": rec.get("prediction"), "correct": rec.get("correct"), "score": rec.get("score")}
    return {"files": files, "examples": examples, "labels": [f["label"] for f in files]}


# -------------------------------------------------------------------------------------------------
# the methods benchmark table


def load_bench(path: str | Path) -> dict:
    """A benchmark's results.json (a list of objects, one per row) as columns and rows; the columns
    in the order they first appear, so the table reads as the benchmark wrote it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read the benchmark results ({e.strerror})") from None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: benchmark results must be a JSON list of objects, one per row")
    columns: list[str] = []
    for row in data:
        columns += [k for k in row if k not in columns]
    return {"name": path.parent.name or path.stem, "file": path.name, "columns": columns, "rows": data}


# -------------------------------------------------------------------------------------------------
# small readers


def _metric_rows(path: Path) -> list[dict]:
    return [r for r in read_metrics(path) if isinstance(r, dict)]


def read_recipe(folder: Path) -> dict:
    try:
        data = yaml.safe_load((folder / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_run(folder: Path) -> bool:
    return folder.is_dir() and not folder.name.startswith(".") and \
        any((folder / m).is_file() for m in (*MARKERS, "train.log"))


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except ValueError:
        return False
    return True


def _stage_names(folder: Path) -> list[str]:
    if not (folder / "stages.json").is_file():
        return []
    stages = _read_json(folder / "stages.json").get("stages", [])
    return [s["name"] for s in stages if isinstance(s, dict) and isinstance(s.get("name"), str)
            and "/" not in s["name"] and not s["name"].startswith(".")]


def _newest_change(folder: Path) -> float:
    """The newest modification time among the files a training run keeps writing."""
    paths = [folder, *(folder / n for n in (*MARKERS, "checkpoints", "train.log"))]
    paths += [p / n for p in folder.iterdir() if p.is_dir() for n in ("metrics.jsonl", "checkpoints")] \
        if (folder / "stages.json").is_file() else []
    times = []
    for p in paths:
        try:
            times.append(p.stat().st_mtime)
        except OSError:
            pass
    return max(times, default=0.0)
