"""Tokenized shards: rendered samples stored once, read lazily by `train`.

A shard folder holds `shard-00000.safetensors`, `shard-00001.safetensors`, ... and `manifest.json`,
written last (and atomically), so a folder with a manifest is complete. Each shard file has the
tensors of its samples laid end to end:

    input_ids  [tokens]     uint16 (ids < 65536) or uint32
    weights    [tokens]     uint8 when every weight is 0 or 1, else float32
    offsets    [samples+1]  int64: sample i is input_ids[offsets[i]:offsets[i+1]]
    lengths    [samples]    int32   (tokens of each sample)
    units      [samples]    int32   (trained tokens: weights > 0)
    sources    [samples]    int32   (index into the manifest's `sources`)
    domains    [samples]    int32   (only when samples carry a `domain`)

Reading parses each file's header (the safetensors layout: an 8-byte little-endian header size, a
JSON header of {name: {dtype, shape, data_offsets}}, then the raw bytes) and reads the per-sample
arrays (`lengths`, `units`, `sources`), so opening a folder of a billion tokens costs a few dozen
bytes a sample, never the tokens; a sample's tokens are read from the file when it is batched.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import DataError
from .render import Sample

MANIFEST = "manifest.json"
FORMAT = "tunesmith-shards"
VERSION = 1
_DTYPES = {"U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "I32": np.int32, "I64": np.int64, "F32": np.float32}


def tokenizer_meta(tokenizer) -> dict:
    """What identifies a tokenizer in a manifest: its name, vocabulary size and a hash of its
    vocabulary (names differ between a hub id and a local copy; the hash does not)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256("\n".join(f"{i}\t{t}" for t, i in vocab).encode()).hexdigest()[:16]
    return {"tokenizer": str(getattr(tokenizer, "name_or_path", "")), "vocab_size": len(tokenizer),
            "tokenizer_hash": digest}


class ShardWriter:
    """Append samples; every `shard_tokens` tokens a shard file is written. `close` writes the
    manifest (with `meta`, what produced the tokens, and `report`, the producing pipeline's counts).

    `meta` should hold `tokenizer_meta(tokenizer)`'s keys: `open_shards(..., tokenizer=)` refuses a
    folder whose tokenizer differs.
    """

    def __init__(self, folder, *, meta: dict, shard_tokens: int = 16_000_000):
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.folder = Path(folder)
        if (self.folder / MANIFEST).exists():
            raise DataError(f"{self.folder}: already holds shards (a {MANIFEST}); choose an empty folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.meta, self.shard_tokens = dict(meta), shard_tokens
        self.shards: list[dict] = []
        self.sources: list[str] = []
        self._source_index: dict[str, int] = {}
        self._has_domains: bool | None = None  # fixed by the first sample
        self._reset()
        self.closed = False

    def _reset(self) -> None:
        self._ids: list[np.ndarray] = []
        self._weights: list[np.ndarray] = []
        self._lengths: list[int] = []
        self._units: list[int] = []
        self._src: list[int] = []
        self._domains: list[int] = []
        self._tokens = 0

    def add(self, sample: Sample, source: str = "") -> None:
        """Append one sample (`input_ids`, `weights` of the same length, optional int `domain`);
        `source` names where it came from (kept per sample, used by mixing and reports)."""
        if self.closed:
            raise DataError(f"{self.folder}: the shard writer is closed")
        ids = np.asarray(sample["input_ids"], dtype=np.int64)
        weights = np.asarray(sample["weights"], dtype=np.float32)
        if ids.ndim != 1 or ids.shape != weights.shape or not len(ids):
            raise DataError(f"{source or 'a sample'}: input_ids and weights must be non-empty and of one length, "
                            f"got {ids.shape} and {weights.shape}")
        if ids.min() < 0 or ids.max() >= 2**32:
            raise DataError(f"{source or 'a sample'}: token ids must lie in [0, 2**32)")
        if self._has_domains is None:
            self._has_domains = "domain" in sample
        elif self._has_domains != ("domain" in sample):
            raise DataError(f"{source or 'a sample'}: every sample carries a `domain` or none does")
        if source not in self._source_index:
            self._source_index[source] = len(self.sources)
            self.sources.append(source)
        self._ids.append(ids.astype(np.uint32))  # (4 bytes a buffered token, not 8)
        self._weights.append(weights)
        self._lengths.append(len(ids))
        self._units.append(int((weights > 0).sum()))
        self._src.append(self._source_index[source])
        if "domain" in sample:
            self._domains.append(int(sample["domain"]))
        self._tokens += len(ids)
        if self._tokens >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        """Write the buffered samples as the next shard file (via a temporary name, then renamed)."""
        if not self._lengths:
            return
        from safetensors.numpy import save_file

        ids, weights = np.concatenate(self._ids), np.concatenate(self._weights)
        lengths = np.asarray(self._lengths, dtype=np.int32)
        tensors = {
            "input_ids": ids.astype(np.uint16 if ids.max() < 2**16 else np.uint32),
            "weights": weights.astype(np.uint8) if np.isin(weights, (0.0, 1.0)).all() else weights,
            "offsets": np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]),
            "lengths": lengths,
            "units": np.asarray(self._units, dtype=np.int32),
            "sources": np.asarray(self._src, dtype=np.int32),
        }
        if self._domains:
            tensors["domains"] = np.asarray(self._domains, dtype=np.int32)
        name = f"shard-{len(self.shards):05d}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, self.folder / name)
        self.shards.append({"file": name, "samples": len(lengths), "tokens": int(lengths.sum()),
                            "trained_tokens": int(sum(self._units))})
        self._reset()

    def close(self, report: dict | None = None) -> Path:
        """Flush the last shard and write the manifest; returns the folder."""
        if self.closed:
            return self.folder
        self._flush()
        if not self.shards:
            raise DataError(f"{self.folder}: no samples were written")
        manifest = {
            "format": FORMAT, "version": VERSION, "meta": self.meta, "sources": self.sources,
            "samples": sum(s["samples"] for s in self.shards), "tokens": sum(s["tokens"] for s in self.shards),
            "trained_tokens": sum(s["trained_tokens"] for s in self.shards),
            "shards": self.shards, "report": report or {},
        }
        tmp = self.folder / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, self.folder / MANIFEST)
        self.closed = True
        return self.folder

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            self.close()


