"""Mixing sources by tokens: `data.mix: [{path: a.jsonl, weight: 0.7}, {path: b.jsonl, weight: 0.3}]`.

An epoch of T tokens (all sources' tokens, or `data.mix_tokens`) gets weight_s / Σweight · T tokens
from source s. A source with fewer tokens than that is repeated (every full pass a fresh shuffle of
all its samples, the last partial pass a prefix of another shuffle); a bigger one is subsampled (a
prefix of one shuffle). Shares are counted in tokens, not samples: a source of long samples would
otherwise take more of the gradient than its weight says. The choice depends only on the lengths,
the weights and the seed, so a mixed run resumes exactly like any other.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np

from ..config import DataConfig
from .errors import DataError
from .load import DataSplits, load_data
from .shards import shard_stats

_MIX_TAG = 0x6D6978  # keeps this seed stream apart from others drawn from the same recipe seed


def mix_by_tokens(lengths: list[np.ndarray], weights, seed: int, total_tokens: int | None = None) -> list[np.ndarray]:
    """The samples each source contributes to one mixed epoch.

    Args:
        lengths: per source, the token length of each of its samples.
        weights: per source, a positive weight (normalised here).
        seed: the choice is a pure function of (lengths, weights, seed, total_tokens).
        total_tokens: the epoch's tokens; default: all sources' tokens together.

    Returns:
        Per source, the chosen sample indices (int64; an index appears more than once when the
        source repeats). Each source's tokens land within half a sample of its target.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if len(weights) != len(lengths) or not len(lengths):
        raise DataError(f"data.mix: {len(lengths)} sources but {len(weights)} weights")
    if (weights <= 0).any() or not np.isfinite(weights).all():
        raise DataError(f"data.mix: weights must be positive, got {weights.tolist()}")
    lengths = [np.asarray(x, dtype=np.int64) for x in lengths]
    sizes = np.array([int(x.sum()) for x in lengths], dtype=np.int64)
    empty = [k for k, size in enumerate(sizes) if size <= 0]
    if empty:
        raise DataError(f"data.mix: source {empty[0]} has no tokens")
    total = int(sizes.sum()) if total_tokens is None else int(total_tokens)
    if total <= 0:
        raise DataError(f"data.mix_tokens must be positive, got {total_tokens}")
    targets = weights / weights.sum() * total
    return [_choose(x, target, seed, k) for k, (x, target) in enumerate(zip(lengths, targets))]


def _choose(lengths: np.ndarray, target: float, seed: int, source: int) -> np.ndarray:
    """Whole shuffled passes while a pass still fits in `target` tokens, then the prefix of one more
    shuffle whose tokens come closest to what is left."""
    size, passes, left = int(lengths.sum()), [], float(target)
    r = 0
    while left >= size:
        passes.append(_shuffle(len(lengths), seed, source, r))
        left -= size
        r += 1
    order = _shuffle(len(lengths), seed, source, r)
    cum = np.cumsum(lengths[order])
    k = int(np.searchsorted(cum, left))  # cum[k-1] < left <= cum[k]
    if k < len(cum) and cum[k] - left < left - (cum[k - 1] if k else 0):
        k += 1  # one more sample lands closer to the target than stopping short
    passes.append(order[:k])
    return np.concatenate(passes).astype(np.int64)


def _shuffle(n: int, seed: int, source: int, rep: int) -> np.ndarray:
    return np.random.default_rng([_MIX_TAG, seed % 2**63, source, rep]).permutation(n)


def mix_rows(names: list[str], lengths: list[np.ndarray], chosen: list[np.ndarray], weights) -> list[dict]:
    """Per source: what the mix took (samples, tokens, share of the epoch's tokens) against its
    weight, and `repeats`: how many times its tokens were taken (0.4: subsampled, 2.5: repeated)."""
    weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    taken = [int(np.asarray(x, dtype=np.int64)[c].sum()) for x, c in zip(lengths, chosen)]
    total = max(1, sum(taken))
    return [{"source": name, "weight": round(float(w), 6), "samples": int(len(c)), "tokens": t,
             "share": round(t / total, 6), "repeats": round(t / max(1, int(np.sum(x))), 4),
             "source_samples": int(len(x)), "source_tokens": int(np.sum(x))}
            for name, w, x, c, t in zip(names, weights, lengths, chosen, taken)]


