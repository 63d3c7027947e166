"""Experiment trackers fed beside metrics.jsonl (`train.report_to`): TensorBoard, MLflow, Weights & Biases.

metrics.jsonl stays the run's own record; a tracker gets the same rows so the run shows up where a team
already compares its experiments. Everything stays on this machine unless the user says otherwise:

- `tensorboard`: event files in `<run>/tb` (`tensorboard --logdir runs`).
- `mlflow`: a file store in `<run>/mlruns` (`mlflow ui --backend-store-uri <run>/mlruns`), or the store
  MLFLOW_TRACKING_URI names; experiment MLFLOW_EXPERIMENT_NAME or `tunesmith`; the resolved recipe as
  flattened params (`train.lr`, ...); the run ends FINISHED, or FAILED when training raised.
- `wandb`: an offline run in `<run>/wandb` (`wandb sync <run>/wandb/offline-run-*` uploads it later)
  unless WANDB_MODE says otherwise; project WANDB_PROJECT or `tunesmith`; the recipe as its config.

Resume: the tracker's run id is kept in `<run>/trackers.json` and a resumed run continues that run.
Steps past the checkpoint that a crashed session had already sent are not sent again (MLflow and W&B
keep every value they are given, so a replayed step would show twice); TensorBoard instead drops them
itself (a purge marker at the checkpoint's step) and takes the new values. A tracker first named on a
resume gets the kept history first, so every tracker holds the whole curve.

Each tracker's package is imported only when the recipe names it: a run without them pays nothing.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from ..jsonl import write_json
from .safety import TrainError

TRACKERS = ("tensorboard", "mlflow", "wandb")
# the module that says a tracker is installed, and the package that installs it
_MODULE = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
_PACKAGE = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb"}
STATE_FILE = "trackers.json"


def available(report_to) -> list[str]:
    """The trackers of `report_to` to run, in order, each once. One that is not installed is an error
    naming the key and the package, except TensorBoard alone (the default), which is skipped quietly
    as before `report_to` existed: a run without it still has metrics.jsonl."""
    names = list(dict.fromkeys(report_to or []))
    missing = [n for n in names if importlib.util.find_spec(_MODULE[n]) is None]
    if missing == ["tensorboard"] and names == ["tensorboard"]:
        return []
    if missing:
        packages = " ".join(_PACKAGE[n] for n in missing)
        raise TrainError(f"train.report_to names {', '.join(missing)}, which is not installed: "
                         f"pip install {packages} (or drop it from train.report_to)")
    return names


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested recipe as `section.key` -> text, the form MLflow params take (a list is one value)."""
    out: dict[str, str] = {}
    for key, value in (config or {}).items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        elif value is not None:
            out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return out


