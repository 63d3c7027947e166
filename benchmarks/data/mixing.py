"""Mixing by tokens: how close each source's share of a mixed epoch comes to its weight.

    python benchmarks/data/mixing.py            # writes benchmarks/data/mixing.md

Part 1 mixes three synthetic sources as unlike as mixing meets (40k short samples, 1.5k long ones,
10k of a wide log-normal spread) with `mix_by_tokens` under several weights and epoch sizes, and
prints, per source, its weight, its share of the epoch's tokens, its share of the samples (what a
mix by sample counts would have matched instead) and how many times its tokens were taken.
Part 2 runs the recipe path, `data.mix` through `load_data`, over two built-in tasks rendered with
the embedded SmolLM2 tokenizer (task:sql/train and task:json/train), so the lengths are real ones.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from tunesmith.data.mix import mix_by_tokens, mix_rows

OUT = Path(__file__).with_name("mixing.md")


def synthetic(seed: int = 0) -> tuple[list[str], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    names = ["short (40k × 20–80)", "long (1.5k × 400–2000)", "spread (10k, log-normal)"]
    return names, [rng.integers(20, 80, 40_000), rng.integers(400, 2000, 1_500),
                   rng.lognormal(5, 1, 10_000).astype(np.int64) + 1]


def table(rows: list[dict]) -> list[str]:
    n = sum(r["samples"] for r in rows)
    out = ["| source | weight | share of tokens | share of samples | share − weight | samples | tokens | repeats |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['source']} | {r['weight']:.3f} | {r['share']:.4f} | {r['samples'] / n:.4f} | "
                   f"{r['share'] - r['weight']:+.4f} | {r['samples']:,} | {r['tokens']:,} | ×{r['repeats']:.2f} |")
    return out


def part1(seed: int) -> tuple[list[str], float]:
    names, lengths = synthetic(seed)
    total = sum(int(x.sum()) for x in lengths)
    lines, worst = [], 0.0
    cases = [([0.5, 0.3, 0.2], None), ([0.1, 0.6, 0.3], None), ([1, 1, 1], 5_000_000), ([0.7, 0.2, 0.1], 200_000)]
    for weights, tokens in cases:
        t = time.perf_counter()
        chosen = mix_by_tokens(lengths, weights, seed=seed, total_tokens=tokens)
        ms = 1000 * (time.perf_counter() - t)
        rows = mix_rows(names, lengths, chosen, weights)
        worst = max(worst, max(abs(r["share"] - r["weight"]) for r in rows))
        lines += [f"**weights {weights}, epoch {tokens or total:,} tokens** "
                  f"({'all sources' if tokens is None else 'data.mix_tokens'}; chosen in {ms:.1f} ms)", ""]
        lines += table(rows) + [""]
    return lines, worst


def part3(seed: int) -> list[str]:
    """The selection at the size of a prepared corpus: 3M samples over three sources."""
    rng = np.random.default_rng(seed)
    lengths = [rng.integers(20, 300, 2_000_000), rng.integers(100, 2000, 500_000), rng.integers(50, 500, 500_000)]
    weights = [0.4, 0.4, 0.2]
    t = time.perf_counter()
    chosen = mix_by_tokens(lengths, weights, seed=seed)
    ms = 1000 * (time.perf_counter() - t)
    rows = mix_rows(["a (2M × 20–300)", "b (500k × 100–2000)", "c (500k × 50–500)"], lengths, chosen, weights)
    total = sum(int(x.sum()) for x in lengths)
    return [f"**3,000,000 samples, {total:,} tokens, weights {weights}: chosen in {ms:.0f} ms**", ""] + table(rows) + [""]


def part2(seed: int) -> list[str]:
    from tunesmith.data import load_data
    from tunesmith.models.load import load_tokenizer
    from tunesmith.recipe import load_recipe

    tok = load_tokenizer("smollm2-135m-instruct")
    lines = []
    for weights in ([0.7, 0.3], [0.2, 0.8]):
        mix = f"data.mix=[{{path: task:sql/train, weight: {weights[0]}}}, {{path: task:json/train, weight: {weights[1]}}}]"
        recipe = load_recipe(None, [mix])
        t = time.perf_counter()
        splits = load_data(recipe.data, tok, seed=seed, report=False)
        s = time.perf_counter() - t
        rows = splits.stats["train"]["mix"]
        lines += [f"**`{mix}`** ({splits.stats['train']['samples']:,} samples, "
                  f"{splits.stats['train']['tokens']:,} tokens; loaded, rendered and mixed in {s:.1f} s)", ""]
        lines += table(rows) + [""]
    return lines


def cpu() -> str:
    """The CPU model and core count (what the machine line of a results file says)."""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    p1, worst = part1(args.seed)
    p2 = part2(args.seed)
    p3 = part3(args.seed)
    head = [
        "# Mixing by tokens (`data.mix`): shares against weights", "",
        "    python benchmarks/data/mixing.py", "",
        f"Machine: {cpu()}, Python {platform.python_version()}, "
        f"numpy {np.__version__}; seed {args.seed}. All numbers from one run of the command above.", "",
        "`share of tokens` is what `data.mix` controls (each source gets weight × the epoch's tokens); `share of "
        "samples` is what the same mix would look like counted in samples, which is what a mixer by sample "
        "counts would have matched instead. `repeats` < 1: subsampled; > 1: repeated, a fresh shuffle per pass.", "",
        f"**Largest |share − weight| over every source of part 1: {worst:.5f}** (the goal: within 0.01).", "",
        "## 1. Synthetic sources, `mix_by_tokens` on length arrays", "",
    ]
    text = "\n".join(head + p1 + ["## 2. The recipe path: `data.mix` over two built-in tasks, SmolLM2 tokenizer", ""] + p2
                     + ["## 3. At scale", ""] + p3)
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
