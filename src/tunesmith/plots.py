"""One way to draw the curves of a run report (matplotlib, headless): lines, and marked points."""
from __future__ import annotations

from pathlib import Path


def plot_curves(lines: dict[str, list[tuple]], path: Path, ylabel: str, points: dict[str, list[tuple]] | None = None,
                *, xlabel: str = "step", xscale: str = "linear", title: str | None = None) -> bool:
    """Plot each named series of (step, value) pairs as a line (`points`: with markers) to `path`;
    False (nothing written) when there is no data. `xscale="symlog"` spreads counts such as shots
    0, 1, 4, 16, 64 evenly while still showing 0."""
    lines = {k: v for k, v in lines.items() if v}
    points = {k: v for k, v in (points or {}).items() if v}
    if not lines and not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for label, series in lines.items():
        ax.plot(*zip(*series), label=label, lw=1.2)
    for label, series in points.items():
        ax.plot(*zip(*series), "o-", label=label, lw=1.2)
    if xscale == "symlog":  # ticks at the counts themselves, written as plain numbers
        ax.set_xscale("symlog", linthresh=1)
        xs = sorted({x for series in [*lines.values(), *points.values()] for x, *_ in series})
        ax.set_xticks(ticks := _spaced(xs), [f"{x:g}" for x in ticks])
        ax.minorticks_off()
    elif xscale != "linear":
        ax.set_xscale(xscale)
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _spaced(xs: list[float], ratio: float = 1.4) -> list[float]:
    """The counts of a log axis whose labels would not overlap: from the largest down, a count within
    `ratio` of the last one kept is left unlabelled (16 next to 20 would print as "1620")."""
    kept: list[float] = []
    for x in reversed(xs):
        if not kept or x <= 0 or kept[-1] / x >= ratio:
            kept.append(x)
    return kept[::-1]
