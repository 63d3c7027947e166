"""The two stateful steps: exact dedup (a compact set of 64-bit text hashes) and near-dedup (MinHash
signatures and datasketch's MinHashLSH index).

Both keep state for every record they let through, so their memory grows with the kept records, not
with what streams past: 16 bytes a record for exact dedup (an open-addressing table at most half full),
and datasketch's in-memory index for near-dedup (a few KB a record: benchmarks/data/prepare.md).
"""
from __future__ import annotations

import hashlib
import math
import re

import numpy as np

from .config import NearDedupConfig

_WORD = re.compile(r"\w+")


class ExactDedup:
    """A set of non-zero 64-bit keys in one numpy array (linear probing, doubled when half full): 16
    bytes a kept record, where a Python set of ints takes about 60."""

    def __init__(self, capacity: int = 1 << 16):
        self.table = np.zeros(capacity, dtype=np.uint64)
        self.size = 0

    def add(self, key: int) -> bool:
        """Insert `key` (non-zero); False if it was already there (a duplicate)."""
        table, mask = self.table, len(self.table) - 1
        slot = key & mask
        while True:
            held = int(table[slot])
            if held == 0:
                break
            if held == key:
                return False
            slot = (slot + 1) & mask
        table[slot] = key
        self.size += 1
        if self.size * 2 > len(table):
            self._grow()
        return True

    def _grow(self) -> None:
        old = self.table[self.table != 0]
        self.table, self.size = np.zeros(len(self.table) * 2, dtype=np.uint64), 0
        for key in old.tolist():
            self.add(key)

    @property
    def nbytes(self) -> int:
        return self.table.nbytes


def shingles(text: str, n: int) -> list[bytes]:
    """The distinct word n-grams of the lower-cased text (a text of fewer words is one shingle)."""
    words = _WORD.findall(text.lower())
    if len(words) <= n:
        return [" ".join(words).encode()] if words else []
    return list({" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)})


class Signer:
    """MinHash signatures (datasketch, the same permutations for every record and process)."""

    def __init__(self, cfg: NearDedupConfig):
        from datasketch import MinHash

        self.cfg = cfg
        self.template = MinHash(num_perm=cfg.num_perm, seed=1)

    def __call__(self, text: str) -> np.ndarray | None:
        """The record's signature (num_perm uint64), or None for a text without words."""
        grams = shingles(text, self.cfg.shingle)
        if not grams:
            return None
        m = self.template.copy()
        m.update_batch(grams)
        return m.hashvalues


def lsh_bands(threshold: float, num_perm: int, recall: float = 0.98) -> tuple[int, int]:
    """(bands, rows) for the LSH index: the fewest bands (each costs memory) whose chance of making a
    pair at exactly `threshold` a candidate, 1 - (1 - t^rows)^bands, is at least `recall`.

    datasketch's own choice balances false positives against false negatives and leaves a pair at the
    threshold only a ~40% chance (0.8, 128 permutations: 9 bands of 13); candidates are verified
    afterwards, so missing them is the costlier mistake."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


def _band_key(band: bytes) -> bytes:
    """A band's 8-byte key in the index (its raw form is 8 bytes a row): less memory, same buckets
    but for a 2^-64 chance of a collision, which verification then rejects."""
    return hashlib.blake2b(band, digest_size=8).digest()


class NearDedup:
    """Kept records in a MinHashLSH index; a record that collides with a kept one in some band and
    whose estimated Jaccard with it (the share of equal MinHash values) is not significantly below the
    threshold is a near-duplicate of it.

    "Not significantly below": the estimate of a pair at exactly the threshold t has standard error
    sqrt(t(1-t)/num_perm) (0.035 at 0.8 and 128 permutations), so requiring estimate >= t would miss
    half the pairs at t; estimate >= t - 2 standard errors misses about 2% of them and still rejects
    pairs well below t (benchmarks/data/prepare.md measures both). Kept signatures are held as uint32
    (datasketch's hash values are 32-bit) to verify candidates."""

    def __init__(self, cfg: NearDedupConfig):
        from datasketch import MinHash, MinHashLSH

        self.cfg = cfg
        self.bands = lsh_bands(cfg.threshold, cfg.num_perm)
        self.accept = cfg.threshold - 2 * math.sqrt(cfg.threshold * (1 - cfg.threshold) / cfg.num_perm)
        self.lsh = MinHashLSH(num_perm=cfg.num_perm, params=self.bands, hashfunc=_band_key)
        self.probe = MinHash(num_perm=cfg.num_perm, seed=1)
        self.kept = np.zeros((1024, cfg.num_perm), dtype=np.uint32)
        self.count = 0

    def check(self, signature: np.ndarray) -> tuple[int, float] | None:
        """(kept record number, estimated Jaccard) of the most similar near-duplicate, or None after
        indexing the record as kept (kept records are numbered 0, 1, ... in the order they came)."""
        self.probe.hashvalues = signature
        candidates = self.lsh.query(self.probe)
        if candidates:
            keys = np.fromiter(candidates, dtype=np.int64, count=len(candidates))
            similarity = (self.kept[keys] == signature.astype(np.uint32)).mean(axis=1)
            best = int(np.argmax(similarity))
            if similarity[best] >= self.accept:
                return int(keys[best]), float(similarity[best])
        if self.count == len(self.kept):
            self.kept = np.concatenate([self.kept, np.zeros_like(self.kept)])
        self.kept[self.count] = signature
        self.lsh.insert(self.count, self.probe, check_duplication=False)
        self.count += 1
        return None
