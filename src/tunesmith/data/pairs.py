"""Contrastive training data: a query, its positive document and its hard negatives.

Accepted records (JSONL, JSON, CSV, parquet, a save_to_disk folder, or `task:retrieval/train`):

- pairs `{"query": str, "positive": str}` (sentence-transformers' `anchor` for `query`);
- triplets `{"query", "positive", "negative": str}`;
- `{"query", "positive", "negatives": [str, ...]}` (any number per record, none included); the
  columns `negative_1`, `negative_2`, ... of sentence-transformers' n-tuple datasets are read too;
- any of these with a `domain` (a string): the domains found are numbered 0..N-1 in sorted order
  (`PairSplits.domains`, saved with the run) and every item carries its domain id. Either every
  record of the data has a domain or none has.

Each text is tokenized as `models.embedding.tokenize` does (its special tokens, cut to the
objective's max_length), after the query prefix or the document prefix. An item is one query with
its positive and hard negatives; a micro-batch of contrastive training holds whole items, since the
other items' positives are its in-batch negatives.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import TypedDict

from tqdm.auto import tqdm

from ..config import DataConfig
from .errors import DataError
from .load import PROGRESS_MIN_RECORDS, read_splits, split_records
from .sources import Record

QUERY_FIELDS = ("query", "anchor")
POSITIVE_FIELDS = ("positive",)
NEGATIVE_FIELD, NEGATIVES_FIELD, DOMAIN_FIELD = "negative", "negatives", "domain"


class PairDataError(DataError):
    """A contrastive record that cannot be read; the message names the record and the field."""


class PairItem(TypedDict):
    query: list[int]
    positive: list[int]
    negatives: list[list[int]]
    domain: int  # -1 without domains


@dataclass
class PairSplits:
    train: list[PairItem]
    val: list[PairItem] | None
    stats: dict
    format: str = "pairs"
    domains: list[str] = field(default_factory=list)
    "Domain names; item['domain'] is an index into this list (-1 when the data has no domains)."


@dataclass
class PairRecord:
    """One record checked, before tokenization."""

    where: str
    query: str
    positive: str
    negatives: list[str]
    domain: str | None


# --------------------------------------------------------------------------------------------------
# records


def _text(fields: dict, name: str, where: str, at: str | None = None) -> str:
    value = fields[name] if at is None else name
    label = at or name
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        shown = "null" if value is None else type(value).__name__
        raise PairDataError(f"{where}: field '{label}' is {shown}; expected a string")
    if not value.strip():
        raise PairDataError(f"{where}: field '{label}' is empty")
    return value


def _pick(fields: dict, names: tuple[str, ...], where: str) -> str:
    for name in names:
        if name in fields:
            return _text(fields, name, where)
    raise PairDataError(f"{where}: record has no field '{names[0]}' (contrastive records need "
                        f"'query' and 'positive', optionally 'negative', 'negatives' and 'domain'; "
                        f"the record has [{', '.join(map(str, fields))}])")


def _negatives(fields: dict, where: str) -> list[str]:
    out: list[str] = []
    if fields.get(NEGATIVE_FIELD) is not None:
        value = fields[NEGATIVE_FIELD]
        if isinstance(value, list):  # a list under the singular name is still a list of negatives
            out += [_text({}, v, where, f"{NEGATIVE_FIELD}[{i}]") for i, v in enumerate(value)]
        else:
            out.append(_text(fields, NEGATIVE_FIELD, where))
    if fields.get(NEGATIVES_FIELD) is not None:
        value = fields[NEGATIVES_FIELD]
        if isinstance(value, str):  # CSV cells hold the list as JSON text
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise PairDataError(f"{where}: field '{NEGATIVES_FIELD}' is a string but not a JSON list "
                                    f"({e.msg})") from None
        if hasattr(value, "tolist"):  # a parquet list column read as an array
            value = value.tolist()
        if not isinstance(value, list):
            raise PairDataError(f"{where}: field '{NEGATIVES_FIELD}' is {type(value).__name__}; "
                                "expected a list of strings")
        out += [_text({}, v, where, f"{NEGATIVES_FIELD}[{i}]") for i, v in enumerate(value)]
    numbered = sorted((int(k.rsplit("_", 1)[1]), k) for k in fields
                      if k.startswith(NEGATIVE_FIELD + "_") and k.rsplit("_", 1)[1].isdigit())
    out += [_text(fields, k, where) for _, k in numbered if fields[k] is not None]
    return out


def pair_record(record: Record) -> PairRecord:
    """Check one raw record; errors name it and the field."""
    fields, where = record.fields, record.where
    domain = fields.get(DOMAIN_FIELD)
    if domain is not None:
        domain = _text(fields, DOMAIN_FIELD, where)
    return PairRecord(where, _pick(fields, QUERY_FIELDS, where), _pick(fields, POSITIVE_FIELDS, where),
                      _negatives(fields, where), domain)


def domain_ids(records: list[PairRecord]) -> list[str]:
    """The sorted domain names of `records`; all records have a domain or none has."""
    have = [r for r in records if r.domain is not None]
    if have and len(have) != len(records):
        missing = next(r for r in records if r.domain is None)
        first = have[0]
        raise PairDataError(f"{missing.where}: field '{DOMAIN_FIELD}' is missing, but {first.where} has one; "
                            "give every record a domain or none")
    return sorted({r.domain for r in have})


# --------------------------------------------------------------------------------------------------
# reading and tokenizing


def read_pair_records(cfg: DataConfig, seed: int) -> tuple[list[PairRecord], list[PairRecord] | None, str | None]:
    """(train records, validation records or None, validation source name), checked. A built-in
    task (`task:NAME/SPLIT`) gives its contrastive records (`task.records(split)`)."""
    if cfg.train.startswith("task:"):
        train = _task_records(cfg.train, cfg.limit)
        val, name = None, None
        if cfg.validation:
            val, name = _read_checked(cfg.validation), cfg.validation
        elif cfg.val_fraction > 0:
            train, val = split_records(train, cfg.val_fraction, seed)
            name = f"the validation split of {cfg.train}"
        return train, val, name
    records, val_records, val_name = read_splits(cfg, seed)
    train = [pair_record(r) for r in records]
    val = [pair_record(r) for r in val_records] if val_records is not None else None
    return train, val, val_name


def _read_checked(path: str) -> list[PairRecord]:
    if path.startswith("task:"):
        return _task_records(path, None)
    from .sources import read_records

    records = [pair_record(r) for r in read_records(path)]
    if not records:
        raise PairDataError(f"{path}: no records")
    return records


def _task_records(spec: str, limit: int | None) -> list[PairRecord]:
    """The contrastive records of a built-in task's split (`task.records(split)`: query, positive,
    negatives, domain)."""
    from .tasks import get_task

    name, _, split = spec[len("task:"):].partition("/")
    try:
        task = get_task(name)
    except ValueError as e:
        raise PairDataError(f"{spec}: {e}") from None
    if not hasattr(task, "records"):
        raise PairDataError(f"{spec}: the task `{name}` has no contrastive records (a retrieval task has)")
    try:
        raw = task.records(split or "train")
    except ValueError as e:
        raise PairDataError(f"{spec}: {e}") from None
    records = [pair_record(Record(f"{spec}[#{i}]", r)) for i, r in enumerate(raw[:limit] if limit else raw)]
    if not records:
        raise PairDataError(f"{spec}: no records")
    return records


def _token_lists(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    """Each text's token ids as `models.embedding.tokenize` makes them (padding removed), and how many were cut."""
    from ..models.embedding import tokenize

    batch = tokenize(tokenizer, texts, max_length)
    lengths = batch["attention_mask"].sum(1).tolist()
    ids = [row[:n] for row, n in zip(batch["input_ids"].tolist(), lengths)]
    return ids, sum(n >= max_length for n in lengths)


