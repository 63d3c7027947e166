"""`<run>/report.md`: what a run did, with its loss curves — written by every `tunesmith train`."""
from __future__ import annotations

import math
from pathlib import Path

from ..plots import plot_curves
from .metrics import read_metrics


def plot_losses(rows: list[dict], path: Path) -> bool:
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    return plot_curves({"train loss": train}, path, "loss (nats/token)", points={"validation loss": val})


def _expert_lines(row: dict) -> list[str]:
    """A learned MoE router's utilisation at the last logged step (`models.moe.expert_stats`)."""
    shares = sorted((int(k.rsplit("_e", 1)[1]), v) for k, v in row.items() if k.startswith("moe/share_e"))
    if not shares:
        return []
    return [f"| expert share, last step | {' · '.join(f'e{e} {100 * v:.0f}%' for e, v in shares)} |",
            f"| expert load / router entropy, last step | {row['moe/load_entropy']:.3f} / "
            f"{row['moe/router_entropy']:.3f} nats (balanced: {math.log(len(shares)):.3f}) |"]


def write_report(run_dir: Path, summary: dict, extra_sections: list[str] | None = None) -> Path:
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    lines = [f"# Run `{run_dir.name}`", ""]
    lines += ["| figure | value |", "|---|---|"]
    if train:
        lines.append(f"| steps | {train[-1]['step']} |")
        lines.append(f"| first / last train loss | {train[0]['loss']:.4f} / {train[-1]['loss']:.4f} |")
        speeds = sorted(r["tokens_per_s"] for r in train[1:] or train)
        lines.append(f"| tokens/s (median step) | {speeds[len(speeds) // 2]:,.0f} |")
    prefs = [r for r in train if "rewards/margins" in r]
    if prefs:
        first, last = prefs[0], prefs[-1]
        lines.append(f"| reward margin, first / last step | {first['rewards/margins']:.3f} / {last['rewards/margins']:.3f} |")
        lines.append(f"| reward accuracy, first / last step | {100 * first['rewards/accuracies']:.0f}% / "
                     f"{100 * last['rewards/accuracies']:.0f}% |")
    lines += _expert_lines(train[-1] if train else {})
    val = [r for r in rows if "val_loss" in r]
    if val:
        lines.append(f"| validation loss (last) | {val[-1]['val_loss']:.4f} |")
    if summary.get("peak_mem_gb") is not None:
        lines.append(f"| peak memory | {summary['peak_mem_gb']:.2f} GB |")
    if summary.get("wall_s") is not None:
        lines.append(f"| wall time (this session) | {summary['wall_s']:.0f} s |")
    lines.append("")
    if plot_losses(rows, run_dir / "loss.png"):
        lines += ["## Loss", "", "![loss curves](loss.png)", ""]
    for section in extra_sections or []:
        lines += [section, ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
