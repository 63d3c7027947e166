"""One way to draw the curves of a run report (matplotlib, headless): lines, and marked points."""
from __future__ import annotations

from pathlib import Path


def plot_curves(lines: dict[str, list[tuple]], path: Path, ylabel: str, points: dict[str, list[tuple]] | None = None) -> bool:
    """Plot each named series of (step, value) pairs as a line (`points`: with markers) to `path`;
    False (nothing written) when there is no data."""
    lines = {k: v for k, v in lines.items() if v}
    points = {k: v for k, v in (points or {}).items() if v}
    if not lines:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for label, series in lines.items():
        ax.plot(*zip(*series), label=label, lw=1.2)
    for label, series in points.items():
        ax.plot(*zip(*series), "o-", label=label, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
