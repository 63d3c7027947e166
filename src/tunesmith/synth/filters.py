"""SELF-GUIDE's quality filters (methods.md §10): each a pure function from one text to a Verdict.

    bounds = length_bounds([d.input for d in demos])     # mean ± 2σ of the gold lengths, in characters
    verdicts = [empty(t), length(t, bounds), noise(t, NOISE + markers), duplicate(t, seen)]

A verdict says which filter judged, whether the text passed and why not. Every synthetic record
keeps all its verdicts (provenance); a record is dropped by the first filter it fails, in the order
the pipeline runs them (`first_failure`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

# Template tokens that mark a generation as noise rather than a clean input or output (the paper's
# list: the words of its own meta-prompt, a blank line, a fill-in blank). Matched case-insensitively.
NOISE = ("input", "output", "\n\n", "__")


@dataclass(frozen=True)
class Verdict:
    filter: str
    passed: bool
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def empty(text: str) -> Verdict:
    """Fails a text that is empty or only whitespace."""
    return Verdict("empty", bool(text.strip()), "" if text.strip() else "empty text")


def length_bounds(gold: Sequence[str], sigmas: float = 2.0) -> tuple[float, float]:
    """(low, high) = mean ∓ `sigmas` standard deviations of the gold texts' lengths in characters
    (population σ, as the reference code's numpy std)."""
    if not gold:
        raise ValueError("length bounds need at least one gold text")
    lengths = [len(g.strip()) for g in gold]
    mean = sum(lengths) / len(lengths)
    sd = math.sqrt(sum((n - mean) ** 2 for n in lengths) / len(lengths))
    return mean - sigmas * sd, mean + sigmas * sd


def length(text: str, bounds: tuple[float, float]) -> Verdict:
    """Fails a text whose length (characters, stripped) lies outside `bounds` (inclusive)."""
    n, (low, high) = len(text.strip()), bounds
    ok = low <= n <= high
    return Verdict("length", ok, "" if ok else f"{n} characters, outside [{low:.0f}, {high:.0f}]")


def noise(text: str, tokens: Iterable[str] = NOISE) -> Verdict:
    """Fails a text holding a template token (case-insensitive): the meta-prompt's words or markers."""
    low = text.strip().lower()
    hit = next((t for t in tokens if t and t.lower() in low), None)
    return Verdict("noise", hit is None, "" if hit is None else f"contains template token {hit!r}")


def duplicate(text: str, seen: set[str] | frozenset[str]) -> Verdict:
    """Fails a text equal (after stripping) to one in `seen` (the gold inputs and earlier kept ones)."""
    ok = text.strip() not in seen
    return Verdict("duplicate", ok, "" if ok else "exact duplicate of a gold or earlier input")


def first_failure(verdicts: Sequence[Verdict]) -> str | None:
    """The filter of the first failed verdict, or None when all passed."""
    return next((v.filter for v in verdicts if not v.passed), None)


def check_input(text: str, *, bounds: tuple[float, float] | None, tokens: Iterable[str],
                seen: set[str]) -> list[Verdict]:
    """All input verdicts of one generated input, in order: empty, length (skipped with no bounds),
    noise, duplicate."""
    verdicts = [empty(text)]
    if bounds is not None:
        verdicts.append(length(text, bounds))
    return verdicts + [noise(text, tokens), duplicate(text, seen)]


def check_output(text: str, *, bounds: tuple[float, float] | None, tokens: Iterable[str]) -> list[Verdict]:
    """All output verdicts of one sampled output: empty, length (generation tasks only: pass None
    for classification), noise."""
    verdicts = [empty(text)]
    if bounds is not None:
        verdicts.append(length(text, bounds))
    return verdicts + [noise(text, tokens)]
