"""Long-context evaluation runs: a length x depth grid of retrieval accuracy, and loss by position.

    grid = run_grid(model, tokenizer, "passkey", [1024, 2048, 4096], [0, 0.25, 0.5, 0.75, 1], samples=2)
    print(format_grid(grid))          # rows: lengths, columns: depths, cells: percent correct
    save_grid(grid, "eval-passkey/")  # grid.json, grid.md, heatmap.png
    rows = position_perplexity(model, tokenizer, texts, length=16384, bucket=1024)

Built for long prompts on small machines: one prompt at a time (no padding), one prefill each, a
greedy answer of a few tokens that stops at end of turn or at a newline, under inference mode. Each
answer is handed to `on_record` as it comes (the command line appends it to records.jsonl), and
records passed back in as `done` are not asked again, so an interrupted grid resumes.
`position_perplexity` runs one forward per text and the lm_head plus cross-entropy on `chunk`
positions at a time, so a 16k x vocab logits tensor never exists.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .long_context import NEW_TOKENS, build_prompt, format_length, score
from .runner import EvalError


@dataclass
class Grid:
    """Per-prompt records of a grid run; the accuracies are computed from them."""

    task: str
    lengths: list[int]
    depths: list[float]
    samples: int
    records: list[dict] = field(default_factory=list)

    def cell(self, length: int, depth: float) -> float | None:
        """Share of correct answers at (length, depth); None when no prompt there has run."""
        hits = [r["correct"] for r in self.records if r["length"] == length and r["depth"] == depth]
        return sum(hits) / len(hits) if hits else None

    def by_length(self, length: int) -> float | None:
        """Share of correct answers over every depth at `length`."""
        hits = [r["correct"] for r in self.records if r["length"] == length]
        return sum(hits) / len(hits) if hits else None

    @property
    def accuracy(self) -> float | None:
        return sum(r["correct"] for r in self.records) / len(self.records) if self.records else None

    def to_json(self, **context) -> dict:
        return {"task": self.task, "lengths": self.lengths, "depths": self.depths, "samples": self.samples,
                "accuracy": self.accuracy, **context,
                "cells": [[self.cell(n, d) for d in self.depths] for n in self.lengths],
                "by_length": {str(n): self.by_length(n) for n in self.lengths}}


def _record_key(r: dict) -> tuple:
    return r["length"], r["depth"], r["sample"]


def run_grid(model, tokenizer, task: str, lengths: list[int], depths: list[float], samples: int = 1,
             seed: int = 0, progress: bool = True, *, max_new_tokens: int | None = None, needles: int = 4,
             done: list[dict] = (), on_record=None) -> Grid:
    """Ask `samples` prompts of `task` at every (length, depth) and score the greedy answers.

    Sample i of a cell uses seed `seed + i`, so a grid with more samples extends a smaller one.
    `done`: records of an earlier run of the same grid, kept and not asked again; `on_record(r)` is
    called with each new record. `needles`: the needle task's needle count."""
    from tqdm.auto import tqdm

    if samples < 1:
        raise EvalError(f"--samples must be >= 1 prompt per cell, got {samples}")
    wanted = [(n, d, i) for n in lengths for d in depths for i in range(samples)]
    earlier = {_record_key(r): r for r in done if _record_key(r) in set(wanted)}
    grid = Grid(task, list(lengths), list(depths), samples, list(earlier.values()))
    new_tokens = NEW_TOKENS[task] if max_new_tokens is None else max_new_tokens
    stops = _stop_tokens(model, tokenizer)
    todo = [key for key in wanted if key not in earlier]
    bar = tqdm(todo, desc=task, unit="prompt", disable=not progress)
    for length, depth, i in bar:
        prompt = build_prompt(task, tokenizer, length, depth, seed + i, new_tokens, needles)
        t0 = time.perf_counter()
        answer = greedy_answer(model, tokenizer, prompt.ids, stops, new_tokens)
        record = {"task": task, "length": length, "depth": depth, "sample": i, "seed": seed + i,
                  "tokens": len(prompt.ids), "expected": prompt.expected, "answer": answer,
                  "correct": score(task, answer, prompt.expected), "seconds": round(time.perf_counter() - t0, 3)}
        grid.records.append(record)
        bar.set_postfix(length=format_length(length), acc=f"{grid.accuracy:.0%}")
        if on_record is not None:
            on_record(record)
    return grid


def _stop_tokens(model, tokenizer) -> list[int]:
    """End of reply (eos, end of turn) and every token holding a newline: the fact is on the first line."""
    from ..infer.generate import stop_ids

    # A newline is "\n" in the vocabulary, "Ċ" in byte-level BPE, "<0x0A>" as a SentencePiece byte;
    # only those candidates are decoded (decoding the whole vocabulary takes seconds).
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    candidates = [i for i, p in enumerate(pieces) if p and ("\n" in p or "Ċ" in p or "<0x0A>" in p)]
    lines = [i for i in candidates if "\n" in tokenizer.decode([i])]
    return sorted(set(stop_ids(model, tokenizer)) | set(lines))


