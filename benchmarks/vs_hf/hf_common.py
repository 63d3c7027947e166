"""What the HF-side runs of benchmarks/vs_hf share (hf_train.py, trl_train.py), so that the plain
Trainer and TRL's SFTTrainer are read the same way: the same data reader, the same count of trained
tokens, the same step clock and the same memory reading. No tunesmith import.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def read_vm(field: str) -> float:
    """A `/proc/self/status` figure (VmHWM, VmRSS) in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def allocator_in_use() -> str:
    try:
        return "jemalloc" if "jemalloc" in Path("/proc/self/maps").read_text() else "system"
    except OSError:
        return "system"


def load_samples(path: str, tokenizer, max_length: int) -> list[dict]:
    """One sample per JSONL record. Pre-tokenized records (`input_ids`, `labels`, -100 where the loss
    does not train; run.py writes them with tunesmith's own renderer so every side trains the same
    tokens) are taken as they are; `{"text": ...}` records are tokenized as tunesmith renders plain
    text (the tokenizer's ids, an eos appended, cut to max_length; every token after the first trains)."""
    eos = tokenizer.eos_token_id
    out = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "input_ids" in record:
            ids = record["input_ids"][:max_length]
            labels = record.get("labels", ids)[:max_length]
        else:
            ids = tokenizer(record["text"])["input_ids"]
            if eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]
            ids = ids[:max_length]
            labels = list(ids)
        out.append({"input_ids": list(ids), "labels": [-100] + list(labels[1:])})
    return out


class CountingCollator:
    """Wraps a collator; records the trained label positions of every batch, in order."""

    def __init__(self, inner):
        self.inner, self.trained, self.positions = inner, [], []

    def __call__(self, features):
        batch = self.inner(features)
        labels = batch["labels"]
        self.trained.append(int((labels[..., 1:] != -100).sum()))
        self.positions.append(int(labels.numel()))  # input positions computed, padding included
        return batch


def step_clock():
    """A `TrainerCallback` that takes `time.perf_counter()` at `on_step_begin` and `on_step_end`
    (forward, backward, clipping, optimizer step, zero_grad; batch collation is outside)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.begin, self.end = [], []

        def on_step_begin(self, args_, state, control, **kw):
            self.begin.append(time.perf_counter())

        def on_step_end(self, args_, state, control, **kw):
            self.end.append(time.perf_counter())

    return StepClock()


def step_figures(clock, collator: CountingCollator, warmup: int, steps: int) -> dict:
    """Throughput over the timed steps (after `warmup`), from the clock and the collated batches."""
    total = warmup + steps
    step_s = [e - b for b, e in zip(clock.begin, clock.end)]
    if len(step_s) != total or len(collator.trained) < total:
        raise SystemExit(f"expected {total} steps, timed {len(step_s)}, collated {len(collator.trained)} batches")
    elapsed = sum(step_s[warmup:total])
    trained = sum(collator.trained[warmup:total])
    positions = sum(collator.positions[warmup:total])
    return {"steps": steps, "warmup": warmup, "s_per_step": elapsed / steps, "trained_tokens_per_s": trained / elapsed,
            "positions_per_s": positions / elapsed, "trained_tokens_per_step": trained / steps,
            "positions_per_step": positions / steps, "step_s": step_s, "trained_per_batch": collator.trained[:total],
            "peak_rss_gb_inside": read_vm("VmHWM"), "allocator": allocator_in_use()}
