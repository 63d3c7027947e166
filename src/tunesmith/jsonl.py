"""Reading JSONL with errors that name the file and line."""
from __future__ import annotations

import json
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
