"""Long training documents from code already on this machine (`tunesmith data long-docs`).

    tunesmith data long-docs --output long/ --min-tokens 8192 --max-tokens 16384
    tunesmith data long-docs --packages transformers numpy --folder ~/src/myproject --output long/

ProLong (Gao et al., 2024, §3) found code repositories concatenated per repository to be among the
best long-context data: the files of one project refer to each other, so a model has a reason to
look thousands of tokens back. This builds such documents offline from installed Python packages
(or folders): every package and sub-package becomes one document, its own source files in sorted
order, each preceded by a header line `# file: pkg/sub/mod.py`. A file seen before (the same bytes
in another place) is left out; empty files too. Documents shorter than `min_tokens` are dropped;
longer ones are cut into rows of at most `max_tokens` (at token boundaries; a tail shorter than
`min_tokens` is dropped), so every row is real, contiguous text.

Packages are split whole between train and held-out (no package in both): the held-out documents
measure long-text perplexity on code the model did not train on. Everything is sorted, so the same
packages and tokenizer give the same files byte for byte.
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from ..jsonl import write_jsonl
from .errors import DataError

# Present wherever tunesmith is installed (its own dependencies); those that are not are skipped.
DEFAULT_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "huggingface_hub", "numpy", "pydantic",
                    "yaml", "jinja2", "tqdm", "tunesmith")
SUFFIXES = (".py",)


@dataclass
class LongDoc:
    text: str
    source: str  # "pkg/sub": the (sub-)package the text comes from
    tokens: int
    package: str  # the top-level package: the unit of the train/held-out split


@dataclass
class LongDocs:
    train: list[LongDoc]
    held_out: list[LongDoc]
    skipped: dict[str, int] = field(default_factory=dict)  # why documents or files were left out: how many


def package_root(name: str) -> Path:
    """The installed package's folder (or a single-module package's file), found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise DataError(f"--packages: `{name}` is not an installed Python package")
    if spec.submodule_search_locations:
        return Path(sorted(spec.submodule_search_locations)[0])
    if spec.origin and spec.origin.endswith(SUFFIXES):
        return Path(spec.origin)
    raise DataError(f"--packages: `{name}` has no Python source files (a compiled or built-in module)")


