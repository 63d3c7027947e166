"""The one table of the synthesis benchmarks: every row of benchmarks/synthesis/*/results.json.

    python benchmarks/synthesis/table.py        # writes benchmarks/synthesis/table.md

Each method's own run.py produced its rows (its docstring has the command); this script only
gathers them, in a fixed order, so the table can be rebuilt without re-running anything.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
ORDER = ["engine", "self_guide", "self_train", "knowledge", "ldp"]
SETTINGS = ["zero-shot", "k-shot", "synthetic in context", "fine-tuned on synthetic", "gold budget"]


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _dropped(row: dict) -> str:
    dropped = row.get("dropped") or {}
    return ", ".join(f"{k} {v}" for k, v in dropped.items() if v) or "–"


def _kept(row: dict) -> str:
    if row.get("kept") is None or row.get("generated") is None:
        return "–"
    return f"{row['kept']}/{row['generated']}"


def rows() -> list[dict]:
    out = []
    for name in ORDER + sorted(p.name for p in HERE.iterdir() if p.is_dir() and p.name not in ORDER):
        path = HERE / name / "results.json"
        if path.is_file():
            data = json.loads(path.read_text())
            out += data["rows"] if isinstance(data, dict) else data
    return out


def _score(row: dict) -> tuple[str, str]:
    """Accuracy as a percentage whichever way a results file wrote it (a share or a percentage)."""
    metric, score = row["metric"], row["score"]
    if metric.startswith("accuracy"):
        return "accuracy (%)", _fmt(100 * score if score <= 1.0 else score)
    return metric, _fmt(score)


def table(rows: list[dict]) -> str:
    head = ("| method | task | setting | metric | score | kept / generated | dropped by filter | generation s "
            "| samples/s | training s |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if r.get("score") is None:
            continue
        metric, score = _score(r)
        lines.append(f"| {r['method']} | {r['task']} | {r['setting']} | {metric} | {score} "
                     f"| {_kept(r)} | {_dropped(r)} | {_fmt(r.get('generation_s'), 0)} "
                     f"| {_fmt(r.get('samples_per_s'), 2)} | {_fmt(r.get('train_s'), 0)} |")
    return "\n".join(lines)


def main() -> None:
    all_rows = rows()
    commands = sorted({r["command"] for r in all_rows if r.get("command")})
    text = ["# Make your own data: one table", "",
            "Every method on a built-in task with a held-out test split, with the embedded "
            "SmolLM2-135M-Instruct on a 2-core CPU. Rebuilt by `python benchmarks/synthesis/table.py` from each "
            "method's results.json; each method's results.md has its notes and evidence.", "",
            table(all_rows), "", "Commands:", ""] + [f"- `{c}`" for c in commands]
    (HERE / "table.md").write_text("\n".join(text) + "\n")
    print((HERE / "table.md").read_text())


if __name__ == "__main__":
    main()