def tokenize_items(records: list[PairRecord], tokenizer, domains: list[str], *, max_length: int,
                   query_prefix: str = "", document_prefix: str = "", name: str = "train") -> tuple[list[PairItem], dict]:
    """Items (token ids of the query, positive and negatives; the domain id) and the split's stats."""
    index = {d: i for i, d in enumerate(domains)}
    items: list[PairItem] = []
    truncated, first_truncated = 0, None
    bar = tqdm(records, desc=f"tokenizing {name}", unit=" records", disable=len(records) < PROGRESS_MIN_RECORDS)
    for r in bar:
        if r.domain is not None and r.domain not in index:
            raise PairDataError(f"{r.where}: field '{DOMAIN_FIELD}' is {r.domain!r}, a domain the training data "
                                f"does not have ({', '.join(domains)})")
        ids, cut = _token_lists(tokenizer, [query_prefix + r.query, document_prefix + r.positive,
                                            *(document_prefix + n for n in r.negatives)], max_length)
        if cut:
            truncated += 1
            first_truncated = first_truncated or r.where
        items.append({"query": ids[0], "positive": ids[1], "negatives": ids[2:],
                      "domain": index[r.domain] if r.domain is not None else -1})
    return items, item_stats(items, records=len(records), truncated=truncated, truncated_first=first_truncated)


