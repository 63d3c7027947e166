"""Training from tokenized shards: memory stays flat in the data's tokens, and grows with the sample
count only by the per-sample arrays that plan the batches.

    nice -n 5 python benchmarks/data/shards_memory.py      # writes benchmarks/data/shards.md (+ shards.json)

Every measurement runs in a fresh process (RSS and its peak, VmHWM, are per process):
  * write: N synthetic samples (token ids drawn at random, lengths uniform in [L/2, 3L/2], the first
    quarter of each masked) through `ShardWriter` into a shard folder: samples/s and peak RSS;
  * data: `load_data` of the folder, the epoch's micro-batch plan (packed, 2,048 tokens) and 300
    micro-batches read and collated, as `train` does: seconds and RSS above the process's RSS once
    torch, tunesmith and the tokenizer are loaded; the same for a JSONL of text records of about the
    same length (the in-memory path: read, render, hold every sample as Python lists);
  * train: `tunesmith.train` of a tiny random 2-layer Llama on the SmolLM2 tokenizer with
    `data.train=<folder>`, a few optimizer steps: the run's peak RSS (the tiny model's 49k-vocabulary
    logits dominate it; what matters is that it does not grow with the data).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).with_name("shards.md")
STEPS = 3


def peak_mb() -> tuple[float, float]:
    """(VmHWM, VmRSS) of this process in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024


