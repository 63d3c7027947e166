"""Human-readable view of rendered data, for `tunesmith data inspect`: chat/text samples or
preference pairs with their trained tokens marked, a statistics table, and what was skipped."""
from __future__ import annotations

import sys

from .render import Sample
from .skipped import split_skip_lines

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
PAIR_COLUMNS = [  # lengths are per side, in tokens; "trained" counts each side's answer tokens
    ("records", "records"),
    ("pairs", "pairs"),
    ("truncated", "truncated"),
    ("too long", "dropped_too_long"),
    ("no trained", "no_trained_token"),
    ("chosen p50", "chosen_p50"),
    ("max", "chosen_max"),
    ("rejected p50", "rejected_p50"),
    ("max", "rejected_max"),
    ("chosen trained", "chosen_trained"),
    ("rejected trained", "rejected_trained"),
]


def format_inspection(samples: list[Sample], tokenizer, stats: dict, n: int = 3, color: bool | None = None,
                      max_length: int | None = None) -> str:
    """The first `n` samples decoded with trained tokens marked, the statistics table, and a line per
    reason records were skipped (with the first such record; `max_length` fills in its limit).

    Trained spans are green when `color` (default: stdout is a terminal), else wrapped in ⟦ ⟧.
    `stats` is `DataSplits.stats` ({split: counts}) or the counts of a single split.
    """
    if color is None:
        color = sys.stdout.isatty()
    parts = []
    for k, sample in enumerate(samples[:n]):
        parts.append(f"── sample {k + 1} of {len(samples)}: {_size(sample)} ──")
        parts.append(mark_trained(sample, tokenizer, color))
        parts.append("")
    return "\n".join(parts + _footer(stats, COLUMNS, color, max_length))


def format_pair_inspection(pairs: list[dict], tokenizer, stats: dict, n: int = 3, color: bool | None = None,
                           max_length: int | None = None) -> str:
    """Like `format_inspection` for preference pairs: each pair's chosen side in full, its rejected side
    from its answer on (the prompt is the same), then the pair statistics table and what was skipped."""
    if color is None:
        color = sys.stdout.isatty()
    parts = []
    for k, pair in enumerate(pairs[:n]):
        chosen, rejected = pair["chosen"], pair["rejected"]
        answer = next((t for t, w in enumerate(rejected["weights"]) if w), 0)
        rest = {key: rejected[key][answer:] for key in ("input_ids", "weights")}
        parts.append(f"── pair {k + 1} of {len(pairs)}: chosen {_size(chosen)} · rejected {_size(rejected)} ──")
        parts.append("chosen:   " + mark_trained(chosen, tokenizer, color))
        parts.append("rejected: …" + mark_trained(rest, tokenizer, color))
        parts.append("")
    return "\n".join(parts + _footer(stats, PAIR_COLUMNS, color, max_length))


def _size(sample: Sample) -> str:
    trained = sum(1 for w in sample["weights"] if w)
    return f"{len(sample['input_ids'])} tokens, {trained} trained"


def _footer(stats: dict, columns: list, color: bool, max_length: int | None) -> list[str]:
    legend = "green" if color else f"{OPEN} {CLOSE}"
    lines = [f"(trained tokens are shown {legend})", "", stats_table(stats, columns)]
    mixed = (stats.get("train") or {}).get("mix") if "samples" not in stats else stats.get("mix")
    if mixed:  # data.mix: what each source gave the epoch (see data/mix.py)
        from .mix import mix_table

        lines += [""] + mix_table(mixed)
    skipped = split_skip_lines(stats, max_length if max_length is not None else "max_length")
    return lines + ([""] + skipped if skipped else [])


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


def stats_table(stats: dict, columns: list | None = None) -> str:
    """A fixed-width table, one row per split, plus the fraction of tokens that train."""
    columns = COLUMNS if columns is None else columns
    splits = {"data": stats} if "samples" in stats else stats
    headers = ["split"] + [h for h, _ in columns] + ["trained %"]
    rows = []
    for name, s in splits.items():
        frac = 100.0 * s["trained_tokens"] / max(1, s["tokens"])
        rows.append([name] + [str(s.get(key, "")) for _, key in columns] + [f"{frac:.1f}"])
    widths = [max(len(r[i]) for r in [headers] + rows) for i in range(len(headers))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers)] + [line(r) for r in rows])
