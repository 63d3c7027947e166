"""`prepare`: stream records through the steps and write what survives.

    read -> normalise -> exact dedup -> quality filters -> PII scrub -> near-dedup -> render+tokenize -> shards

Nothing holds the records: each is read, judged and written (or dropped) before the next, so memory
is the dedup state (see dedup.py) plus one shard's buffer. Every step counts what it dropped and the
first record it dropped; near-duplicates are written to `near_duplicates.jsonl` as (removed, kept)
pairs with their estimated similarity. With `prepare.workers` > 1 the stateless steps run in worker
processes on ordered chunks, so the result is the same as with one.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterator

from ...config import DataConfig
from ..errors import DataError
from ..formats import detect_format
from ..load import untrainable
from ..render import Renderer, fit_length
from ..sources import Record
from ..tools import as_record
from .config import PrepareConfig
from .dedup import ExactDedup, NearDedup
from .inputs import expand, stream
from .report import drop_summary, build_report, format_report
from .steps import Cleaned, Cleaner, clean_chunk, init_worker

CHUNK = 256  # records per task sent to a worker


@dataclass
class Tally:
    """What happened to the records: per step, how many it dropped and the first one."""

    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    first: dict[str, str] = field(default_factory=dict)
    pii: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def drop(self, step: str, where: str) -> None:
        self.dropped[step] = self.dropped.get(step, 0) + 1
        self.first.setdefault(step, where)

    def time(self, seconds: dict[str, float]) -> None:
        for step, s in seconds.items():
            self.seconds[step] = self.seconds.get(step, 0.0) + s


def _format(first: Record, data: DataConfig) -> str:
    chosen, rejected = (data.columns.get(k, k) for k in ("chosen", "rejected"))
    if data.format == "preference" or (data.format == "auto" and chosen in first.fields and rejected in first.fields):
        raise DataError(f"{first.where}: preference records (chosen/rejected) are not prepared into shards; "
                        "prepare takes text, instruction and chat records")
    return detect_format(first, data)


def _cleaned(records: Iterator[tuple[Record, str]], cleaner: Cleaner, exact: ExactDedup | None, workers: int,
             tally: Tally) -> Iterator[Cleaned]:
    """The records through the stateless steps and exact dedup: in this process, or in `workers`
    processes (ordered chunks; the exact-dedup check then happens here, in record order)."""
    records = _timed_reads(records, tally)
    if workers <= 1:
        for record, source in records:
            tally.read += 1
            yield cleaner(record, source, exact.add if exact is not None else None)
        tally.time(cleaner.seconds)
        return
    import multiprocessing as mp

    # fork: the workers start with the modules this process has imported (spawn re-imports torch in each)
    chunks = iter(lambda: list(islice(records, CHUNK)), [])
    args = (cleaner.cfg.model_dump(), cleaner.data.model_dump(), cleaner.fmt)
    with mp.get_context("fork").Pool(workers, initializer=init_worker, initargs=args) as pool:
        for batch, seconds in pool.imap(clean_chunk, chunks, chunksize=1):
            tally.time(seconds)
            for item in batch:
                tally.read += 1
                if exact is not None:  # every record's key, filtered or not: dedup comes before the filters
                    t = time.perf_counter()
                    new = exact.add(item.key)
                    tally.time({"exact_dedup": time.perf_counter() - t})
                    if not new:
                        item = item._replace(example=None, dropped_by="exact_dedup")
                yield item


def _timed_reads(records: Iterator, tally: Tally) -> Iterator:
    """The records, with the time spent reading (and parsing) them counted as the step `read`."""
    while True:
        t = time.perf_counter()
        item = next(records, None)
        tally.time({"read": time.perf_counter() - t})
        if item is None:
            return
        yield item


def _domain_number(domains: list[str], name: str | None, where: str) -> int | None:
    """The domain's number in first-seen order (the manifest's `domains` lists the names)."""
    if name is None:
        if domains:
            raise DataError(f"{where}: field 'domain' is missing, but earlier records have one; give every record "
                            "a domain or none")
        return None
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: field 'domain' must be a non-empty string, got {name!r}")
    if name not in domains:
        domains.append(name)
    return domains.index(name)


@dataclass
class Outputs:
    """Where kept records go: shards (tokenized), cleaned.jsonl, and the near-duplicate pairs."""

    shards: object | None  # a ShardWriter
    renderer: Renderer | None
    jsonl: object | None
    pairs: object
    domains: list[str] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0


def _write(item: Cleaned, out: Outputs, data: DataConfig, tally: Tally) -> None:
    """Write a kept record: cleaned.jsonl as is; the shards rendered, fitted to max_length, unless it has
    nothing to train (counted as a step of its own, `render`)."""
    t = time.perf_counter()
    if out.jsonl is not None:
        row = as_record(item.example)  # {"text"} or {"messages"[, "tools"]}
        if item.domain is not None:
            row["domain"] = item.domain
        out.jsonl.write(json.dumps(row, ensure_ascii=False) + "\n")
    if out.shards is None:
        tally.kept += 1
        tally.time({"write": time.perf_counter() - t})
        return
    domain = _domain_number(out.domains, item.domain, item.where)
    reason = untrainable(item.example, data)
    sample = None
    if reason is None:
        try:
            sample, _ = fit_length(out.renderer(item.example), data.max_length, data.overflow)
        except DataError as e:
            raise DataError(f"{item.where}: {e}") from None
        if sample is None:
            reason = "too_long"
        elif not any(sample["weights"]):
            reason, sample = "no_trained", None
    t = _tick(tally, "tokenize", t)
    if sample is None:
        tally.drop(f"render:{reason}", item.where)
        return
    if domain is not None:
        sample["domain"] = domain
    out.shards.add(sample, item.source)
    tally.kept += 1
    out.samples += 1
    out.tokens += len(sample["input_ids"])
    out.trained_tokens += int(sum(1 for w in sample["weights"] if w))
    _tick(tally, "write", t)


def _tick(tally: Tally, step: str, start: float) -> float:
    now = time.perf_counter()
    tally.time({step: now - start})
    return now


@dataclass
class PrepareResult:
    folder: Path
    report: dict  # also in report.json (and the shards' manifest)


def prepare(cfg: PrepareConfig, data: DataConfig, tokenizer=None, progress: bool = False) -> PrepareResult:
    """Clean the inputs and write shards (with `tokenizer`; `cfg.tokenize` needs one) and the reports.

    Raises:
        DataError: no inputs, an unreadable or bad record (the message names it), an output folder that
        already holds shards, or no record left after the steps (the counts say which step took them).
    """
    sources = expand(cfg.inputs or ([data.train] if data.train else []))
    if not sources:
        raise DataError("prepare.inputs is empty and data.train is not set: name the files to prepare")
    records = stream(sources, data.limit)
    first = next(records, None)
    if first is None:
        raise DataError(f"{', '.join(sources)}: no records")
    fmt = _format(first[0], data)
    if cfg.tokenize and tokenizer is None:
        raise ValueError("prepare.tokenize needs the model's tokenizer")
    folder = Path(cfg.output)
    shards = _shard_writer(folder, cfg, data, fmt, tokenizer) if cfg.tokenize else None
    folder.mkdir(parents=True, exist_ok=True)
    workers = cfg.workers or os.cpu_count() or 1
    tally, start = Tally(), time.perf_counter()
    cleaner = Cleaner(cfg, data, fmt)
    exact = ExactDedup() if cfg.exact_dedup else None
    near = NearDedup(cfg.near_dedup) if cfg.near_dedup.enabled else None
    renderer = Renderer(tokenizer, train_on_prompt=data.train_on_prompt,
                        assistant_turns=data.assistant_turns) if cfg.tokenize else None
    jsonl = open(folder / "cleaned.jsonl", "w", encoding="utf-8") if cfg.write_jsonl else None
    with open(folder / "near_duplicates.jsonl", "w", encoding="utf-8") as pairs:
        out = Outputs(shards, renderer, jsonl, pairs)
        try:
            items = _cleaned(_with_first(first, records), cleaner, exact, workers, tally)
            _consume(items, near, out, data, tally, progress)
        finally:
            if jsonl is not None:
                jsonl.close()
    report = build_report(cfg, sources, fmt, tally, out, exact, near, workers, time.perf_counter() - start)
    if shards is not None:
        if not out.samples:
            raise DataError(f"{', '.join(sources)}: no record was left to tokenize ({drop_summary(report)})")
        shards.meta["domains"] = out.domains
        shards.close(report)
    (folder / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (folder / "report.md").write_text(format_report(report) + "\n")
    return PrepareResult(folder, report)


def _with_first(first, records):
    yield first
    yield from records


def _shard_writer(folder: Path, cfg: PrepareConfig, data: DataConfig, fmt: str, tokenizer):
    """A ShardWriter whose manifest says what made the tokens (train refuses another tokenizer's)."""
    from ..shards import ShardWriter, tokenizer_meta

    meta = {**tokenizer_meta(tokenizer), "format": fmt, "max_length": data.max_length, "overflow": data.overflow,
            "train_on_prompt": data.train_on_prompt, "assistant_turns": data.assistant_turns,
            "data": data.model_dump(), "prepare": cfg.model_dump()}
    return ShardWriter(folder, meta=meta)


def _consume(items: Iterator[Cleaned], near: NearDedup | None, out: Outputs, data: DataConfig, tally: Tally,
             progress: bool) -> None:
    """Near-dedup and write each cleaned record (these hold state, so they run here, in order)."""
    from tqdm.auto import tqdm

    kept_where: list[str] = []  # where each record near-dedup kept came from, for the removed pairs
    for item in tqdm(items, desc="preparing", unit=" records", disable=not progress, mininterval=2):
        if item.dropped_by is not None:
            tally.drop(item.dropped_by, item.where)
            continue
        for kind, n in item.pii.items():
            tally.pii[kind] = tally.pii.get(kind, 0) + n
        if near is not None and item.signature is not None:
            t = time.perf_counter()
            hit = near.check(item.signature)
            _tick(tally, "near_dedup", t)
            if hit is not None:
                tally.drop("near_dedup", item.where)
                pair = {"removed": item.where, "kept": kept_where[hit[0]], "similarity": round(hit[1], 4)}
                out.pairs.write(json.dumps(pair, ensure_ascii=False) + "\n")
                continue
            kept_where.append(item.where)
        _write(item, out, data, tally)