def source_groups(root: Path, name: str) -> dict[str, list[tuple[str, Path]]]:
    """Per (sub-)package folder under `root`, its own source files as (header path, file), sorted;
    keyed by `name/sub/...`. Hidden folders and `__pycache__` are skipped."""
    if root.is_file():
        return {name: [(name + root.suffix, root)]}
    groups: dict[str, list[tuple[str, Path]]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.suffix not in SUFFIXES or not path.is_file() or any(
                p.startswith(".") or p == "__pycache__" for p in rel.parts[:-1]):
            continue
        key = "/".join((name, *rel.parts[:-1]))
        groups.setdefault(key, []).append(("/".join((name, *rel.parts)), path))
    return dict(sorted(groups.items()))


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def concatenate(files: list[tuple[str, Path]], seen: set[str], skipped: dict[str, int]) -> str:
    """The files' texts, each after its `# file:` header; files already in `seen` (by content) are skipped."""
    parts = []
    for header, path in files:
        text = _read(path)
        if text is None or not text.strip():
            skipped["empty or unreadable files"] = skipped.get("empty or unreadable files", 0) + 1
            continue
        digest = hashlib.sha1(text.encode()).hexdigest()
        if digest in seen:
            skipped["duplicate files"] = skipped.get("duplicate files", 0) + 1
            continue
        seen.add(digest)
        parts.append(f"# file: {header}\n{text if text.endswith(chr(10)) else text + chr(10)}")
    return "\n".join(parts)


def cut(text: str, tokenizer, min_tokens: int, max_tokens: int | None) -> list[tuple[str, int]]:
    """(text, tokens) rows of at most `max_tokens` tokens, cut at token boundaries; rows (and a
    tail) under `min_tokens` tokens are dropped."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(max_tokens))
    n = len(enc["input_ids"])
    if n < min_tokens:
        return []
    if not max_tokens or n <= max_tokens:
        return [(text, n)]
    starts = [enc["offset_mapping"][i][0] for i in range(0, n, max_tokens)] + [len(text)]
    rows = []
    for k in range(len(starts) - 1):
        count = min(max_tokens, n - k * max_tokens)
        if count >= min_tokens:
            rows.append((text[starts[k]:starts[k + 1]], count))
    return rows


def split_packages(tokens: dict[str, int], held_out: list[str] | None, fraction: float) -> set[str]:
    """The held-out packages: `held_out` if given, else packages in a fixed pseudo-random order
    (by name hash) that keep the held-out share of tokens at most `fraction`, at least one when
    two or more packages have documents (the smallest, if none fits), never all of them."""
    if held_out is not None:
        unknown = [p for p in held_out if p not in tokens]
        if unknown:
            raise DataError(f"--held-out: `{unknown[0]}` has no documents (packages: {', '.join(sorted(tokens))})")
        if set(held_out) >= set(tokens):
            raise DataError("--held-out: every package is held out; nothing is left to train on")
        return set(held_out)
    if len(tokens) < 2 or fraction <= 0:
        return set()
    total, chosen = sum(tokens.values()), set()
    for name in sorted(tokens, key=lambda p: hashlib.sha1(p.encode()).hexdigest()):
        if sum(tokens[p] for p in chosen) + tokens[name] <= fraction * total and len(chosen) < len(tokens) - 1:
            chosen.add(name)
    return chosen or {min(tokens, key=lambda p: (tokens[p], p))}


def _sources(packages: list[str], folders: list[str | Path]) -> list[tuple[str, Path]]:
    """(name, root) of every package and folder; a folder is named by its last part."""
    roots = [(name, package_root(name)) for name in packages]
    for folder in folders:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise DataError(f"--folder: {path} is not a folder")
        roots.append((path.resolve().name, path))
    names = [n for n, _ in roots]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"--packages/--folder: `{twice[0]}` is named twice")
    if not roots:
        raise DataError("--packages/--folder: nothing to read")
    return sorted(roots)


def build_long_docs(tokenizer, packages: list[str] | None = None, folders: list[str | Path] = (),
                    min_tokens: int = 4096, max_tokens: int | None = None, held_out: list[str] | None = None,
                    held_out_fraction: float = 0.1, progress: bool = False) -> LongDocs:
    """Long documents from installed packages and folders (see the module docstring).

    Args:
        tokenizer: counts tokens (the model's own: the lengths the training rows will have).
        packages: importable package names; None = the installed ones of `DEFAULT_PACKAGES`.
        folders: source folders, each treated as a package named after the folder.
        min_tokens, max_tokens: the shortest row kept; the longest row (None = uncut).
        held_out, held_out_fraction: the held-out packages by name, or their share of the tokens.

    Returns:
        Train and held-out rows, each list sorted by source, and counts of what was left out.
    """
    from tqdm.auto import tqdm

    if max_tokens is not None and max_tokens < min_tokens:
        raise DataError(f"--max-tokens ({max_tokens}) is below --min-tokens ({min_tokens})")
    if packages is None:
        packages = [p for p in DEFAULT_PACKAGES if importlib.util.find_spec(p) is not None]
    groups = [(name, key, files) for name, root in _sources(list(packages), list(folders))
              for key, files in source_groups(root, name).items()]
    seen: set[str] = set()
    skipped: dict[str, int] = {}
    docs: list[LongDoc] = []
    for name, key, files in tqdm(groups, desc="long-docs", unit="folder", disable=not progress):
        text = concatenate(files, seen, skipped)
        rows = cut(text, tokenizer, min_tokens, max_tokens) if text else []
        if not rows:
            skipped["documents under --min-tokens"] = skipped.get("documents under --min-tokens", 0) + 1
        docs += [LongDoc(t, key, n, name) for t, n in rows]
    if not docs:
        raise DataError(f"no document reaches --min-tokens {min_tokens}: lower it or add packages")
    totals: dict[str, int] = {}
    for d in docs:
        totals[d.package] = totals.get(d.package, 0) + d.tokens
    out = split_packages(totals, held_out, held_out_fraction)
    return LongDocs([d for d in docs if d.package not in out], [d for d in docs if d.package in out], skipped)


def write_long_docs(docs: LongDocs, output: str | Path) -> Path:
    """`train.jsonl` and `held_out.jsonl` ({"text", "source", "tokens"} a line) and `summary.md` in `output`."""
    output = Path(output)
    for name, rows in (("train", docs.train), ("held_out", docs.held_out)):
        write_jsonl(output / f"{name}.jsonl", ({"text": d.text, "source": d.source, "tokens": d.tokens} for d in rows))
    (output / "summary.md").write_text(format_summary(docs) + "\n", encoding="utf-8")
    return output


def format_summary(docs: LongDocs) -> str:
    """A markdown table: rows and tokens per package and split, the totals, what was left out."""
    lines = ["| split | package | rows | tokens | longest |", "|---|---|--:|--:|--:|"]
    for split, rows in (("train", docs.train), ("held-out", docs.held_out)):
        by_package: dict[str, list[int]] = {}
        for d in rows:
            by_package.setdefault(d.package, []).append(d.tokens)
        for package, counts in sorted(by_package.items()):
            lines.append(f"| {split} | {package} | {len(counts)} | {sum(counts):,} | {max(counts):,} |")
        lines.append(f"| **{split}** | all | {len(rows)} | {sum(d.tokens for d in rows):,} | "
                     f"{max((d.tokens for d in rows), default=0):,} |")
    if docs.skipped:
        lines.append("")
        lines.append("left out: " + ", ".join(f"{n} {why}" for why, n in sorted(docs.skipped.items())))
    return "\n".join(lines)