def greedy_answer(model, tokenizer, ids: list[int], stops: list[int], max_new_tokens: int) -> str:
    """The greedy continuation of one prompt (batch 1: no padding), cut at the first stop token."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=stops[0],
                                 do_sample=False, temperature=None, top_p=None, top_k=None, use_cache=True)
    finally:
        model.train(was_training)
    new = out[0, len(ids):].tolist()
    stop_set = set(stops)
    end = next((j for j, t in enumerate(new) if t in stop_set), len(new))
    return tokenizer.decode(new[:end], skip_special_tokens=True)


def format_grid(grid: Grid, markdown: bool = False) -> str:
    """Percent correct: a row per length, a column per depth, and the length's mean; "-" not yet run."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}"

    head = ["length"] + [f"{100 * d:g}%" for d in grid.depths] + ["mean"]
    rows = [[format_length(n)] + [pct(grid.cell(n, d)) for d in grid.depths] + [pct(grid.by_length(n))]
            for n in grid.lengths]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[j]) for r in [head, *rows]) for j in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head, *rows])


def plot_heatmap(grid: Grid, path: str | Path, title: str | None = None) -> Path:
    """The grid as a heat map (red 0% to green 100%), each cell annotated with its percent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [[math.nan if (c := grid.cell(n, d)) is None else 100 * c for d in grid.depths] for n in grid.lengths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(grid.depths), 1.2 + 0.5 * len(grid.lengths)), dpi=110)
    image = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for r, row in enumerate(values):
        for c, v in enumerate(row):
            ax.text(c, r, "-" if math.isnan(v) else f"{v:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(grid.depths)), [f"{100 * d:g}%" for d in grid.depths])
    ax.set_yticks(range(len(grid.lengths)), [format_length(n) for n in grid.lengths])
    ax.set_xlabel("depth of the fact")
    ax.set_ylabel("prompt length (tokens)")
    ax.set_title(title or f"{grid.task}: % correct", fontsize=9)
    fig.colorbar(image, ax=ax, label="% correct")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def save_grid(grid: Grid, folder: str | Path, **context) -> Path:
    """grid.json (cells, per-length means, `context` such as the model), grid.md, heatmap.png in `folder`."""
    from ..jsonl import write_json

    folder = Path(folder)
    write_json(folder / "grid.json", grid.to_json(**context))
    (folder / "grid.md").write_text(f"# {grid.task}: % correct by prompt length and depth "
                                    f"({grid.samples} prompts a cell)\n\n{format_grid(grid, markdown=True)}\n")
    plot_heatmap(grid, folder / "heatmap.png")
    return folder


@torch.inference_mode()
def position_perplexity(model, tokenizer, texts, length: int, bucket: int = 1024, chunk: int = 1024) -> list[dict]:
    """Mean next-token loss by position bucket over `texts`, each cut to its first `length` tokens.

    The loss at position p is -log P(token p | tokens before p); bucket b holds positions
    [b * bucket, (b + 1) * bucket). Returns one row per bucket: start, end, tokens, loss, perplexity
    (a text shorter than `length` adds to the early buckets only; `tokens` says how many each has)."""
    if length < 2 or bucket < 1:
        raise EvalError(f"position perplexity needs length >= 2 and bucket >= 1 tokens, got {length} and {bucket}")
    n_buckets = math.ceil(length / bucket)
    sums = torch.zeros(n_buckets, dtype=torch.float64)
    counts = torch.zeros(n_buckets, dtype=torch.float64)
    body, head = getattr(model, model.base_model_prefix), model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for text in texts:
        ids = torch.tensor(tokenizer(text)["input_ids"][:length], device=device)
        if len(ids) < 2:
            continue
        hidden = body(input_ids=ids[None], use_cache=False).last_hidden_state[0, :-1]  # (T-1, d)
        for i in range(0, len(ids) - 1, chunk):
            logits = head(hidden[i:i + chunk]).float()  # (chunk, vocab)
            if cap:  # Gemma-2's soft cap, as the model's own forward applies it
                logits = cap * torch.tanh(logits / cap)
            nll = F.cross_entropy(logits, ids[i + 1:i + 1 + chunk], reduction="none").double().cpu()
            where = torch.arange(i + 1, i + 1 + len(nll)) // bucket
            sums.index_add_(0, where, nll)
            counts.index_add_(0, where, torch.ones_like(nll))
    model.train(was_training)
    if not counts.any():
        raise EvalError("position perplexity: no text has two tokens or more")
    rows = []
    for b in range(n_buckets):
        loss = float(sums[b] / counts[b]) if counts[b] else None
        rows.append({"start": b * bucket, "end": min((b + 1) * bucket, length), "tokens": int(counts[b]),
                     "loss": loss, "perplexity": None if loss is None else math.exp(min(loss, 50))})
    return rows


def format_positions(rows: list[dict]) -> str:
    """The position-bucket table in markdown: positions, tokens scored, loss, perplexity."""
    lines = ["| positions | tokens | loss | perplexity |", "|---|---:|---:|---:|"]
    for r in rows:
        span = f"{format_length(r['start'])}-{format_length(r['end'])}"
        loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
        ppl = "-" if r["perplexity"] is None else f"{r['perplexity']:.2f}"
        lines.append(f"| {span} | {r['tokens']} | {loss} | {ppl} |")
    return "\n".join(lines)
