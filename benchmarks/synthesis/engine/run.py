"""Synthesis engine speed: samples/s and tokens/s of `synthesize` against the naive path.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/synthesis/engine/run.py            # 6 prompts, 2 rounds
    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/synthesis/engine/run.py --prompts 16   # more prompts, longer

The embedded SmolLM2-135M-Instruct (fp32, CPU) samples n=10 continuations of each of 6 SELF-GUIDE
style input-generation prompts (an instruction, gold demonstrations and earlier generations, a few
hundred tokens each), temperature 0.7, top_k 40, max_new_tokens 48, the same number of sequences
decoding together on both paths:

- engine: `tunesmith.synth.engine.synthesize` — each prompt prefilled once, its 10 samples decode
  from copies of its KV cache; finished samples leave the batch;
- naive: `tunesmith.infer.generate.generate` on every prompt repeated 10 times (transformers'
  `generate`, left-padded batches): every copy of a prompt is prefilled again.

The passes alternate engine/naive, naive/engine (ABBA) in one sitting, so drifting load on a
shared machine hits both alike; the ratio is of the medians. Tokens of the naive path are counted by
re-encoding its texts (plus one for the eos that ended a sample early): close, not exact.
Writes results.json and results.md next to this file.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMMAND = "OMP_NUM_THREADS=1 nice -n 5 python benchmarks/synthesis/engine/run.py"
SETTINGS = dict(temperature=0.7, top_k=40, max_new_tokens=48)
N = 10

INSTRUCTION = ("You are given a short customer review of a product. Decide whether the review is positive or "
               "negative. Write one new review in the same style as the examples: one or two sentences, plain "
               "English, about a different product.")
GOLD = [
    "The kettle boils water in under two minutes and the handle stays cool, which I really appreciate.",
    "These headphones broke after a week; the left ear stopped working and support never replied.",
    "A sturdy backpack with plenty of pockets, and the straps are comfortable even on long walks.",
    "The blender is so loud that my neighbours complained, and it still leaves chunks in smoothies.",
    "I love this desk lamp: three brightness levels, a small footprint and a warm, even light.",
    "The phone case cracked the first time I dropped it, so it did not protect anything at all.",
]
EARLIER = [
    "My new running shoes feel light and the grip on wet roads is excellent.",
    "The coffee grinder jammed twice in the first month and the lid does not close properly.",
    "This umbrella survived a windy storm without bending, great value for the price.",
    "The charger gets very hot and charges my tablet slower than the old one did.",
    "A lovely wool scarf, soft and warm, and the colour matches the photos exactly.",
    "The vacuum loses suction after ten minutes and the filter is hard to clean.",
    "Quick delivery and the frying pan heats evenly; eggs never stick to it.",
    "The bookshelf arrived with missing screws and the instructions were impossible to follow.",
]


def build_prompts(count: int, seed: int = 0) -> list[str]:
    """SELF-GUIDE-style input-generation prompts: instruction, shuffled gold inputs ("high quality"),
    some earlier generations ("low quality"), and a target label, as in methods.md §10."""
    rng = random.Random(seed)
    prompts = []
    for i in range(count):
        gold = rng.sample(GOLD, len(GOLD))
        earlier = rng.sample(EARLIER, rng.randint(3, len(EARLIER)))
        label = "positive" if i % 2 == 0 else "negative"
        lines = [INSTRUCTION, "", "High-quality examples:"]
        lines += [f"[input] {g}" for g in gold]
        lines += ["", "Lower-quality examples (do not copy them):"]
        lines += [f"[input] {e}" for e in earlier]
        lines += ["", f"Now write one new {label} review.", "[input]"]
        prompts.append("\n".join(lines))
    return prompts


def run_engine(model, tokenizer, prompts, batch_size, seed) -> dict:
    from tunesmith.synth.engine import Job, read_samples, synthesize

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "samples.jsonl"
        stats = synthesize(model, tokenizer, [Job(str(i), p) for i, p in enumerate(prompts)], out, n=N,
                           batch_size=batch_size, seed=seed, progress=False, **SETTINGS)
        samples = [r for rows in read_samples(out).values() for r in rows]
    return {"path": "engine", "seconds": stats.generation_s, "samples": stats.samples, "tokens": stats.tokens,
            "distinct": len({r["text"] for r in samples}) / len(samples)}


def run_naive(model, tokenizer, prompts, batch_size, seed) -> dict:
    from tunesmith.infer.generate import generate

    repeated = [p for p in prompts for _ in range(N)]
    start = time.perf_counter()
    texts = generate(model, tokenizer, repeated, batch_size=batch_size, seed=seed, top_p=1.0, **SETTINGS)
    seconds = time.perf_counter() - start
    tokens = 0
    for t in texts:
        k = len(tokenizer(t, add_special_tokens=False)["input_ids"])
        tokens += min(k + 1, SETTINGS["max_new_tokens"])  # + the eos that ended it, if it ended early
    return {"path": "naive", "seconds": seconds, "samples": len(texts), "tokens": tokens,
            "distinct": len(set(texts)) / len(texts)}


def summarise(passes: list[dict]) -> dict:
    out = {}
    for path in ("engine", "naive"):
        mine = [p for p in passes if p["path"] == path]
        out[path] = {"samples_per_s": statistics.median(p["samples"] / p["seconds"] for p in mine),
                     "tokens_per_s": statistics.median(p["tokens"] / p["seconds"] for p in mine),
                     "generation_s": statistics.median(p["seconds"] for p in mine),
                     "samples": mine[0]["samples"], "distinct": statistics.mean(p["distinct"] for p in mine)}
    out["ratio_samples_per_s"] = out["engine"]["samples_per_s"] / out["naive"]["samples_per_s"]
    out["ratio_tokens_per_s"] = out["engine"]["tokens_per_s"] / out["naive"]["tokens_per_s"]
    return out


def rows(summary: dict, prompts: int, command: str) -> list[dict]:
    common = {"task": f"SELF-GUIDE-style input generation ({prompts} prompts x {N} samples)",
              "setting": "generation only", "metric": "samples/s vs naive (x)", "kept": None, "dropped": None,
              "train_s": None, "command": command}
    return [{**common, "method": f"synthesis engine ({path})",
             "score": round(summary["ratio_samples_per_s"], 2) if path == "engine" else 1.0,
             "generated": summary[path]["samples"], "generation_s": round(summary[path]["generation_s"], 1),
             "samples_per_s": round(summary[path]["samples_per_s"], 3),
             "tokens_per_s": round(summary[path]["tokens_per_s"], 1)} for path in ("engine", "naive")]


def write_md(summary, settings, passes) -> None:
    e, nv = summary["engine"], summary["naive"]
    lines = [
        "# Synthesis engine: samples/s against the naive path", "",
        f"Command: `{settings['command']}`", "",
        f"SmolLM2-135M-Instruct, fp32, CPU ({settings['threads']} thread(s), a shared machine: other jobs ran "
        "at the same time, so absolute figures are noisy; the passes alternate ABBA and the ratio is of the "
        f"medians). {settings['prompts']} prompts of {settings['prompt_tokens_min']}–{settings['prompt_tokens_max']} "
        f"tokens, n={N} samples each, temperature 0.7, top_k 40, max_new_tokens 48, {settings['batch_size']} "
        "sequences decoding together on both paths.", "",
        "| path | samples/s | tokens/s | generation s (median) | distinct samples |", "|---|---|---|---|---|",
        f"| engine (`synthesize`: one prefill per prompt, samples from copies of its KV cache) | "
        f"{e['samples_per_s']:.2f} | {e['tokens_per_s']:.1f} | {e['generation_s']:.1f} | {e['distinct']:.0%} |",
        f"| naive (`generate` on each prompt repeated {N} times) | {nv['samples_per_s']:.2f} | "
        f"{nv['tokens_per_s']:.1f} | {nv['generation_s']:.1f} | {nv['distinct']:.0%} |", "",
        f"**Engine / naive: {summary['ratio_samples_per_s']:.2f}x samples/s, "
        f"{summary['ratio_tokens_per_s']:.2f}x tokens/s.**", "",
        "Passes (in the order run): " + ", ".join(f"{p['path']} {p['samples'] / p['seconds']:.2f}/s" for p in passes)
        + ".", "",
        "Where the time goes: the naive path prefills every prompt n times; the engine prefills it once and "
        "only decodes n rows. The decode steps themselves cost the same on both paths (the same number of "
        "rows, the same model), and per-row sampling from a seeded generator of its own (what makes a "
        "sample independent of its batch) costs about what transformers' batched sampling does. The naive "
        "token count re-encodes its texts (close, not exact). The gain is the prefill the naive path "
        "repeats, so it grows with the prompt length and n and shrinks as max_new_tokens grows.", "",
        "Notes: 6 prompts and two rounds keep the run near 13 minutes on the loaded machine (load average "
        "about 8 on 2 cores during the run); 16 prompts take about 2.5x as long. Run it with "
        "OMP_NUM_THREADS=1 on a shared machine: with 2 OpenMP threads competing with other jobs both paths "
        "ran more than 10x slower and the ratio measured nothing but the contention.", "",
    ]
    (HERE / "results.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2, help="ABBA rounds: each runs both paths once")
    ap.add_argument("--batch-size", type=int, default=20, help="sequences decoding together (both paths)")
    ap.add_argument("--table", action="store_true", help="only rebuild results.md from results.json")
    args = ap.parse_args(argv)
    if args.table:
        saved = json.loads((HERE / "results.json").read_text())
        write_md(saved["summary"], saved["settings"], saved["passes"])
        return 0

    import torch

    from tunesmith.infer.generate import load_for_inference, render_prompt

    model, tokenizer = load_for_inference("smollm2-135m-instruct")
    prompts = build_prompts(args.prompts)
    lengths = [len(tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]) for p in prompts]
    passes = []
    for r in range(args.rounds):
        order = (run_engine, run_naive) if r % 2 == 0 else (run_naive, run_engine)
        for fn in order:
            passes.append(fn(model, tokenizer, prompts, args.batch_size, seed=r))
            p = passes[-1]
            print(f"round {r} {p['path']}: {p['samples']} samples in {p['seconds']:.1f} s "
                  f"({p['samples'] / p['seconds']:.2f} samples/s)", file=sys.stderr, flush=True)
    command = COMMAND if (args.prompts, args.rounds, args.batch_size) == (6, 2, 20) else \
        f"{COMMAND} --prompts {args.prompts} --rounds {args.rounds} --batch-size {args.batch_size}"
    settings = {"command": command, "prompts": args.prompts, "rounds": args.rounds, "batch_size": args.batch_size,
                "n": N, **SETTINGS, "threads": torch.get_num_threads(), "prompt_tokens_min": min(lengths),
                "prompt_tokens_max": max(lengths), "model": "smollm2-135m-instruct", "dtype": "fp32"}
    summary = summarise(passes)
    (HERE / "results.json").write_text(json.dumps({"rows": rows(summary, args.prompts, command), "summary": summary,
                                                   "passes": passes, "settings": settings}, indent=2) + "\n")
    write_md(summary, settings, passes)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
