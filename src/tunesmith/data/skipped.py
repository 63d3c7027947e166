"""Records left out of a split: every reason counted, with the first record it hit, and reported.

Nothing is dropped silently: `load_data`/`load_pairs` print one line per reason when training, and
`tunesmith data inspect` shows the same lines under its table, e.g.

    skipped in train: 3 records have no assistant turn (nothing to train), first at data.jsonl:7

Records cut to `data.max_length` (kept, but losing their end) get a line of their own too.
"""
from __future__ import annotations

import os
import sys

# reason: (what one record does, what several do); {max_length} is filled in from the recipe
REASONS = {
    "too_long": ("is longer than data.max_length={max_length} tokens (data.overflow=drop)",
                 "are longer than data.max_length={max_length} tokens (data.overflow=drop)"),
    "no_assistant": ("has no assistant turn (nothing to train)", "have no assistant turn (nothing to train)"),
    "empty": ("is empty (no text to train)", "are empty (no text to train)"),
    "empty_answer": ("has only empty assistant answers (nothing to train)",
                     "have only empty assistant answers (nothing to train)"),
    "cut_off": ("loses every trained token when truncated to data.max_length={max_length}",
                "lose every trained token when truncated to data.max_length={max_length}"),
    "no_trained": ("has no trained token", "have no trained token"),
}
NOTHING_TO_TRAIN = ("no_assistant", "empty", "empty_answer", "cut_off", "no_trained")


class Skipped:
    """Counts of skipped records per reason, and where the first one of each is."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}
        self.truncated, self.first_truncated = 0, None

    def add_truncated(self, where: str) -> None:
        """A record kept, but cut to max_length."""
        self.truncated += 1
        self.first_truncated = self.first_truncated or where

    def add(self, reason: str, where: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.first.setdefault(reason, where)

    def count(self, *reasons: str) -> int:
        return sum(self.counts.get(r, 0) for r in reasons)

    def as_stats(self) -> dict:
        """{reason: {"count": n, "first": where}}, in the order of REASONS."""
        return {r: {"count": self.counts[r], "first": self.first[r]} for r in REASONS if r in self.counts}


def skip_lines(skipped: dict, max_length: int) -> list[str]:
    """One sentence per reason from `Skipped.as_stats()`."""
    lines = []
    for reason, s in skipped.items():
        one, many = REASONS[reason]
        what = (one if s["count"] == 1 else many).format(max_length=max_length)
        noun = "record" if s["count"] == 1 else "records"
        lines.append(f"{s['count']} {noun} {what}, first at {s['first']}")
    return lines


def split_skip_lines(stats: dict, max_length: int) -> list[str]:
    """`skipped in SPLIT: ...` lines (and `truncated in SPLIT: ...`) for every split of
    `DataSplits.stats`, or `skipped: ...` for one split's stats."""
    splits = {"": stats} if "samples" in stats else stats
    out = []
    for name, s in splits.items():
        where = f" in {name}" if name else ""
        out += [f"skipped{where}: {line}" for line in skip_lines(s.get("skipped", {}), max_length)]
        n = s.get("truncated", 0)
        if n and s.get("truncated_first"):
            noun = "record was" if n == 1 else "records were"
            out.append(f"truncated{where}: {n} {noun} cut to data.max_length={max_length} tokens "
                       f"(data.overflow=truncate), first at {s['truncated_first']}")
    return out


def announce(stats: dict, max_length: int) -> None:
    """Print what was skipped (once, on the main process of a distributed run) to stderr."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    for line in split_skip_lines(stats, max_length):
        print(f"[tunesmith] {line}", file=sys.stderr, flush=True)
