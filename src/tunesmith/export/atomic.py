"""Write a folder all at once: fill a temporary sibling, then rename it into place.

A reader never sees a half-written export, and a crash leaves the previous folder intact.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path


class ExportError(ValueError):
    """An adapter or model folder cannot be written or read; the message says why."""


@contextlib.contextmanager
def atomic_folder(dest: str | Path, marker: str):
    """Yield a temporary folder; on success it replaces `dest`.

    An existing `dest` is replaced only if it is empty or holds `marker` (e.g. adapter_config.json),
    so a mistyped path never wipes an unrelated folder.
    """
    dest = Path(dest).expanduser().absolute()
    if dest.exists():
        if not dest.is_dir():
            raise ExportError(f"{dest} exists and is not a folder")
        if any(dest.iterdir()) and not (dest / marker).is_file():
            raise ExportError(f"refusing to replace {dest}: it is not empty and has no {marker}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # not mkdtemp: that makes the final folder mode 0700
    aside = None  # where the previous folder waits until the new one is in place
    try:
        yield tmp
        if dest.exists():
            # A folder cannot be os.replace'd onto a non-empty one: move the old one aside first.
            aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, aside / dest.name)
        os.replace(tmp, dest)
    except BaseException:
        if aside is not None and (aside / dest.name).exists() and not dest.exists():
            os.replace(aside / dest.name, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
