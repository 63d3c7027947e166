"""The `translate-*` tasks: translate sentences between English and constructed languages, scored with
chrF++ (and corpus BLEU/chrF/chrF++ through sacrebleu in `tunesmith eval`).

    task = get_task("translate-va")          # English -> Valian; also translate-va-en, translate-va-vo
    ex = task.examples("test")[0]
    ex.prompt      # 'Translate from English to Valian.\\nEnglish: The old farmer saw a cat.\\nValian:'
    ex.reference   # the Valian sentence
    task.score(model_text, ex)               # Verdict: exact match, score = sentence chrF++ / 100

Names: `translate-XX` is English -> XX, `translate-XX-YY` is XX -> YY (either may be `en`); the
languages and how they are built are in `translation_data`. `translate-all` mixes every direction
between English and each language (a multilingual first stage).

Splits hold apart by meaning, across every direction at once: a sentence's split is decided by a
hash of its English text, so no test sentence of any pair is a training sentence of any other pair
(two-stage training on a related pair cannot leak the target pair's test set). The sentences of a
split come in the same order for every pair (a multi-way parallel set, like FLORES): the first 50
test sentences of en->va and en->vo mean the same. A task's training size defaults to its target
language's resource level (Valian 2000 pairs, Volian 200), so the low-resource pair is low-resource
out of the box.
"""
from __future__ import annotations

import hashlib
import re

from .base import SPLITS, Example, Verdict
from ._common import first_line_end, rng_for
from .translation_data import LANGUAGES, Clause, draw_clause, language_name, realize, realize_english

SHARES = {"test": 0.1, "validation": 0.1}  # of all meanings; the rest are training meanings
PROMPT = "Translate from {src} to {tgt}.\n{src}: {text}\n{tgt}:"
SYSTEM = "Answer with the translation only."


class TranslationError(ValueError):
    """A translation task name or option that cannot be used; the message says which."""


def split_of(english: str) -> str:
    """The split a meaning belongs to, from its English sentence alone (same in every direction)."""
    h = int.from_bytes(hashlib.sha256(english.encode()).digest()[:8], "big") / 2 ** 64
    if h < SHARES["test"]:
        return "test"
    return "validation" if h < SHARES["test"] + SHARES["validation"] else "train"


def clauses(split: str, n: int, seed: int = 0) -> list[Clause]:
    """The first `n` distinct meanings of `split` for task seed `seed`; a prefix of a longer list, so
    a smaller task is a subset of a bigger one."""
    rng = rng_for("translate", seed, "clauses", split)
    out, seen = [], set()
    for _ in range(200 * n + 1000):
        if len(out) == n:
            break
        c = draw_clause(rng)
        english = realize_english(c)
        if english not in seen and split_of(english) == split:
            seen.add(english)
            out.append(c)
    if len(out) < n:
        raise TranslationError(f"only {len(out)} distinct {split} sentences could be drawn (asked for {n})")
    return out


def parse_direction(name: str) -> list[tuple[str, str]]:
    """[(source, target)] of a task name: translate-va, translate-va-en, translate-all."""
    known = ["en", *LANGUAGES]
    if name == "translate-all":
        return [p for code in LANGUAGES if LANGUAGES[code].mixed for p in (("en", code), (code, "en"))]
    codes = name.removeprefix("translate-").split("-")
    if not name.startswith("translate-") or len(codes) not in (1, 2) or any(c not in known for c in codes):
        raise TranslationError(f"unknown translation task `{name}`; use translate-XX (English -> XX), "
                               f"translate-XX-YY or translate-all, with XX, YY in {', '.join(known)}")
    pair = ("en", codes[0]) if len(codes) == 1 else tuple(codes)
    if pair[0] == pair[1]:
        raise TranslationError(f"`{name}` translates {pair[0]} into itself; choose two different languages")
    return [pair]


def extract_translation(text: str, target: str) -> str:
    """The translation in a model's answer: its first non-empty line, without a leading
    `Valian:`-style label or wrapping quotes."""
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(rf"^(?:{re.escape(language_name(target))}|translation)\s*:\s*", "", line, flags=re.I)
    return line.strip().strip("\"'`").strip()


def chrf_pp(prediction: str, reference: str) -> float:
    """Sentence chrF++ (sacrebleu: character 6-grams + word bigrams, beta 2), 0..100."""
    from sacrebleu.metrics import CHRF

    return CHRF(word_order=2).sentence_score(prediction, [reference]).score


class TranslationTask:
    """Translation in one or more directions between English and the constructed languages."""
    metric = "chrf++"
    system_prompt = SYSTEM
    answer_end = staticmethod(first_line_end)  # the scorer reads the first non-blank line only

    def __init__(self, name: str = "translate-va", seed: int = 0, n_train: int | None = None,
                 n_validation: int = 100, n_test: int = 200):
        self.name, self.seed = name, seed
        self.pairs = parse_direction(name)
        default_train = max(LANGUAGES[c].n_train for p in self.pairs for c in p if c != "en")
        self.sizes = {"train": default_train if n_train is None else n_train, "validation": n_validation,
                      "test": n_test}
        for split, n in self.sizes.items():
            if not isinstance(n, int) or n < 0:
                raise TranslationError(f"{name}: n_{split} must be a whole number >= 0, got {n!r}")
        self._splits: dict[str, list[Example]] = {}

    def examples(self, split: str) -> list[Example]:
        if split not in SPLITS:
            raise TranslationError(f"unknown split `{split}`; choose one of {', '.join(SPLITS)}")
        if split not in self._splits:
            self._splits[split] = self._build(split)
        return list(self._splits[split])

    def _build(self, split: str) -> list[Example]:
        # Several directions (translate-all) take turns over one list of meanings, so each direction
        # gets different sentences and the mix stays balanced at any prefix.
        out = []
        for k, c in enumerate(clauses(split, self.sizes[split], self.seed)):
            src, tgt = self.pairs[k % len(self.pairs)]
            text, reference = realize(c, src), realize(c, tgt)
            prompt = PROMPT.format(src=language_name(src), tgt=language_name(tgt), text=text)
            meta = {"source": src, "target": tgt, "english": realize_english(c), "source_text": text}
            out.append(Example(f"{self.name}-{split}-{k:04d}", prompt, reference, meta))
        return out

    def score(self, prediction: str, example: Example) -> Verdict:
        """Correct iff the extracted translation equals the reference (spaces collapsed); the
        partial score is sentence chrF++ / 100, the corpus figures come from the eval runner."""
        got = extract_translation(prediction, example.meta["target"])
        ok = " ".join(got.split()) == " ".join(example.reference.split())
        return Verdict(ok, chrf_pp(got, example.reference) / 100, None if ok else "differs from the reference", got)


def task_names() -> list[str]:
    """Every translation task name `get_task` knows (the pairs with English, both ways, and all)."""
    return ["translate-all"] + [n for code in LANGUAGES for n in (f"translate-{code}", f"translate-{code}-en")]
