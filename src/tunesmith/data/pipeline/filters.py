"""Heuristic quality filters (Gopher's repetition rules as FineWeb and Yi use them, plus length, symbol
share and language id): each is one named step, so the report can say how many records it dropped.

A filter is `fn(text, words) -> bool` (True: drop the record); `words` is `text.split()`, computed once.
The repetition measures count characters of words, so one long repeated phrase weighs more than a
short one; a phrase that occurs once never counts as repeated.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable

import numpy as np

from ..errors import DataError
from .config import FilterConfig

Filter = Callable[[str, list[str]], bool]

_SYMBOL = re.compile(r"[^\w\s]|_")  # neither letter, digit nor space
_DELETE_ASCII_PUNCT = str.maketrans("", "", string.punctuation)  # what _SYMBOL matches in ASCII text
# The word-repetition measures judge texts of at least this many words (Gopher's own shortest document):
# in a short question and answer one phrase said twice ("about the invoice") is normal, not spam.
REPETITION_MIN_WORDS = 50


def symbol_ratio(text: str) -> float:
    """Share of the non-space characters that are symbols (punctuation, brackets, emoji...)."""
    visible = len("".join(text.split()))
    if not visible:
        return 0.0
    if text.isascii():  # the common case: deleting ASCII punctuation counts the same characters, faster
        return (len(text) - len(text.translate(_DELETE_ASCII_PUNCT))) / visible
    return len(_SYMBOL.findall(text)) / visible


def dup_line_ratio(text: str) -> float:
    """Share of the non-empty lines that repeat an earlier line (0 below 3 lines: too few to judge)."""
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    if len(lines) < 3:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)


def top_ngram_ratio(words: list[str], n: int = 2) -> float:
    """Characters covered by the most frequent word n-gram, over all word characters; 0 when no n-gram
    occurs twice or the text is shorter than REPETITION_MIN_WORDS."""
    if len(words) < max(n * 2, REPETITION_MIN_WORDS):
        return 0.0
    grams = list(zip(*(words[i:] for i in range(n))))
    if len(set(grams)) == len(grams):
        return 0.0  # no n-gram repeats: a set is cheaper than counting
    gram, count = Counter(grams).most_common(1)[0]
    if count < 2:
        return 0.0
    return sum(map(len, gram)) * count / sum(map(len, words))


def dup_ngram_ratio(words: list[str], n: int = 5) -> float:
    """Characters of the words inside a word n-gram that already occurred earlier in the text, over all
    word characters (0 for a text shorter than REPETITION_MIN_WORDS)."""
    if len(words) < max(n * 2, REPETITION_MIN_WORDS):
        return 0.0
    grams = list(zip(*(words[i:] for i in range(n))))
    if len(set(grams)) == len(grams):
        return 0.0  # no n-gram repeats (most texts): no need to mark words
    seen: set[tuple[str, ...]] = set()
    dup = bytearray(len(words))
    for i, gram in enumerate(grams):
        if gram in seen:
            dup[i:i + n] = b"\x01" * n
        else:
            seen.add(gram)
    if not any(dup):
        return 0.0
    return sum(len(w) for w, d in zip(words, dup) if d) / sum(map(len, words))


class LanguageFilter:
    """langid's offline model (loaded once per process, on first use): drop a record whose most
    likely language is not one of `languages`, or is one with probability under `min_prob`."""

    _identifier = None

    def __init__(self, languages: list[str], min_prob: float):
        self.languages, self.min_prob = set(languages), min_prob

    @classmethod
    def identifier(cls):
        if cls._identifier is None:
            try:
                from langid.langid import LanguageIdentifier, model
            except ImportError:
                raise DataError("prepare.filters.languages needs the langid package (offline language id): "
                                "pip install 'tunesmith[data]'") from None

            cls._identifier = LanguageIdentifier.from_modelstring(model, norm_probs=True)
        return cls._identifier

    def language(self, text: str) -> tuple[str, float]:
        """(ISO code, probability) of the text's first 2000 characters (enough to tell, and bounded).

        langid's own `classify`, scored over the features the text has: its `np.dot` of a uint32 count
        vector with the (7480, 97) float32 model matrix falls off BLAS onto a float64 copy of the whole
        matrix, ~50x slower than the same sum over the few hundred non-zero features (the same numbers:
        test_data_pipeline checks it against `classify`)."""
        ident = self.identifier()
        counts = ident.instance2fv(text[:2000])
        present = np.flatnonzero(counts)
        scores = counts[present].astype(np.float64) @ ident.nb_ptc[present].astype(np.float64) + ident.nb_pc
        probs = ident.norm_probs(scores)
        best = int(np.argmax(probs))
        return str(ident.nb_classes[best]), float(probs[best])

    def __call__(self, text: str, words: list[str]) -> bool:
        lang, prob = self.language(text)
        return lang not in self.languages or prob < self.min_prob


def build_filters(cfg: FilterConfig) -> list[tuple[str, Filter]]:
    """The enabled filters as (name, fn), in the order they run (cheapest first, language id last)."""
    steps: list[tuple[str, Filter]] = []
    if cfg.min_words is not None:
        steps.append(("min_words", lambda t, w, k=cfg.min_words: len(w) < k))
    if cfg.max_words is not None:
        steps.append(("max_words", lambda t, w, k=cfg.max_words: len(w) > k))
    if cfg.max_symbol_ratio is not None:
        steps.append(("symbol_ratio", lambda t, w, r=cfg.max_symbol_ratio: symbol_ratio(t) > r))
    if cfg.max_dup_line_ratio is not None:
        steps.append(("dup_line_ratio", lambda t, w, r=cfg.max_dup_line_ratio: dup_line_ratio(t) > r))
    if cfg.max_top_ngram_ratio is not None:
        steps.append(("top_ngram_ratio", lambda t, w, r=cfg.max_top_ngram_ratio: top_ngram_ratio(w) > r))
    if cfg.max_dup_ngram_ratio is not None:
        steps.append(("dup_ngram_ratio", lambda t, w, r=cfg.max_dup_ngram_ratio: dup_ngram_ratio(w) > r))
    if cfg.languages:
        steps.append(("language", LanguageFilter(cfg.languages, cfg.min_language_prob)))
    return steps
