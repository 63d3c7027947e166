"""Human-readable view of rendered data, for `tunesmith data inspect`."""
from __future__ import annotations

import sys

from .render import Sample

GREEN, RESET = "\033[32m", "\033[0m"
OPEN, CLOSE = "⟦", "⟧"

COLUMNS = [  # (header, stats key)
    ("records", "records"),
    ("samples", "samples"),
    ("truncated", "truncated"),
    ("too long", "dropped_too_long"),
    ("no trained", "no_trained_token"),
    ("len p50", "length_p50"),
    ("p90", "length_p90"),
    ("p99", "length_p99"),
    ("max", "length_max"),
    ("tokens", "tokens"),
    ("trained", "trained_tokens"),
]


def format_inspection(samples: list[Sample], tokenizer, stats: dict, n: int = 3, color: bool | None = None) -> str:
    """The first `n` samples decoded with trained tokens marked, then the statistics table.

    Trained spans are green when `color` (default: stdout is a terminal), else wrapped in ⟦ ⟧.
    `stats` is `DataSplits.stats` ({split: counts}) or the counts of a single split.
    """
    if color is None:
        color = sys.stdout.isatty()
    parts = []
    for k, sample in enumerate(samples[:n]):
        trained = sum(1 for w in sample["weights"] if w)
        parts.append(f"── sample {k + 1} of {len(samples)}: {len(sample['input_ids'])} tokens, {trained} trained ──")
        parts.append(mark_trained(sample, tokenizer, color))
        parts.append("")
    legend = "green" if color else f"{OPEN} {CLOSE}"
    parts.append(f"(trained tokens are shown {legend})")
    parts.append("")
    parts.append(stats_table(stats))
    return "\n".join(parts)


def mark_trained(sample: Sample, tokenizer, color: bool) -> str:
    """Decode a sample, wrapping each run of trained tokens (weight != 0) in a marker."""
    ids, weights = sample["input_ids"], sample["weights"]
    out, start = [], 0
    # Decode runs rather than single tokens, so multi-token characters come out whole.
    for t in range(1, len(ids) + 1):
        if t == len(ids) or bool(weights[t]) != bool(weights[start]):
            text = tokenizer.decode(ids[start:t], skip_special_tokens=False)
            if weights[start]:
                text = f"{GREEN}{text}{RESET}" if color else f"{OPEN}{text}{CLOSE}"
            out.append(text)
            start = t
    return "".join(out)


def stats_table(stats: dict) -> str:
    """A fixed-width table, one row per split, plus the fraction of tokens that train."""
    splits = {"data": stats} if "samples" in stats else stats
    headers = ["split"] + [h for h, _ in COLUMNS] + ["trained %"]
    rows = []
    for name, s in splits.items():
        frac = 100.0 * s["trained_tokens"] / max(1, s["tokens"])
        rows.append([name] + [str(s.get(key, "")) for _, key in COLUMNS] + [f"{frac:.1f}"])
    widths = [max(len(r[i]) for r in [headers] + rows) for i in range(len(headers))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers)] + [line(r) for r in rows])
