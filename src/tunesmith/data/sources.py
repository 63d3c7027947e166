"""Read raw records (dicts) from the files users have: .jsonl, .json, .csv, .parquet, and HF
`datasets.save_to_disk` folders.

Every record carries a location string so later errors can point at the exact record:

- `train.jsonl:17`, `train.csv:17`, `train.json:17`: the line the record starts on (1-based; in a CSV the
  header is line 1, so the first record is line 2; a record of a minified .json gets `:line:column`);
- `train.parquet row 4`, `folder row 4` (save_to_disk): the row, 1-based, counting data rows only.

Text files must be UTF-8 (a BOM is fine); a bad byte is reported with the line it is on. Readers are
generators, so `data.limit` stops reading early on big files.
"""
from __future__ import annotations

import csv
import json
import re
import sys
from collections import Counter
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
    generated task as chat records. Several sources joined by `+` are a mix (`mixed_sources`).
    """
    sources = mixed_sources(str(path))
    if sources is not None:
        return _read_mix(sources)
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
    if reader is _read_parquet:
        return reader(path)
    return _utf8_checked(path, reader(path))


_DOMAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # the NAME of a `NAME=source` in a mix


def mixed_sources(spec: str) -> list[tuple[str, str]] | None:
    """[(domain, source)] of a mix such as `task:sql/train+task:json/train` or `sql=a.jsonl+json=b.jsonl`,
    None for one plain source. A source's domain is its `NAME=` prefix, else the task's name
    (`task:sql/...` -> sql), else the file's name without extension. `NAME=` on a single source gives
    its records that domain. A path that exists as written is never split (a file named `a+b.jsonl`)."""
    if Path(spec).exists() or ("+" not in spec and "=" not in spec):
        return None
    parts, named = [], False
    for part in spec.split("+"):
        name, eq, source = part.strip().partition("=")
        if not eq or not _DOMAIN_NAME.fullmatch(name):
            name, source = "", part.strip()
        if not source:
            raise DataError(f"{spec}: an empty source in a mix; join sources with `+`, e.g. task:sql/train+task:json/train")
        named = named or bool(name)
        if not name:
            name = source[len("task:"):].partition("/")[0] if source.startswith("task:") else Path(source).stem
        parts.append((name, source))
    return parts if len(parts) > 1 or named else None


def _read_mix(sources: list[tuple[str, str]]) -> Iterator[Record]:
    """The sources' records interleaved one by one (so `data.limit` draws from every source), each
    given its source's domain unless the record names its own `domain`."""
    readers = [(name, iter(read_records(source))) for name, source in sources]
    while readers:
        for entry in list(readers):
            name, reader = entry
            record = next(reader, None)
            if record is None:
                readers.remove(entry)
            elif "domain" in record.fields and record.fields["domain"] is not None:
                yield record
            else:
                yield Record(record.where, {**record.fields, "domain": name})


def _utf8_checked(path: Path, records: Iterator[Record]) -> Iterator[Record]:
    """The records of a text file; a byte that is not UTF-8 becomes a DataError naming its line."""
    try:
        yield from records
    except UnicodeDecodeError:
        raise DataError(f"{path}:{first_bad_utf8_line(path)}: not valid UTF-8 (save the file as UTF-8)") from None


