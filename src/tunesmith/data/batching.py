"""Plan micro-batches (which samples go together) and collate them into tensors.

Packed: one row per micro-batch, samples concatenated with position ids restarting at 0 and segment
ids 1, 2, 3... so the model side can build a block-causal mask (position ids alone do not isolate
samples in transformers; see ARCHITECTURE.md). Padded: `batch_size` samples per micro-batch, right
padding, segment id 0 on padding.
"""
from __future__ import annotations

import random
from bisect import bisect_left, insort

import torch

from .render import Sample

# Padded batches sort by length inside windows of this many batches: less padding, still random.
SORT_WINDOW_BATCHES = 32


def plan_batches(
    lengths: list[int],
    *,
    packing: bool,
    batch_tokens: int,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
) -> list[list[int]]:
    """Group sample indices into micro-batches; every index appears exactly once.

    Args:
        lengths: token count of each sample.
        packing: one row of at most `batch_tokens` tokens per micro-batch (a sample longer than that
            gets a row of its own); else `batch_size` samples per micro-batch (`batch_tokens` unused).
        seed, epoch: the plan is a pure function of these (and the lengths); each epoch differs.
        shuffle: shuffle samples and batches; off, samples keep their order (evaluation).

    Returns:
        One list of sample indices per micro-batch.
    """
    rng = random.Random(f"tunesmith-batches:{seed}:{epoch}")  # str seeds are stable across runs
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if packing:
        batches = _pack(order, lengths, batch_tokens)
    else:
        batches = _pad_groups(order, lengths, batch_size, sort=shuffle)
    if shuffle:
        rng.shuffle(batches)  # late rows/groups are not systematically different from early ones
    return batches


def _pack(order: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """Best-fit packing in the given order: each sample goes into the open row it fills most tightly.

    Open rows are kept sorted by free space, so placing a sample is a binary search rather than a scan.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row number), sorted
    for i in order:
        n = lengths[i]
        k = bisect_left(free, (n, -1))  # the open row with the least free space that still fits
        if k < len(free):
            space, r = free.pop(k)
        else:
            space, r = budget, len(rows)
            rows.append([])
        rows[r].append(i)
        # A full row closes. So does the row of a sample longer than the budget (possible only if
        # max_length > batch_tokens): it gets that row to itself.
        if space - n > 0:
            insort(free, (space - n, r))
    return rows


def _pad_groups(order: list[int], lengths: list[int], batch_size: int, sort: bool) -> list[list[int]]:
    """Consecutive groups of `batch_size`; with `sort`, samples of similar length share a group."""
    if sort:
        window = batch_size * SORT_WINDOW_BATCHES
        order = [i for w in range(0, len(order), window)
                 for i in sorted(order[w:w + window], key=lambda i: lengths[i])]
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def collate(samples: list[Sample], *, packing: bool, pad_id: int) -> dict[str, torch.Tensor]:
    """Stack samples into tensors.

    Returns input_ids [B, T] int64, weights [B, T] float32 (0 on padding), position_ids [B, T] int64
    (restarting at 0 for every sample) and segment_ids [B, T] int64 (1, 2, ... per sample in a row,
    0 on padding). Packed gives B = 1; padded gives B = len(samples), right-padded to the longest.
    Samples with a `domain` also give route_ids [B, T] int64: each token's sample's domain (-1 on
    padding), the per-token expert of a domain-routed MoE (`models.moe.routing`).
    """
    rows = [samples] if packing else [[s] for s in samples]
    width = max(sum(len(s["input_ids"]) for s in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    weights = torch.zeros(shape, dtype=torch.float32)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    route_ids = torch.full(shape, -1, dtype=torch.long) if any("domain" in s for s in samples) else None
    for b, row in enumerate(rows):
        t = 0
        for seg, s in enumerate(row, start=1):
            n = len(s["input_ids"])
            input_ids[b, t:t + n] = torch.tensor(s["input_ids"], dtype=torch.long)
            weights[b, t:t + n] = torch.tensor(s["weights"], dtype=torch.float32)
            position_ids[b, t:t + n] = torch.arange(n)
            segment_ids[b, t:t + n] = seg
            if route_ids is not None:
                route_ids[b, t:t + n] = s.get("domain", -1)
            t += n
    batch = {"input_ids": input_ids, "weights": weights, "position_ids": position_ids, "segment_ids": segment_ids}
    return batch if route_ids is None else {**batch, "route_ids": route_ids}


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device`; other values (e.g. an objective's per-step state) as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
