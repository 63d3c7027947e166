"""Run logging: metrics.jsonl (one JSON object per line) and TensorBoard events."""
from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_metrics(self.path) if resume_step is not None else []
        # a resumed run drops rows written after its checkpoint, so the curve has no duplicates
        kept = [r for r in rows if r.get("step", 0) <= (resume_step or 0)]
        with open(self.path, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard not installed: jsonl alone
                self._tb = None

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            step = row.get("step", 0)
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


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
