"""Reading JSONL with errors that name the file and line; writing JSON and JSONL files whole (aside,
then renamed, so a file that exists is complete)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator


def read_jsonl(path: str | Path, error: type[Exception] = ValueError) -> Iterator[tuple[str, Any]]:
    """Yield (`file:line`, value) for every non-blank line; a line that is not JSON raises `error`
    with that location (blank lines, often a trailing one, are skipped; a BOM is ignored)."""
    # Lines are decoded one by one, so a file that is not UTF-8 is reported at its line.
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{where}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}; "
                            "save the file as UTF-8)") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


def write_jsonl(path: str | Path, rows) -> Path:
    """Write `rows` (any iterable of JSON values), one a line, to a temporary file beside `path` and
    rename it into place: a reader never sees half a file. Creates the folder; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, data) -> Path:
    """Write one JSON value (indented) the same way: aside, then renamed. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