def first_bad_utf8_line(path: Path, chunk_size: int = 1 << 20) -> int:
    """The 1-based line holding the file's first byte that is not UTF-8 (0 if there is none).

    The decoder's own byte offset is relative to whatever chunk it was decoding, so the file is
    scanned again here, in chunks, carrying over a multi-byte character cut by a chunk boundary.
    """
    lines_before, carry = 0, b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            data = carry + chunk
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as e:
                # An incomplete character at the very end may be finished by the next chunk.
                if chunk and e.reason == "unexpected end of data" and e.end == len(data):
                    lines_before += data.count(b"\n", 0, e.start)
                    carry = data[e.start:]
                    continue
                return lines_before + data.count(b"\n", 0, e.start) + 1
            if not chunk:
                return 0
            lines_before += data.count(b"\n")


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
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        return  # an empty file: no records
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    starts = None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value, starts = value["data"], _json_data_starts(text)
    elif isinstance(value, list):
        starts = _json_array_starts(text, _skip_space(text, 0))
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a list of records or {{\"data\": [...]}}, got {type(value).__name__}")
    for item, where in zip(value, _text_positions(text, starts, path)):
        yield _as_record(where, item)


_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace
_DECODER = json.JSONDecoder()


def _skip_space(text: str, i: int) -> int:
    return _SPACE.match(text, i).end()


def _json_array_starts(text: str, i: int) -> list[int]:
    """Character offsets of the elements of the (valid) JSON array that starts at `text[i]`."""
    starts, i = [], _skip_space(text, i + 1)
    while text[i] != "]":
        starts.append(i)
        _, i = _DECODER.raw_decode(text, i)
        i = _skip_space(text, i)
        if text[i] == ",":
            i = _skip_space(text, i + 1)
    return starts


def _json_data_starts(text: str) -> list[int]:
    """Element offsets of the `data` array of a (valid) top-level JSON object (its last `data` key, as
    json.loads keeps the last of duplicate keys)."""
    starts, i = [], _skip_space(text, _skip_space(text, 0) + 1)
    while text[i] != "}":
        key, i = _DECODER.raw_decode(text, i)
        i = _skip_space(text, _skip_space(text, i) + 1)  # past the colon
        if key == "data" and text[i] == "[":
            starts = _json_array_starts(text, i)
        _, i = _DECODER.raw_decode(text, i)
        i = _skip_space(text, i)
        if text[i] == ",":
            i = _skip_space(text, i + 1)
    return starts


def _text_positions(text: str, starts: list[int], path: Path) -> Iterator[str]:
    """`path:line` of each offset, or `path:line:column` when several records start on one line."""
    lines, pos, line = [], 0, 1
    for start in starts:  # increasing, so counting newlines as we go is linear
        line += text.count("\n", pos, start)
        pos = start
        lines.append((line, start - (text.rfind("\n", 0, start) + 1) + 1))
    shared = {ln for ln, n in Counter(ln for ln, _ in lines).items() if n > 1}
    for ln, col in lines:
        yield f"{path}:{ln}:{col}" if ln in shared else f"{path}:{ln}"


def _read_csv(path: Path) -> Iterator[Record]:
    """Rows as {header: cell}; a row starts on the line after the previous one ended (a quoted cell
    may span lines; blank lines hold no record)."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long texts are normal in training data
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        while True:
            start = reader.line_num + 1
            row = next(reader, None)
            if row is None:
                return
            if not row:
                continue  # a blank line
            where = f"{path}:{start}"
            extra = [cell for cell in row[len(header):] if cell.strip()]
            if extra:
                raise DataError(f"{where}: {len(row)} cells but the header names {len(header)} columns "
                                "(a comma in an unquoted text? quote cells that hold commas)")
            yield Record(where, {name: (row[k] if k < len(row) else None) for k, name in enumerate(header)})


def _rows(path: Path, batches, first_row: int = 1) -> Iterator[Record]:
    """Records `path row N` (1-based) from Arrow record batches; a read error names the row it hit."""
    import pyarrow as pa

    n = first_row
    try:
        for batch in batches:
            for row in batch.to_pylist():
                yield Record(f"{path} row {n}", row)
                n += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} row {n}: cannot read the file from here on (truncated or corrupt? {e})") from None


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    yield from _rows(path, batches)


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
    n = 1
    for path in _arrow_files(folder):
        if not path.is_file():
            raise DataError(f"{folder}: state.json lists {path.name}, which is missing")
        for record in _rows(path, _arrow_batches(path), first_row=n):
            yield Record(f"{folder} row {n}", record.fields)
            n += 1
