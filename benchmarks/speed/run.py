"""Where tunesmith's CPU speed and memory come from: a cumulative ablation. Each row adds one switch
to the row above, from a training step as most trainers run it by default (fp32, padded batches,
the whole logits at once, glibc malloc, foreach AdamW) to tunesmith's default recipe; the last rows
are options that are off by default (selective activation checkpointing, regional torch.compile).

    python benchmarks/speed/run.py                      # LoRA r=16 all-linear, 2 interleaved repeats
    python benchmarks/speed/run.py --method full --repeats 1

Every row is `tunesmith bench` in its own process on the embedded SmolLM2-135M-Instruct, the same
variable-length English prose (Python's bundled documentation topics, ≤ 512 tokens each), 4096
tokens a step (8 padded rows of ≤ 512, or one packed row). Rows run interleaved: repeat 1 of every
row, then repeat 2, ...; the table gives medians. Trained tokens/s counts real tokens (no padding).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
from make_model import write_text  # noqa: E402

RECIPES = {"lora": "recipes/lora-sft.yaml", "full": "recipes/full-sft.yaml"}

# (row name, overrides added to the rows above, environment) — cumulative
STEPS = [
    ("baseline: fp32, padded 8×512, whole logits, glibc, foreach AdamW",
     ["train.precision=fp32", "model.frozen_dtype=same", "data.packing=false", "train.batch_size=8",
      "train.loss_chunk=0", "train.adamw=foreach"], {"TUNESMITH_ALLOCATOR": "system"}),
    ("+ bf16 autocast", ["train.precision=bf16"], {}),
    ("+ frozen weights stored in bf16", ["model.frozen_dtype=bf16"], {}),
    ("+ padding-free packing (4096-token rows)", ["data.packing=true", "train.batch_tokens=4096"], {}),
    ("+ chunked lm_head + loss (1024 tokens)", ["train.loss_chunk=1024"], {}),
    ("+ jemalloc", [], {"TUNESMITH_ALLOCATOR": ""}),
    ("+ fused AdamW  (= tunesmith's default recipe)", ["train.adamw=fused"], {}),
    ("+ selective activation checkpointing (every 2nd layer)",
     ["train.activation_checkpointing=true", "train.checkpoint_every=2"], {}),
    ("+ activation checkpointing (every layer)", ["train.checkpoint_every=1"], {}),
]
COMPILE = ("default + regional torch.compile", ["train.compile=true"], {})


def rows(method: str, with_compile: bool):
    over, env = [], {}
    out = []
    for name, extra, extra_env in STEPS:
        if method == "full" and "frozen" in name:
            continue  # nothing is frozen
        over = over + extra
        env = {**env, **extra_env}
        out.append((name, list(over), dict(env)))
    if with_compile:
        default = next(r for r in out if "default recipe" in r[0])
        out.append((COMPILE[0], default[1] + COMPILE[1], default[2]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=sorted(RECIPES), default="lora")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="add the regional torch.compile row")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    work = ROOT / "runs" / "speed-ablation"
    text = work / "text.jsonl"
    write_text(text, 400)
    plan = rows(args.method, args.compile)
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in plan}
    for r in range(args.repeats):
        for i, (name, over, env) in enumerate(plan):
            out = work / f"{args.method}-{i}-{r}.json"
            cmd = [sys.executable, "-m", "tunesmith", "bench", RECIPES[args.method], f"data.train={text}",
                   "data.format=text", "data.val_fraction=0", "data.max_length=512", *over,
                   f"steps={args.steps}", f"warmup={args.warmup}", "--no-breakdown", "--json", str(out)]
            e = {**os.environ, **env}
            if e.get("TUNESMITH_ALLOCATOR") == "":
                e.pop("TUNESMITH_ALLOCATOR")
            proc = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"FAILED {name}: {proc.stderr[-1500:]}", flush=True)
                continue
            res = json.loads(out.read_text())
            runs[name].append(res)
            print(f"[{r + 1}/{args.repeats}] {name}: {res['trained_tokens_per_s']:.0f} trained tokens/s, "
                  f"{res['peak_mem_gb']:.2f} GB, allocator {res['info']['allocator']}", flush=True)
    table = []
    for name, over, env in plan:
        if not runs[name]:
            continue
        tps = statistics.median(x["trained_tokens_per_s"] for x in runs[name])
        mem = statistics.median(x["peak_mem_gb"] for x in runs[name])
        mfu = statistics.median(x["mfu"] or 0 for x in runs[name])
        table.append({"row": name, "overrides": over, "env": env, "trained_tokens_per_s": tps, "peak_gb": mem,
                      "mfu": mfu, "s_per_step": statistics.median(x["s_per_step"] for x in runs[name]),
                      "runs": len(runs[name])})
    base = table[0]
    prev = base
    lines = ["| configuration | trained tokens/s | × previous | × baseline | peak RSS | × baseline | MFU |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in table:
        lines.append(f"| {row['row']} | {row['trained_tokens_per_s']:,.0f} | "
                     f"{row['trained_tokens_per_s'] / prev['trained_tokens_per_s']:.2f} | "
                     f"{row['trained_tokens_per_s'] / base['trained_tokens_per_s']:.2f} | {row['peak_gb']:.2f} GB | "
                     f"{row['peak_gb'] / base['peak_gb']:.2f} | {100 * row['mfu']:.1f}% |")
        prev = row
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())
    command = "python benchmarks/speed/run.py " + " ".join(sys.argv[1:])
    md = (f"`{command}` — {args.method}, {cpu}, {os.cpu_count()} cores, median of {args.repeats} interleaved "
          f"runs × {args.steps} timed steps\n\n" + "\n".join(lines) + "\n")
    print(md)
    out = Path(args.out or HERE / f"results-{args.method}")
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "cpu": cpu, "table": table}, indent=1))


if __name__ == "__main__":
    main()
