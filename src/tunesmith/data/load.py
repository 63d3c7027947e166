"""From the recipe's `data` section to lists of Samples: read, split, format, render, filter, count."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
from tqdm.auto import tqdm

from ..config import DataConfig
from .errors import DataError
from .formats import Example, detect_format, record_weight, to_example
from .render import Renderer, Sample, fit_length, weigh
from .shards import ShardedSamples, is_shard_folder, length_stats, open_shards, shard_stats
from .skipped import NOTHING_TO_TRAIN, Skipped, announce, skip_lines
from .sources import Record, read_records
from .tools import answer_text

PROGRESS_MIN_RECORDS = 2000  # below this a progress bar is just noise


@dataclass
class DataSplits:
    train: list[Sample]
    val: list[Sample] | None
    stats: dict  # {"train": {...}, "val": {...}}: see `split_stats`
    format: str  # the format used (what `auto` resolved to)
    domains: list[str] = field(default_factory=list)  # the records' `domain` names, sorted: sample["domain"] indexes it


def load_data(cfg: DataConfig, tokenizer, seed: int = 0, report: bool = True) -> DataSplits:
    """Read, split and tokenize the training (and validation) data described by `cfg`.

    Validation comes from `cfg.validation`, else a `cfg.val_fraction` of the training records chosen
    at random by `seed` (the rest stay in their file order). `cfg.limit` keeps the first N training
    records, before the split. The format is detected once, from the first training record.
    A shard folder (`data prepare`) is read lazily (`load_shard_splits`); `data.mix` mixes several
    sources by tokens (`mix.load_mix`).

    Raises:
        DataError: a missing or unreadable file, a bad record (the message names it), or a split left
        with no usable sample.
    """
    if cfg.mix:
        from .mix import load_mix  # (mix loads each source through this function)

        return load_mix(cfg, tokenizer, seed, report)
    if is_shard_folder(cfg.train):
        return load_shard_splits(cfg, tokenizer, seed, report)
    records, val_records, val_name = read_splits(cfg, seed)
    domains = domain_names(records + (val_records or []))
    index = {name: k for k, name in enumerate(domains)}

    fmt = detect_format(records[0], cfg)
    renderer = Renderer(tokenizer, train_on_prompt=cfg.train_on_prompt, assistant_turns=cfg.assistant_turns)
    train, train_stats = _build(records, fmt, cfg, renderer, cfg.train, index)
    stats = {"train": train_stats}
    val = None
    if val_records is not None:
        val, stats["val"] = _build(val_records, fmt, cfg, renderer, val_name, index)
    if report:
        announce(stats, cfg.max_length)
    return DataSplits(train=train, val=val, stats=stats, format=fmt, domains=domains)


def load_shard_splits(cfg: DataConfig, tokenizer, seed: int = 0, report: bool = True) -> DataSplits:
    """`load_data` for a shard folder: nothing is tokenized or read but the per-sample arrays; the
    split rules are the same (`limit` first, then a validation file/folder or a seeded `val_fraction`
    held out of the samples)."""
    train = open_shards(cfg.train, tokenizer)
    if cfg.limit is not None:
        train = train.subset(np.arange(min(cfg.limit, len(train))))
    val, val_stats = None, None
    if cfg.validation and is_shard_folder(cfg.validation):
        val = open_shards(cfg.validation, tokenizer)
        val_stats = shard_stats(val, records=len(val))
    elif cfg.validation:
        records = list(read_records(cfg.validation))
        if not records:
            raise DataError(f"{cfg.validation}: no records")
        renderer = Renderer(tokenizer, train_on_prompt=cfg.train_on_prompt, assistant_turns=cfg.assistant_turns)
        val, val_stats = _build(records, detect_format(records[0], cfg), cfg, renderer, cfg.validation)
    elif cfg.val_fraction > 0:
        train, val = split_samples(train, cfg.val_fraction, seed, cfg.train)
        val_stats = shard_stats(val, records=len(val))
    stats = {"train": shard_stats(train, records=len(train))}
    if val_stats is not None:
        stats["val"] = val_stats
    if report:
        announce(stats, cfg.max_length)
    meta = train.manifest.get("meta", {})
    return DataSplits(train=train, val=val, stats=stats, format=str(meta.get("format", "shards")),
                      domains=list(meta.get("domains", [])))


def split_samples(samples: ShardedSamples, fraction: float, seed: int, name: str):
    """`split_records` over samples: the same seeded choice of held-out positions, both parts in order."""
    held = np.zeros(len(samples), dtype=bool)
    held[held_out(len(samples), fraction, seed, f"{name}: ", "samples")] = True
    return samples.subset(np.flatnonzero(~held)), samples.subset(np.flatnonzero(held))


def domain_names(records: list[Record]) -> list[str]:
    """The sorted names in the records' `domain` field (a domain-expert MoE routes a sample of the
    k-th to expert k); every record has one or none has."""
    have = [r for r in records if r.fields.get("domain") is not None]
    if not have:
        return []
    if len(have) != len(records):
        missing = next(r for r in records if r.fields.get("domain") is None)
        raise DataError(f"{missing.where}: field 'domain' is missing, but {have[0].where} has one; give every "
                        "record a domain or none")
    bad = next((r for r in have if not isinstance(r.fields["domain"], str) or not r.fields["domain"]), None)
    if bad is not None:
        raise DataError(f"{bad.where}: field 'domain' must be a non-empty string, got {bad.fields['domain']!r}")
    return sorted({r.fields["domain"] for r in have})


def read_splits(cfg: DataConfig, seed: int) -> tuple[list[Record], list[Record] | None, str | None]:
    """(training records, validation records or None, a name for the validation source): `limit`
    applies to the training file, then a validation file or a seeded `val_fraction` is held out."""
    if not cfg.train:
        raise DataError("data.train is not set: give a .jsonl, .json, .csv, .parquet file or a save_to_disk folder")
    records = list(islice(read_records(cfg.train), cfg.limit))
    if not records:
        raise DataError(f"{cfg.train}: no records")
    val_records, val_name = None, None
    if cfg.validation:
        val_records, val_name = list(read_records(cfg.validation)), cfg.validation
        if not val_records:
            raise DataError(f"{cfg.validation}: no records")
    elif cfg.val_fraction > 0:
        records, val_records = split_records(records, cfg.val_fraction, seed)
        val_name = f"the validation split of {cfg.train}"
    return records, val_records, val_name


def held_out(n: int, fraction: float, seed: int, where: str = "", what: str = "records") -> list[int]:
    """The positions, of n, held out for validation: round(fraction * n) (at least 1) chosen by `seed`,
    the same for records read into memory and for samples in shards."""
    n_val = max(1, round(fraction * n))
    if n_val >= n:
        raise DataError(f"{where}data.val_fraction={fraction} leaves no training {what} out of {n}")
    return random.Random(f"tunesmith-val:{seed}").sample(range(n), n_val)


def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out round(fraction * n) records (at least 1) chosen by `seed`; both parts keep file order."""
    held = set(held_out(len(records), fraction, seed))
    train = [r for i, r in enumerate(records) if i not in held]
    val = [r for i, r in enumerate(records) if i in held]
    return train, val


