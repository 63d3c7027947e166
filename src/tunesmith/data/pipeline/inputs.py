"""What `prepare.inputs` names, as one stream of records: files, folders of files, globs, or any source
`data.train` takes (task:NAME/SPLIT, `a+b` mixes, an HF save_to_disk folder).

A folder that is not a save_to_disk folder stands for every data file beneath it (sorted, so the order,
and with it which of two duplicates is kept, never depends on the file system). A `.txt` file is one
text record: documents kept whole.
"""
from __future__ import annotations

import glob
from itertools import islice
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from ..sources import Record, read_records

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def _is_arrow_folder(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file() or any(path.glob("*.arrow"))


def expand(inputs: list[str]) -> list[str]:
    """Every source the inputs name, in order; a glob or folder that holds no data file is an error."""
    sources: list[str] = []
    for item in inputs:
        path = Path(item)
        if any(c in item for c in "*?[") and not path.exists():
            found = sorted(p for p in glob.glob(item, recursive=True) if Path(p).suffix.lower() in DATA_SUFFIXES)
            if not found:
                raise DataError(f"prepare.inputs: `{item}` matches no {'/'.join(DATA_SUFFIXES)} file")
            sources += found
        elif path.is_dir() and not _is_arrow_folder(path):
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
            if not found:
                raise DataError(f"{path}: a folder with no {'/'.join(DATA_SUFFIXES)} file")
            sources += found
        else:
            sources.append(item)
    return sources


def _read_txt(path: Path) -> Iterator[Record]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid UTF-8 (save the file as UTF-8)") from None
    yield Record(str(path), {"text": text})


def stream(sources: list[str], limit: int | None = None) -> Iterator[tuple[Record, str]]:
    """(record, the source it came from) for every record of every source, in order; `limit` stops
    after that many records in all."""
    def every():
        for source in sources:
            if not source.startswith("task:") and Path(source).suffix.lower() == ".txt":
                records = _read_txt(Path(source)) if Path(source).is_file() else read_records(source)
            else:
                records = read_records(source)
            for record in records:
                yield record, source

    return islice(every(), limit)
