"""Run logging: metrics.jsonl (one JSON object per line), the run's own record, and the experiment
trackers of `train.report_to` (TensorBoard by default; MLflow, W&B — train/trackers.py)."""
from __future__ import annotations

import json
from pathlib import Path

from .trackers import Trackers


class MetricsLog:
    """metrics.jsonl plus the trackers. `resume_step`: a resumed run's checkpoint step (None for a new
    run); `report_to`: tracker names (None: TensorBoard when installed, as before the key existed);
    `config`: the resolved recipe, the trackers' params/config."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, report_to=None, config: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_metrics(self.path) if resume_step is not None else []
        # a resumed run drops rows written after its checkpoint, so the curve has no duplicates
        kept = [r for r in rows if r.get("step", 0) <= (resume_step or 0)]
        # trackers that continue their run already hold every step written before (see trackers.py)
        sent_until = max((r.get("step", 0) for r in rows), default=0)
        self.trackers = Trackers(["tensorboard"] if report_to is None else report_to, run_dir, config,
                                 resume_step, kept, sent_until)
        with open(self.path, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        self._file = open(self.path, "a", buffering=1)

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self.trackers.log(row)

    def close(self, failed: bool | None = None) -> None:
        """Close the file and end the trackers' runs: FAILED when `failed`, or (None) when an exception
        is on its way out — the loop closes the log in a `finally`."""
        self._file.close()
        self.trackers.close(failed)


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line after a crash
    return rows
