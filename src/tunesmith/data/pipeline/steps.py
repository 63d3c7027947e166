"""One record through the stateless steps: read into an Example, normalise, key, filter, scrub, sign.

`Cleaner` runs in the main process or in worker processes (`prepare.workers`); either way it returns
the same `Cleaned` for the same record, so the output does not depend on the number of workers. Step
times are summed per step name in `Cleaner.seconds` (CPU time of whichever process ran the step).
"""
from __future__ import annotations

import time
from typing import Callable, NamedTuple

import numpy as np

from ...config import DataConfig
from ..formats import Example, to_example
from ..sources import Record
from .clean import content_text, exact_key, map_example, normalise_text, scrub_pii
from .config import PrepareConfig
from .dedup import Signer
from .filters import build_filters


class Cleaned(NamedTuple):
    where: str
    source: str  # the input it came from (a file, a task split)
    example: Example | None  # cleaned; None once a step dropped it
    domain: str | None
    key: int  # exact-dedup key (0 with exact dedup off)
    dropped_by: str | None  # the filter that dropped it, else None
    pii: dict[str, int]  # replacements made
    signature: np.ndarray | None  # MinHash, when near-dedup will look at it


class Cleaner:
    """The stateless steps of `prepare`, in order, for one record format."""

    def __init__(self, cfg: PrepareConfig, data: DataConfig, fmt: str):
        self.cfg, self.data, self.fmt = cfg, data, fmt
        self.filters = build_filters(cfg.filters)
        self.signer = Signer(cfg.near_dedup) if cfg.near_dedup.enabled else None
        self.seconds: dict[str, float] = {}

    def _timed(self, step: str, start: float) -> float:
        now = time.perf_counter()
        self.seconds[step] = self.seconds.get(step, 0.0) + now - start
        return now

    def __call__(self, record: Record, source: str, is_new: Callable[[int], bool] | None = None) -> Cleaned:
        """The record cleaned and judged. With `is_new` (the exact-dedup set's `add`, in the main process)
        a duplicate stops before the filters, as the steps' order says; without it (in a worker) every
        step runs and the main process checks the key."""
        t = time.perf_counter()
        example = to_example(record, self.fmt, self.data)
        domain = record.fields.get("domain")
        example = map_example(example, lambda s: normalise_text(s, self.cfg.normalise))
        text = content_text(example)
        t = self._timed("normalise", t)
        key = 0
        if self.cfg.exact_dedup:
            key = exact_key(text)
            if is_new is not None and not is_new(key):
                self._timed("exact_dedup", t)
                return Cleaned(record.where, source, None, domain, key, "exact_dedup", {}, None)
            t = self._timed("exact_dedup", t)
        words = text.split()
        for name, rule in self.filters:
            drop = rule(text, words)
            t = self._timed(name, t)
            if drop:
                return Cleaned(record.where, source, None, domain, key, name, {}, None)
        pii: dict[str, int] = {}
        if self.cfg.pii.enabled:
            p = self.cfg.pii
            example = map_example(example, lambda s: scrub_pii(s, p.emails, p.phones, p.keys, pii))
            text = content_text(example)
            t = self._timed("pii", t)
        signature = None
        if self.signer is not None:
            signature = self.signer(text)
            self._timed("near_dedup", t)
        return Cleaned(record.where, source, example, domain, key, None, pii, signature)


# --------------------------------------------------------------------------------------------------
# worker processes: each builds its own Cleaner once and cleans chunks of records in order

_worker: Cleaner | None = None


def init_worker(cfg: dict, data: dict, fmt: str) -> None:
    global _worker
    _worker = Cleaner(PrepareConfig(**cfg), DataConfig(**data), fmt)


def clean_chunk(chunk: list[tuple[Record, str]]) -> tuple[list[Cleaned], dict[str, float]]:
    """A chunk's records cleaned, with the step seconds this chunk took (summed by the parent)."""
    _worker.seconds = {}
    return [_worker(record, source) for record, source in chunk], _worker.seconds