def mix_table(rows: list[dict]) -> list[str]:
    """The mix report as aligned lines (the data report and the start of a run print it)."""
    width = max(len(r["source"]) for r in rows)
    return [f"mix {r['source']:<{width}}  weight {r['weight']:.3f}  share {r['share']:.3f}  "
            f"{r['samples']:>9,} samples  {r['tokens']:>12,} tokens  ×{r['repeats']:.2f} of its "
            f"{r['source_tokens']:,} tokens" for r in rows]


class MixedSamples(Sequence):
    """Samples chosen from several sources (each a list or a lazy shard sequence), in mix order,
    with the `lengths`/`unit_counts`/`sources` arrays lazy data exposes (so nothing is read to plan)."""

    def __init__(self, parts: list[tuple[Sequence, np.ndarray]]):
        self._parts = parts
        self._starts = np.concatenate([[0], np.cumsum([len(c) for _, c in parts])]).astype(np.int64)
        self.lengths = np.concatenate([_array(items, "lengths")[c] for items, c in parts])
        self.unit_counts = np.concatenate([_array(items, "unit_counts")[c] for items, c in parts])
        self.sources = np.concatenate([np.full(len(c), k, dtype=np.int64) for k, (_, c) in enumerate(parts)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} of {n}")
        i %= n
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        items, chosen = self._parts[k]
        return items[int(chosen[i - self._starts[k]])]


def _array(items, name: str) -> np.ndarray:
    """A per-sample array of lazy items, or the same computed from in-memory samples."""
    if hasattr(items, name):
        return np.asarray(getattr(items, name), dtype=np.int64)
    if name == "lengths":
        return np.array([len(s["input_ids"]) for s in items], dtype=np.int64)
    return np.array([sum(1 for w in s["weights"] if w > 0) for s in items], dtype=np.int64)


def load_mix(cfg: DataConfig, tokenizer, seed: int = 0, report: bool = True) -> DataSplits:
    """`load_data` for `data.mix`: each source is loaded as `data.train` would be (its own format,
    `limit` and `val_fraction` hold-out), then the training samples are mixed by tokens. Validation
    is `data.validation` if set, else the sources' held-out samples, unmixed."""
    names = [m.path for m in cfg.mix]
    per_source = [load_data(cfg.model_copy(update={"train": m.path, "mix": [], "mix_tokens": None, "validation": None}),
                            tokenizer, seed, report) for m in cfg.mix]
    domains = {tuple(s.domains) for s in per_source}
    if len(domains) > 1:
        raise DataError(f"data.mix: the sources name different domains ({' vs '.join(map(str, sorted(domains)))})")
    lengths = [_array(s.train, "lengths") for s in per_source]
    chosen = mix_by_tokens(lengths, [m.weight for m in cfg.mix], seed, cfg.mix_tokens)
    rows = mix_rows(names, lengths, chosen, [m.weight for m in cfg.mix])
    train = _combine([(s.train, c) for s, c in zip(per_source, chosen)])
    val = _validation(cfg, tokenizer, seed, per_source)
    stats = {"train": {**_stats(train), "mix": rows}}
    if val is not None:
        stats["val"] = _stats(val)
    if report and int(os.environ.get("RANK", "0")) == 0:
        for line in mix_table(rows):
            print(f"[tunesmith] {line}", file=sys.stderr, flush=True)
    formats = sorted({s.format for s in per_source})
    return DataSplits(train=train, val=val, stats=stats, format="+".join(formats), domains=list(per_source[0].domains))


def _combine(parts: list[tuple[Sequence, np.ndarray]]):
    """A plain list when every source is in memory (what the rest of the toolkit already takes),
    else a lazy `MixedSamples`."""
    if all(isinstance(items, list) for items, _ in parts):
        return [items[int(i)] for items, chosen in parts for i in chosen]
    return MixedSamples(parts)


def _validation(cfg: DataConfig, tokenizer, seed: int, per_source: list[DataSplits]):
    if cfg.validation:
        one = cfg.model_copy(update={"train": cfg.validation, "mix": [], "mix_tokens": None, "validation": None,
                                     "val_fraction": 0.0, "limit": None})
        return load_data(one, tokenizer, seed, report=False).train
    held = [s.val for s in per_source if s.val is not None]
    if not held:
        return None
    return _combine([(v, np.arange(len(v))) for v in held])


def _stats(samples) -> dict:
    """The split statistics of mixed samples, from their lengths (all `shard_stats` reads)."""
    arrays = SimpleNamespace(lengths=_array(samples, "lengths"), unit_counts=_array(samples, "unit_counts"))
    return shard_stats(arrays, records=len(samples))
