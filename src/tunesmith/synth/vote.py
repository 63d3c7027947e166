"""Self-consistency for SELF-GUIDE's outputs (methods.md §10) and label balancing.

    key = map_label(text, labels)          # classification: the label an output names (or None)
    key = normalise(text)                  # generation: whitespace-normalised text
    v = vote([(key, text), ...], threshold=0.2)
    v.passed, v.answer, v.share

The answer most samples agree on is kept if its share of the counted samples is at least the
threshold; answers tied for the most votes go to the shortest. As in the reference code, the share
is over the samples that survived the output filters (an unmapped classification output counts as
filtered), so the caller decides which samples count.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


def normalise(text: str) -> str:
    """Whitespace-normalised text: stripped, every run of whitespace one space."""
    return " ".join(text.split())


def map_label(text: str, labels: Sequence[str]) -> str | None:
    """The label an output names, or None.

    An output equal to a label (ignoring case, surrounding whitespace, quotes and final punctuation)
    is that label; otherwise the label found earliest in the text as a whole word or phrase
    (case-insensitive; at the same position the longer label wins, so `not spam` beats `spam`).
    """
    bare = text.strip().strip("\"'`*.!:;,").strip().lower()
    for label in labels:
        if bare == label.lower():
            return label
    low = text.lower()
    best: tuple[int, int, str] | None = None
    for label in labels:
        m = re.search(r"(?<!\w)" + re.escape(label.lower()) + r"(?!\w)", low)
        if m and (best is None or (m.start(), -len(label)) < best[:2]):
            best = (m.start(), -len(label), label)
    return best[2] if best else None


@dataclass(frozen=True)
class Vote:
    passed: bool
    answer: str | None
    "The kept answer: the shortest text of the winning group (for classification, the label)."
    key: str | None
    "What was counted for the winner (the label or the normalised text)."
    count: int
    "Samples that gave the winning key."
    counted: int
    "Samples that took part in the vote."
    share: float
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def vote(candidates: Sequence[tuple[str, str]], threshold: float = 0.2) -> Vote:
    """Majority vote over (key, text) pairs: the most frequent key wins if its share ≥ threshold;
    keys tied for the most votes go to the shortest key (then the first seen)."""
    if not candidates:
        return Vote(False, None, None, 0, 0, 0.0, "no sample survived the output filters")
    counts = Counter(k for k, _ in candidates)
    top = max(counts.values())
    order = {k: i for i, (k, _) in reversed(list(enumerate(candidates)))}  # first position of each key
    key = min((k for k, c in counts.items() if c == top), key=lambda k: (len(k), order[k]))
    share = top / len(candidates)
    answer = min((t.strip() for k, t in candidates if k == key), key=len)
    if share < threshold:
        return Vote(False, None, key, top, len(candidates), share,
                    f"most frequent answer has {share:.0%} of {len(candidates)} samples, below {threshold:.0%}")
    return Vote(True, answer, key, top, len(candidates), share)


def balance(items: Sequence[T], label_of: Callable[[T], str], seed: int = 0) -> tuple[list[T], list[T]]:
    """Down-sample every class to the size of the smallest class present; return (kept, dropped),
    both in the input order. A label with no item at all does not empty the others (as in the
    reference code)."""
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(label_of(item), []).append(i)
    if not groups:
        return [], []
    smallest = min(len(g) for g in groups.values())
    rng = random.Random(seed)
    keep = {i for label in sorted(groups) for i in rng.sample(groups[label], smallest)}
    return ([x for i, x in enumerate(items) if i in keep], [x for i, x in enumerate(items) if i not in keep])