def _build(records: list[Record], fmt: str, cfg: DataConfig, renderer: Renderer, name: str,
           domains: dict[str, int] | None = None):
    """Render records into samples, applying max_length/overflow; records with nothing to train are
    skipped, counted by reason with the first one's location (see `skipped.py`). With `domains`, a
    sample carries its record's domain number (`domain`)."""
    samples: list[Sample] = []
    skipped = Skipped()
    bar = tqdm(records, desc=f"tokenizing {name}", unit=" records", disable=len(records) < PROGRESS_MIN_RECORDS)
    for record in bar:
        example = to_example(record, fmt, cfg)
        reason = untrainable(example, cfg)
        if reason:
            skipped.add(reason, record.where)
            continue
        weight = record_weight(record)
        try:
            sample = weigh(renderer(example), weight)
        except DataError as e:
            raise DataError(f"{record.where}: {e}") from None
        if domains:
            sample["domain"] = domains[record.fields["domain"]]
        admit(sample, record.where, cfg, skipped, samples)
    return finish_split(samples, len(records), skipped, cfg, name, "samples")


def admit(sample: Sample, where: str, cfg: DataConfig, skipped: Skipped, samples: list[Sample]) -> None:
    """Fit a rendered sample to max_length/overflow and keep it, or count why it is skipped."""
    sample, was_truncated = fit_length(sample, cfg.max_length, cfg.overflow)
    if sample is None:
        skipped.add("too_long", where)
    elif not any(sample["weights"]):
        skipped.add("cut_off" if was_truncated else "no_trained", where)
    else:
        if was_truncated:
            skipped.add_truncated(where)
        samples.append(sample)


def finish_split(samples: list[Sample], n_records: int, skipped: Skipped, cfg: DataConfig, name: str, what: str):
    """(samples, stats) of a built split; no usable sample is an error that says why."""
    if not samples:
        raise DataError(no_usable(name, skipped, cfg, what))
    return samples, split_stats(samples, records=n_records, dropped_too_long=skipped.count("too_long"),
                                truncated=skipped.truncated, truncated_first=skipped.first_truncated,
                                no_trained_token=skipped.count(*NOTHING_TO_TRAIN), skipped=skipped.as_stats())


def untrainable(example: Example, cfg: DataConfig) -> str | None:
    """Why an example has nothing to train before it is rendered (a reason of `skipped.REASONS`), or None."""
    if isinstance(example, str):
        return "empty" if not example.strip() else None
    if cfg.train_on_prompt:
        return None  # every token after the first trains
    answers = [answer_text(m) for m in example if m["role"] == "assistant"]  # tool calls are answers too
    if not answers:
        return "no_assistant"
    if cfg.assistant_turns == "last":
        answers = answers[-1:]
    return "empty_answer" if not any(a.strip() for a in answers) else None


def no_usable(name: str, skipped: Skipped, cfg: DataConfig, what: str) -> str:
    """The error for a split that kept nothing: every reason, with its first record."""
    reasons = "; ".join(skip_lines(skipped.as_stats(), cfg.max_length)) or "no records"
    return f"no usable {what} in {name} after filtering: {reasons}"


def split_stats(samples: list[Sample], **counts) -> dict:
    """Counts (and any other facts given, e.g. where skipped records are) plus the token statistics
    of one split (lengths in tokens, percentiles by nearest rank)."""
    trained = sum(sum(1 for w in s["weights"] if w) for s in samples)
    return length_stats([len(s["input_ids"]) for s in samples], trained, **counts)