def write(folder: str, n: int, mean: int, seed: int = 0) -> dict:
    import numpy as np

    from tunesmith.data.shards import ShardWriter, tokenizer_meta
    from tunesmith.models.load import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(mean // 2, mean + mean // 2 + 1, n)
    block = rng.integers(0, len(tok), 1 << 20)  # token ids are sliced from one random block
    before = peak_mb()[0]
    t = time.perf_counter()
    with ShardWriter(folder, meta={**tokenizer_meta(tok), "format": "text"}) as w:
        pos = 0
        for k in lengths.tolist():
            if pos + k > len(block):
                pos = 0
            weights = [0.0] * (k // 4) + [1.0] * (k - k // 4)
            w.add({"input_ids": block[pos:pos + k], "weights": weights}, "synthetic")
            pos += k
    s = time.perf_counter() - t
    return {"samples": n, "tokens": int(lengths.sum()), "seconds": s, "samples_per_s": n / s,
            "peak_mb": peak_mb()[0], "peak_before_mb": before,
            "disk_mb": sum(p.stat().st_size for p in Path(folder).iterdir()) / 2**20}


def write_jsonl(path: str, n: int, mean: int, seed: int = 0) -> dict:
    """Text records of about `mean` tokens (SmolLM2 reads ` w123` as about four)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for k in rng.integers(mean // 8, 3 * mean // 8 + 1, n).tolist():
            f.write(json.dumps({"text": " ".join(f"w{i}" for i in rng.integers(0, 999, k).tolist())}) + "\n")
    return {}


def tiny_model(folder: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.models.load import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return {}


def run_train(model: str, data: str, out: str) -> dict:
    from tunesmith.recipe import load_recipe
    from tunesmith.train.loop import train

    recipe = load_recipe(None, [f"model.name={model}", f"data.train={data}", f"output_dir={out}", "name=m",
                                f"train.steps={STEPS}", "train.batch_tokens=2048", "train.precision=fp32",
                                "train.save_every=1000", "data.max_length=2048", "train.threads=1"])
    t = time.perf_counter()
    result = train(recipe)
    s = time.perf_counter() - t
    assert result.status == "completed", result.status
    return {"seconds": s, "peak_mb": peak_mb()[0]}


def run_data(data: str, batches: int = 300) -> dict:
    """What the data costs a run: open (or read and render), plan an epoch, read `batches` micro-batches."""
    from tunesmith.data import load_data
    from tunesmith.models.load import load_tokenizer
    from tunesmith.objectives.sft import SFT
    from tunesmith.recipe import load_recipe
    from tunesmith.train.batches import MicroBatches

    tok = load_tokenizer("smollm2-135m-instruct")
    recipe = load_recipe(None, [f"data.train={data}", "train.batch_tokens=2048", "data.max_length=2048"])
    base = peak_mb()[1]
    t0 = time.perf_counter()
    splits = load_data(recipe.data, tok, report=False)
    t1 = time.perf_counter()
    stream = MicroBatches(splits.train, SFT(), recipe.data, recipe.train, seed=0, pad_id=0)
    plan = stream.plan(0)
    t2 = time.perf_counter()
    after_plan = peak_mb()[1]
    for i in range(batches):
        stream.get(i)
    t3 = time.perf_counter()
    hwm, rss = peak_mb()
    return {"samples": len(splits.train), "tokens": splits.stats["train"]["tokens"], "open_s": t1 - t0,
            "plan_s": t2 - t1, "micro_batches": len(plan), "batch_ms": 1000 * (t3 - t2) / batches,
            "plan_mb": after_plan - base, "rss_mb": rss - base, "peak_mb": hwm - base, "base_mb": base}


def child(kind: str, *args) -> dict:
    """Run one measurement in a fresh process; its JSON result is the last line it prints."""
    cmd = [sys.executable, __file__, "--child", kind, *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{kind} {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    ap.add_argument("--mean", type=int, default=128, help="mean tokens a sample")
    ap.add_argument("--long", type=int, nargs=2, default=[250_000, 512], help="N MEAN: same tokens as 1M × 128")
    ap.add_argument("--baseline", type=int, nargs="+", default=[30_000, 100_000])
    ap.add_argument("--child", nargs="+")
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        fn = {"write": write, "train": run_train, "data": run_data, "model": tiny_model, "jsonl": write_jsonl}[kind]
        rest = [int(x) if x.isdigit() else x for x in rest]
        print(json.dumps(fn(*rest)))
        return
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        model = f"{tmp}/model"
        child("model", model)
        for n, mean in [(n, args.mean) for n in args.sizes] + [tuple(args.long)]:
            folder = f"{tmp}/shards-{n}-{mean}"
            row = {"source": "shards", "n": n, "mean": mean, "write": child("write", folder, n, mean),
                   "data": child("data", folder)}
            row["train"] = child("train", model, folder, f"{tmp}/runs-{n}-{mean}")
            rows.append(row)
            print(row, flush=True)
            subprocess.run(["rm", "-rf", folder, f"{tmp}/runs-{n}-{mean}"], check=True)
        for n in args.baseline:
            path = f"{tmp}/text-{n}.jsonl"
            child("jsonl", path, n, args.mean)
            rows.append({"source": "jsonl (in memory)", "n": n, "mean": args.mean, "data": child("data", path)})
            print(rows[-1], flush=True)
    OUT.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    report(rows)


def report(rows: list[dict]) -> None:
    from mixing import cpu  # the same machine line as mixing.md

    lines = ["# Training from tokenized shards: memory and speed", "",
             "    nice -n 5 python benchmarks/data/shards_memory.py", "",
             f"Machine: {cpu()}, shared with other jobs while measuring (times are loose; memory is not). "
             "One sitting; every number from a fresh process. `data MiB`: RSS added by opening the data, "
             "planning the epoch (packed 2,048-token micro-batches) and reading 300 micro-batches, above the "
             "process with torch, tunesmith and the tokenizer loaded; `peak` the same for the high-water mark. "
             f"`train peak`: the whole `train` run ({STEPS} steps of a tiny 2-layer Llama on the SmolLM2 "
             "tokenizer, 1 thread), dominated by the 49k-vocabulary logits, not the data.", "",
             "| data | samples | tokens | write samples/s | write peak MiB | open s | plan s | ms / micro-batch | "
             "data MiB | data peak MiB | bytes / sample | train peak MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        w, d, t = r.get("write") or {}, r["data"], r.get("train") or {}
        cell = lambda x, f="{:,.0f}": f.format(x) if x is not None else "–"  # noqa: E731
        lines.append(" | ".join([
            f"| {r['source']}", f"{d['samples']:,}", f"{d['tokens']:,}", cell(w.get("samples_per_s")),
            cell(w.get("peak_mb")), f"{d['open_s']:.1f}", f"{d['plan_s']:.1f}", f"{d['batch_ms']:.1f}",
            f"{d['rss_mb']:,.0f}", f"{d['peak_mb']:,.0f}", f"{2**20 * d['peak_mb'] / d['samples']:,.0f}",
            cell(t.get("peak_mb"))]) + " |")
    lines += [""] + findings(rows)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def findings(rows: list[dict]) -> list[str]:
    """The side-by-side ratios the table shows, computed from it (so a rerun keeps them true)."""
    shards = {(r["n"], r["mean"]): r for r in rows if r["source"] == "shards"}
    memory = {r["n"]: r for r in rows if r["source"] != "shards"}
    out = []
    both = sorted(set(n for n, _ in shards) & set(memory))
    for n in both:
        a, b = shards[(n, min(m for k, m in shards if k == n))]["data"], memory[n]["data"]
        out.append(f"- {n:,} samples: the in-memory path holds {b['peak_mb']:,.0f} MiB of data, shards "
                   f"{a['peak_mb']:,.0f} MiB ({b['peak_mb'] / a['peak_mb']:.0f}× less); opening takes "
                   f"{a['open_s']:.1f} s instead of reading and rendering for {b['open_s']:.0f} s.")
    same = [r for r in shards.values() if r["data"]["tokens"] > 10**8]
    if len(same) >= 2:
        lo, hi = sorted(same, key=lambda r: r["n"])[:2]
        out.append(f"- The same ~{hi['data']['tokens'] / 1e6:.0f}M tokens as {hi['n']:,} samples cost "
                   f"{hi['data']['peak_mb']:,.0f} MiB, as {lo['n']:,} samples {lo['data']['peak_mb']:,.0f} MiB: "
                   "memory follows the sample count (the arrays that plan batches), not the tokens.")
    ns = sorted(n for n, m in shards if m == rows[0]["mean"])
    if len(ns) >= 2:
        a, b = shards[(ns[0], rows[0]["mean"])], shards[(ns[-1], rows[0]["mean"])]
        out.append(f"- From {ns[0]:,} to {ns[-1]:,} samples ({b['data']['tokens'] / a['data']['tokens']:.0f}× the "
                   f"tokens) the whole run's peak goes from {a['train']['peak_mb']:,.0f} to "
                   f"{b['train']['peak_mb']:,.0f} MiB; the shard writer's peak stays about "
                   f"{b['write']['peak_mb']:,.0f} MiB at any size (one 16M-token shard buffered, plus the tokenizer).")
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
