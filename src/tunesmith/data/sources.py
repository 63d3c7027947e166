"""Read raw records (dicts) from the files users have: .jsonl, .json, .csv, .parquet, and HF
`datasets.save_to_disk` folders.

Every record carries a location string (`train.jsonl:17` for line-based files, `train.parquet[3]` with a
0-based row index for the rest) so later errors can point at the exact record. Readers are generators,
so `data.limit` stops reading early on big files.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from ..jsonl import read_jsonl
from .errors import DataError

SUPPORTED = ".jsonl, .json, .csv, .parquet, an HF save_to_disk folder, or task:NAME/SPLIT"


class Record(NamedTuple):
    where: str  # e.g. "train.jsonl:17"; starts every error message about this record
    fields: dict[str, Any]


def read_records(path: str | Path) -> Iterator[Record]:
    """Yield the records of a data file or `save_to_disk` folder, in file order.

    `task:sql/train` (or `task:json`, split `train` by default) reads a split of a built-in
    generated task as chat records.
    """
    if str(path).startswith("task:"):
        return _read_task(str(path))
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        return _read_arrow_folder(path)
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use {SUPPORTED}")
    return reader(path)


def _read_task(spec: str) -> Iterator[Record]:
    from .tasks import get_task, task_records

    name, _, split = spec[len("task:"):].partition("/")
    try:
        task = get_task(name)
    except ValueError as e:
        raise DataError(f"{spec}: {e}") from None
    split = split or "train"
    return (Record(f"{spec}[#{i}]", r) for i, r in enumerate(task_records(task, split)))


def _as_record(where: str, value: Any) -> Record:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object (a record with named fields), got {type(value).__name__}")
    return Record(where, value)


def _read_jsonl(path: Path) -> Iterator[Record]:
    for where, value in read_jsonl(path, DataError):
        yield _as_record(where, value)


def _read_json(path: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8-sig") as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a list of records or {{\"data\": [...]}}, got {type(value).__name__}")
    for i, item in enumerate(value):
        yield _as_record(f"{path}[{i}]", item)


def _read_csv(path: Path) -> Iterator[Record]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long texts are normal in training data
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        start = 2  # line 1 is the header
        for row in reader:
            # A quoted field may span lines: report the line the record starts on.
            where = f"{path}:{start}"
            start = reader.line_num + 1
            row.pop(None, None)  # cells beyond the header have no column name
            yield Record(where, row)


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches()
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    i = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield Record(f"{path}[{i}]", row)
            i += 1


def _arrow_files(folder: Path) -> list[Path]:
    """The data files of a `save_to_disk` folder, in dataset order (state.json lists them)."""
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
        hint = f", e.g. {folder / splits[0]}" if splits else ""
        raise DataError(
            f"{folder}: a DatasetDict with splits {splits}; point data.train (or data.validation) at one split folder{hint}"
        )
    state = folder / "state.json"
    if state.is_file():
        try:
            names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
            return [folder / n for n in names]
        except (ValueError, KeyError, TypeError):
            pass  # an unexpected state.json: fall back to the file names
    files = sorted(folder.glob("data-*.arrow")) or sorted(folder.glob("*.arrow"))
    if not files:
        raise DataError(f"{folder}: a folder with no .arrow files; expected {SUPPORTED}")
    return files


def _arrow_batches(path: Path):
    """The record batches of one Arrow file."""
    import pyarrow as pa

    # `datasets` writes the IPC stream format; accept the IPC file format too.
    try:
        stream = pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        stream = None
    if stream is not None:
        yield from stream
        return
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: not a readable Arrow file ({e})") from None
    for k in range(reader.num_record_batches):
        yield reader.get_batch(k)


def _read_arrow_folder(folder: Path) -> Iterator[Record]:
    i = 0
    for path in _arrow_files(folder):
        if not path.is_file():
            raise DataError(f"{folder}: state.json lists {path.name}, which is missing")
        for batch in _arrow_batches(path):
            for row in batch.to_pylist():
                yield Record(f"{folder}[{i}]", row)
                i += 1