def numbers(row: dict) -> dict[str, float]:
    """The row's plottable values: numbers (bools as 0/1), the step left out."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


class Tracker:
    """One tracker. `open` starts (or continues) its run and says whether it continued one that
    already holds this run's earlier steps; `log` sends one row; `close` ends the run."""

    name = ""

    def open(self, resuming: bool, state: dict) -> bool:
        raise NotImplementedError

    def log(self, row: dict, step: int) -> None:
        raise NotImplementedError

    def close(self, failed: bool) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.folder, self.resume_step = Path(run_dir) / "tb", resume_step

    def open(self, resuming: bool, state: dict) -> bool:
        from torch.utils.tensorboard import SummaryWriter

        continued = resuming and self.folder.is_dir()
        # events of later steps in older files (a session that went on past its checkpoint, or an
        # earlier attempt) are dropped by TensorBoard's readers on this marker
        self.writer = SummaryWriter(str(self.folder), purge_step=(self.resume_step or 0) + 1)
        return continued

    def log(self, row: dict, step: int) -> None:
        for key, value in numbers(row).items():
            self.writer.add_scalar(key, value, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, run_dir: Path, config: dict):
        self.run_dir, self.config = Path(run_dir), config

    def open(self, resuming: bool, state: dict) -> bool:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or state.get("tracking_uri") or (self.run_dir / "mlruns").as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps its file store behind this switch; it needs no database packages and a
            # run folder stays one folder (the user's own setting wins)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = client = MlflowClient(tracking_uri=uri)
        run_id = state.get("run_id") if resuming else None
        if run_id and self._reopen(run_id):
            self.run_id = run_id
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "tunesmith"
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
            self.run_id = client.create_run(experiment_id, run_name=self.run_dir.name).info.run_id
            params = [Param(k, v[:6000]) for k, v in flatten(self.config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a call
                client.log_batch(self.run_id, params=params[i:i + 100])
            run_id = None
        state.update(run_id=self.run_id)
        if os.environ.get("MLFLOW_TRACKING_URI"):
            state.update(tracking_uri=uri)
        return run_id is not None

    def _reopen(self, run_id: str) -> bool:
        """Mark the stored run RUNNING again; False when the store no longer holds it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        self.client.update_run(run_id, status="RUNNING")
        return True

    def log(self, row: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in numbers(row).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, run_dir: Path, config: dict):
        self.run_dir, self.config = Path(run_dir), config

    def open(self, resuming: bool, state: dict) -> bool:
        # offline unless the user chose a mode: no network, no login prompt
        os.environ.setdefault("WANDB_MODE", "offline")
        import wandb

        run_id = state.get("run_id") if resuming else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "tunesmith", dir=str(self.run_dir),
                              name=self.run_dir.name, id=run_id,
                              resume="allow" if run_id else None, config=self.config, reinit="create_new",
                              settings=wandb.Settings(console="off"))
        state.update(run_id=self.run.id)
        return run_id is not None

    def log(self, row: dict, step: int) -> None:
        self.run.log(numbers(row), step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Trackers:
    """The run's trackers together: opened with the run's earlier rows in view, a failing one turned
    off with a warning (metrics.jsonl and training go on), closed FAILED when an exception is on its
    way out of the training loop."""

    def __init__(self, report_to, run_dir: Path, config: dict | None = None, resume_step: int | None = None,
                 kept: list[dict] = (), sent_until: int = 0):
        self.run_dir = Path(run_dir)
        names = available(report_to)
        self._outer = sys.exc_info()[1]  # an exception already being handled when the run began is not ours
        path = self.run_dir / STATE_FILE
        states = json.loads(path.read_text()) if path.is_file() else {}
        make = {"tensorboard": lambda: TensorBoardTracker(self.run_dir, resume_step),
                "mlflow": lambda: MLflowTracker(self.run_dir, config or {}),
                "wandb": lambda: WandbTracker(self.run_dir, config or {})}
        self.active, self._skip = [], {}
        for name in names:
            tracker, state = make[name](), dict(states.get(name, {}))
            try:
                continued = tracker.open(resume_step is not None, state)
                if not continued:  # a new tracker run gets the history so far
                    for row in kept:
                        tracker.log(row, row.get("step", 0))
            except Exception as e:  # at start a tracker that cannot run stops the run, as a missing one does
                with contextlib.suppress(Exception):
                    tracker.close(failed=True)
                self.close(failed=True)
                raise TrainError(f"train.report_to: {name} could not start ({type(e).__name__}: {e})") from e
            states[name] = state
            self.active.append(tracker)
            # a continued run has every step up to the last one sent (TensorBoard drops those itself)
            self._skip[name] = sent_until if continued and name != "tensorboard" else 0
        if names:
            write_json(path, states)

    def log(self, row: dict) -> None:
        step = row.get("step", 0)
        for tracker in list(self.active):
            if step <= self._skip[tracker.name]:
                continue
            try:
                tracker.log(row, step)
            except Exception as e:  # a tracker's trouble (a full disk, a server) must not end the training
                print(f"[tunesmith] train.report_to: {tracker.name} failed ({type(e).__name__}: {e}); "
                      "it is turned off for the rest of the run, metrics.jsonl goes on", flush=True)
                self.active.remove(tracker)
                with contextlib.suppress(Exception):  # its run is incomplete: mark it so if it still can be
                    tracker.close(failed=True)

    def close(self, failed: bool | None = None) -> None:
        if failed is None:
            failed = sys.exc_info()[1] not in (None, self._outer)
        for tracker in self.active:
            try:
                tracker.close(failed)
            except Exception as e:  # the run's own outcome stands; say what the tracker missed
                print(f"[tunesmith] train.report_to: closing {tracker.name} failed ({type(e).__name__}: {e})",
                      flush=True)
        self.active = []
