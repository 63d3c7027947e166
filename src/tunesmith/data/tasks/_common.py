"""What the generated tasks share: seeded randomness, value lists, and the splitting rules.

A test question must measure generalisation, not recall, so splits are disjoint twice over:
- in phrasings: each template belongs to one split (one per family to validation, one to test,
  the rest to train), so every family is trained but tested only with unseen wording;
- in values: each slot value (a city, a first name, a threshold, ...) belongs to one split, so no
  value of a test question appears in any training question.
"""
from __future__ import annotations

import random
from typing import Callable, Hashable, Iterable, Sequence, TypeVar

from .base import SPLITS, Example

HELD_OUT = 0.15  # share of every value list kept for validation, and again for test (at least one each)

T = TypeVar("T")

FIRST_NAMES = [
    "Anna", "Ben", "Clara", "David", "Elena", "Felix", "Grace", "Hugo", "Iris", "Jonas", "Karin", "Leo",
    "Maya", "Nils", "Olga", "Paul", "Rosa", "Sam", "Tara", "Victor", "Wendy", "Yusuf", "Zoe", "Adam",
    "Beatrice", "Carlos", "Dora", "Emil", "Fatima", "George", "Hannah", "Ivan", "Julia", "Kofi", "Lena",
    "Marco", "Nora", "Omar", "Petra", "Rami", "Sofia", "Tomas", "Ursula", "Vera", "Walter", "Xavier",
    "Yara", "Aisha", "Bruno", "Chloe", "Diego", "Erik", "Freya", "Gustav", "Helga", "Ingrid", "Jamal",
    "Kira", "Lucas", "Mila",
]
LAST_NAMES = [
    "Novak", "Silva", "Moreau", "Fischer", "Rossi", "Jansen", "Kowalski", "Lindqvist", "Okafor", "Haddad",
    "Tanaka", "Meyer", "Costa", "Dubois", "Horvat", "Keller", "Larsen", "Mendes", "Nielsen", "Park",
    "Quinn", "Reyes", "Schmidt", "Torres", "Varga", "Weber", "Young", "Adler", "Brandt", "Castillo",
    "Dalton", "Eriksen", "Ferreira", "Garcia", "Hansen", "Ibrahim", "Jovanovic", "Kuznetsov", "Lopez",
    "Marino", "Nakamura", "Olsen", "Petrov", "Ramos", "Sato", "Thomsen", "Ullman", "Vidal", "Wagner",
    "Zielinski",
]
CITIES = [
    "Oslo", "Lisbon", "Madrid", "Vienna", "Prague", "Dublin", "Berlin", "Paris", "Rome", "Warsaw", "Athens",
    "Zurich", "Munich", "Milan", "Porto", "Lyon", "Hamburg", "Krakow", "Seville", "Geneva", "Bergen", "Turin",
    "Ghent", "Bruges", "Valencia", "Antwerp", "Gothenburg", "Tallinn", "Riga", "Ljubljana", "Bratislava",
    "Salzburg",
]


def rng_for(*parts) -> random.Random:
    # A str seed is hashed with SHA-512, so this is stable across runs (unlike hash()).
    return random.Random("/".join(map(str, parts)))


class ValueSplit:
    """Puts every slot value in exactly one split. Lists are added in order; a value already placed
    by an earlier list (e.g. 7 as a LIMIT and as a count) keeps its split, so splits stay disjoint."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.split_of: dict[Hashable, str] = {}
        self.pools: dict[str, dict[str, list]] = {}

    def add(self, kind: str, values: Iterable[Hashable]) -> dict[str, list]:
        values = list(dict.fromkeys(values))
        n_held = max(1, round(HELD_OUT * len(values)))
        free = [v for v in values if v not in self.split_of]
        self.rng.shuffle(free)
        for split in ("validation", "test"):
            need = n_held - sum(self.split_of.get(v) == split for v in values)
            for v in free[:max(0, need)]:
                self.split_of[v] = split
            free = free[max(0, need):]
        for v in free:
            self.split_of[v] = "train"
        self.pools[kind] = {s: [v for v in values if self.split_of[v] == s] for s in SPLITS}
        return self.pools[kind]


def split_templates(families: Sequence, rng: random.Random) -> dict[str, list[tuple[str, object, int]]]:
    """(template id, family, phrasing index) per split: per family one phrasing for validation, one
    for test, the rest (at least one) for train. Families need `.name` and `.phrasings`."""
    out: dict[str, list] = {s: [] for s in SPLITS}
    for family in families:
        assert len(family.phrasings) >= 3, family.name
        order = list(range(len(family.phrasings)))
        rng.shuffle(order)
        for rank, i in enumerate(order):
            split = "validation" if rank == 0 else "test" if rank == 1 else "train"
            out[split].append((f"{family.name}.{i}", family, i))
    return out


def fill(templates: list[T], n: int, draw: Callable[[T], tuple[str, object] | None], rng: random.Random,
         tries: int = 40) -> list:
    """Up to `n` items, taking templates in turn (so any prefix of the list is balanced across
    templates). `draw(t)` returns (dedup key, item) or None for a rejected draw; a template that
    yields nothing new in `tries` draws has run out of values and leaves the rotation."""
    live = list(templates)
    rng.shuffle(live)
    out, seen = [], set()
    while len(out) < n and live:
        for t in list(live):
            if len(out) == n:
                break
            for _ in range(tries):
                got = draw(t)
                if got is not None and got[0] not in seen:
                    seen.add(got[0])
                    out.append(got[1])
                    break
            else:
                live.remove(t)
    return out


class GeneratedTask:
    """A task whose examples are generated from a seed, once, on first use."""

    def __init__(self, seed: int = 0, n_train: int = 800, n_validation: int = 100, n_test: int = 200):
        self.seed = seed
        self.sizes = {"train": n_train, "validation": n_validation, "test": n_test}
        self._splits: dict[str, list[Example]] | None = None

    def examples(self, split: str) -> list[Example]:
        if split not in SPLITS:
            raise ValueError(f"unknown split `{split}`; choose one of {', '.join(SPLITS)}")
        if self._splits is None:
            self._splits = self._generate()
        return list(self._splits[split])

    def _generate(self) -> dict[str, list[Example]]:
        raise NotImplementedError


def generate_splits(task: str, seed: int, families: Sequence, sizes: dict[str, int],
                    draw_for: Callable[[str, random.Random], Callable]) -> dict[str, list[Example]]:
    """Every split's examples: the templates divided between the splits, then for each split its
    own seeded rng and `draw_for(split, rng)`, which draws one example (or None) from a template pick."""
    templates = split_templates(families, rng_for(task, seed, "templates"))
    splits = {}
    for split in SPLITS:
        rng = rng_for(task, seed, "examples", split)
        items = fill(templates[split], sizes[split], draw_for(split, rng), rng)
        splits[split] = [Example(f"{task}-{split}-{k:04d}", p, r, m) for k, (p, r, m) in enumerate(items)]
    return splits


def first_line_end(text: str) -> int | None:
    """A stop rule (`answer_end`) for tasks scored on the first non-blank line of the answer: where
    that line ends, once a line break follows it (None before). Lines are split as str.splitlines
    splits them, exactly as those scorers read them, so the cut text scores like any longer one."""
    pos = 0
    for line in text.splitlines(keepends=True):
        content = line.splitlines()[0] if line.strip() else ""
        if content.strip() and len(content) < len(line):  # a non-blank line with its line break
            return pos + len(content)
        pos += len(line)
    return None