def is_shard_folder(path) -> bool:
    """True for a folder with a tunesmith shard manifest (a finished `ShardWriter`)."""
    p = Path(path) if path else None
    if p is None or not (p / MANIFEST).is_file():
        return False
    try:
        return json.loads((p / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def read_manifest(path) -> dict:
    """The manifest of a shard folder, checked; a clear DataError otherwise."""
    p = Path(path) / MANIFEST
    try:
        manifest = json.loads(p.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not a shard folder (no {MANIFEST})") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{p}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{p}: not a tunesmith shard manifest (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise DataError(f"{p}: shard format version {manifest.get('version')!r}; this tunesmith reads {VERSION}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards or not all(isinstance(e, dict) and "file" in e for e in shards):
        raise DataError(f"{p}: `shards` must list the shard files ({{file, samples, tokens}} each)")
    return manifest


def tensor_table(path: Path) -> dict[str, tuple[np.dtype, int, int]]:
    """{name: (dtype, byte position in the file, element count)} of a safetensors file, from its header."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable shard ({e})") from None
    table = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise DataError(f"{path}: tensor {name} has dtype {info['dtype']}, not one a shard uses")
        begin, end = info["data_offsets"]
        table[name] = (np.dtype(dtype), 8 + size + begin, (end - begin) // np.dtype(dtype).itemsize)
    return table


class _Shard:
    """One shard file: its per-sample arrays read when opened, a sample's tokens read when asked for.

    Tokens are read with positioned reads (`os.pread`), not memory maps: every page of a map that a
    run touches stays in its RSS until the map goes, so a long run over a memory map shows the whole
    data set as resident; a read keeps only the sample being batched.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self.table = tensor_table(path)
        missing = [k for k in ("input_ids", "weights", "offsets", "lengths", "units", "sources") if k not in self.table]
        if missing:
            raise DataError(f"{path}: not a tunesmith shard (no {', '.join(missing)})")
        self.lengths = self._read("lengths")
        self.units = self._read("units")
        self.sources = self._read("sources")
        self.domains = self._read("domains") if "domains" in self.table else None
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        if self.offsets[-1] != self.table["input_ids"][2] or self.table["weights"][2] != self.offsets[-1]:
            raise DataError(f"{path}: the sample lengths add up to {self.offsets[-1]} tokens, but the file holds "
                            f"{self.table['input_ids'][2]} ids and {self.table['weights'][2]} weights")

    def _read(self, name: str, a: int = 0, b: int | None = None) -> np.ndarray:
        """Elements [a, b) of tensor `name`."""
        dtype, pos, count = self.table[name]
        b = count if b is None else b
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        data = os.pread(self._fd, (b - a) * dtype.itemsize, pos + a * dtype.itemsize)
        if len(data) != (b - a) * dtype.itemsize:
            raise DataError(f"{self.path}: the file is shorter than its header says (truncated?)")
        return np.frombuffer(data, dtype=dtype)

    def get(self, i: int) -> Sample:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        sample = {"input_ids": self._read("input_ids", a, b).tolist(),
                  "weights": self._read("weights", a, b).astype(np.float32).tolist()}
        if self.domains is not None:
            sample["domain"] = int(self.domains[i])
        return sample

    def __getstate__(self):  # a file descriptor does not cross processes: reopened on first read
        return {**self.__dict__, "_fd": None}

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


class ShardedSamples(Sequence):
    """The samples of a shard folder (or a subset of them, in a given order), read on demand.

    `lengths`, `unit_counts` (trained tokens) and `sources` (index into `manifest["sources"]`) are
    numpy arrays known without reading a sample; `subset(indices)` selects (and may repeat) samples.
    """

    def __init__(self, folder: Path, manifest: dict, shards: list[_Shard], index: np.ndarray | None = None):
        self.folder, self.manifest, self._shards = folder, manifest, shards
        counts = np.array([len(s.lengths) for s in shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        every = lambda attr: np.concatenate([getattr(s, attr) for s in shards])  # noqa: E731
        self._index = index
        pick = (lambda a: a) if index is None else (lambda a: a[index])
        self.lengths = pick(every("lengths")).astype(np.int64)
        self.unit_counts = pick(every("units")).astype(np.int64)
        self.sources = pick(every("sources")).astype(np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def _locate(self, i: int) -> tuple[_Shard, int]:
        if self._index is not None:
            i = int(self._index[i])
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._shards[k], i - int(self._starts[k])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.subset(np.arange(len(self))[i])
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} of {n}")
        shard, j = self._locate(i % n)
        return shard.get(j)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def subset(self, indices) -> "ShardedSamples":
        """These samples at `indices` (positions in this sequence; repeats allowed), in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"subset index out of range for {len(self)} samples")
        base = indices if self._index is None else self._index[indices]
        return ShardedSamples(self.folder, self.manifest, self._shards, base)

    def __repr__(self) -> str:
        return f"ShardedSamples({self.folder}, {len(self):,} samples, {int(self.lengths.sum()):,} tokens)"


def open_shards(path, tokenizer=None) -> ShardedSamples:
    """A shard folder as a lazy sequence of samples. With `tokenizer`, a folder written for another
    tokenizer (by vocabulary hash, else size) is refused: its ids would mean other tokens."""
    folder = Path(path)
    manifest = read_manifest(folder)
    if tokenizer is not None:
        check_tokenizer(folder, manifest.get("meta", {}), tokenizer)
    shards = []
    for entry in manifest["shards"]:
        p = folder / entry["file"]
        if not p.is_file():
            raise DataError(f"{folder}: shard {entry['file']} listed in the manifest is missing")
        shards.append(_Shard(p))
        if len(shards[-1].lengths) != entry.get("samples"):
            raise DataError(f"{p}: holds {len(shards[-1].lengths)} samples, the manifest says {entry['samples']}")
    return ShardedSamples(folder, manifest, shards)


def check_tokenizer(folder, meta: dict, tokenizer) -> None:
    """Raise if the shards' tokenizer (manifest `meta`) is not `tokenizer`."""
    mine = tokenizer_meta(tokenizer)
    if "tokenizer_hash" in meta:
        same = meta["tokenizer_hash"] == mine["tokenizer_hash"]
    elif "vocab_size" in meta:
        same = int(meta["vocab_size"]) == mine["vocab_size"]
    else:
        raise DataError(f"{folder}: the manifest does not say which tokenizer made the shards (meta.tokenizer_hash)")
    if not same:
        raise DataError(f"{folder}: the shards were tokenized with {meta.get('tokenizer') or 'another tokenizer'} "
                        f"(vocabulary {meta.get('vocab_size')}), not the model's {mine['tokenizer']} "
                        f"(vocabulary {mine['vocab_size']}); prepare the data again for this model")


def shard_stats(samples: ShardedSamples, **counts) -> dict:
    """`split_stats`'s keys computed from the length arrays alone (no sample is read)."""
    return length_stats(samples.lengths, int(samples.unit_counts.sum()), **counts)


def length_stats(lengths, trained_tokens: int, **counts) -> dict:
    """A split's statistics from its samples' lengths in tokens: counts (and any other facts given),
    tokens, trained tokens and length percentiles by nearest rank (`split_stats`, `shard_stats`)."""
    lengths = np.sort(np.asarray(lengths, dtype=np.int64))

    def pct(q: float) -> int:
        return int(lengths[max(0, int(np.ceil(q * len(lengths))) - 1)])

    return {**counts, "samples": len(lengths), "tokens": int(lengths.sum()), "trained_tokens": int(trained_tokens),
            "length_p50": pct(0.50), "length_p90": pct(0.90), "length_p99": pct(0.99), "length_max": int(lengths[-1])}