def item_stats(items: list[PairItem], **counts) -> dict:
    texts = [len(t) for it in items for t in (it["query"], it["positive"], *it["negatives"])]
    return {**counts, "items": len(items), "samples": len(items), "texts": len(texts), "tokens": sum(texts),
            "negatives": sum(len(it["negatives"]) for it in items), "length_max": max(texts, default=0)}


def load_contrastive(cfg: DataConfig, tokenizer, *, max_length: int, query_prefix: str = "",
                     document_prefix: str = "", seed: int = 0, report: bool = True) -> PairSplits:
    """Read, split and tokenize contrastive records; the split rules of `load_data`.

    Raises:
        DataError: a missing file, a bad record (the message names it and the field), a record
        without a domain among records with one, or a validation domain the training data lacks.
    """
    if cfg.format not in ("auto",):
        raise PairDataError(f"data.format={cfg.format} cannot feed the contrastive objective; its records have "
                            "query/positive fields (leave data.format=auto)")
    train_records, val_records, val_name = read_pair_records(cfg, seed)
    domains = domain_ids(train_records + (val_records or []))
    options = {"max_length": max_length, "query_prefix": query_prefix, "document_prefix": document_prefix}
    train, train_stats = tokenize_items(train_records, tokenizer, domains, name=cfg.train, **options)
    stats = {"train": train_stats}
    val = None
    if val_records is not None:
        val, stats["val"] = tokenize_items(val_records, tokenizer, domains, name=val_name, **options)
    if report:
        _announce(stats, max_length)
    return PairSplits(train=train, val=val, stats=stats, domains=domains)


def _announce(stats: dict, max_length: int) -> None:
    """Print (main process, stderr) how many records had a text cut to max_length."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    for split, st in stats.items():
        if st.get("truncated"):
            noun = "record has" if st["truncated"] == 1 else "records have"
            print(f"[tunesmith] truncated in {split}: {st['truncated']} {noun} a text cut to "
                  f"objective.contrastive.max_length={max_length} tokens, first at {st['truncated_first']}",
                  file=sys.stderr, flush=True)


def item_texts(item: PairItem) -> list[list[int]]:
    """Query, positive, negatives: the token lists of one item."""
    return [item["query"], item["positive"], *item["negatives"]]


def format_contrastive_inspection(splits: PairSplits, tokenizer, n: int = 3) -> str:
    """`tunesmith data inspect` for contrastive data: the first items' texts as the model reads them
    (prefix included, cut to max_length), then the split statistics."""
    parts = []
    for k, item in enumerate(splits.train[:n]):
        domain = f" · domain {splits.domains[item['domain']]}" if item["domain"] >= 0 else ""
        m = len(item["negatives"])
        parts.append(f"── item {k + 1} of {len(splits.train)}: {m} hard negative{'' if m == 1 else 's'}{domain} ──")
        for label, ids in [("query", item["query"]), ("positive", item["positive"]),
                           *((f"negative {i + 1}", t) for i, t in enumerate(item["negatives"]))]:
            parts.append(f"{label + ':':12}{tokenizer.decode(ids)!r} ({len(ids)} tokens)")
        parts.append("")
    for split, st in splits.stats.items():
        parts.append(f"{split}: {st['items']:,} items · {st['texts']:,} texts · {st['negatives']:,} hard negatives · "
                     f"{st['tokens']:,} tokens · longest text {st['length_max']} tokens · "
                     f"{st['truncated']:,} items with a text cut")
    if splits.domains:
        parts.append(f"domains: {', '.join(f'{i} {d}' for i, d in enumerate(splits.domains))}")
    return "\n".join(parts)
