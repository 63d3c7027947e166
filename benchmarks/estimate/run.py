"""How close is `tunesmith estimate` to what a run measures? For each configuration, the estimate
(no weights loaded) and `tunesmith bench` (the real training step, peak RSS of the whole process)
run as their own processes, one after the other; the table gives both and the error.

    python benchmarks/estimate/run.py                    # the 8 configurations below
    python benchmarks/estimate/run.py --only lora-bf16-512

Model: the embedded SmolLM2-135M-Instruct; data: variable-length English prose (Python's bundled
documentation topics), packed rows of `seq` tokens, every token trained.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
from make_model import write_text  # noqa: E402

RECIPES = {"lora": "recipes/lora-sft.yaml", "full": "recipes/full-sft.yaml"}


def configurations():
    for method in ("full", "lora"):
        for precision in ("fp32", "bf16"):
            for seq in (512, 2048):
                over = [f"train.precision={precision}", f"data.max_length={seq}", f"train.batch_tokens={seq}"]
                if precision == "fp32":
                    over.append("model.frozen_dtype=same")  # fp32 throughout
                yield f"{method}-{precision}-{seq}", RECIPES[method], over


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=None, help="configuration names")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results.json"))
    p.add_argument("--reuse-bench", action="store_true", help="keep measurements already in runs/estimate-bench")
    args = p.parse_args()
    work = Path("runs/estimate-bench")
    text = work / "text.jsonl"
    write_text(text, 400)
    exe = [sys.executable, "-m", "tunesmith"]
    rows = []
    for name, recipe, over in configurations():
        if args.only and name not in args.only:
            continue
        common = [recipe, f"data.train={text}", "data.format=text", "data.val_fraction=0", *over]
        t0 = time.time()
        run(exe + ["estimate", *common, "--json", str(work / f"{name}-estimate.json")])
        t_est = time.time() - t0
        if not (args.reuse_bench and (work / f"{name}-bench.json").is_file()):
            run(exe + ["bench", *common, f"steps={args.steps}", "warmup=1", "--no-breakdown",
                       "--json", str(work / f"{name}-bench.json")])
        e = json.loads((work / f"{name}-estimate.json").read_text())
        b = json.loads((work / f"{name}-bench.json").read_text())
        row = {"config": name, "overrides": over, "estimate_gb": e["peak_gb"], "measured_gb": b["peak_mem_gb"],
               "error": e["peak_gb"] / b["peak_mem_gb"] - 1, "parts_gb": {k: v / 1e9 for k, v in e["parts"].items()},
               "estimate_s_per_step": e["step_s"], "measured_s_per_step": b["s_per_step"],
               "estimate_seconds": t_est, "allocator": b["info"]["allocator"]}
        rows.append(row)
        print(f"{name:18s} estimate {row['estimate_gb']:.2f} GB  measured {row['measured_gb']:.2f} GB  "
              f"error {100 * row['error']:+.1f}%  (step {row['estimate_s_per_step']:.1f} s est. vs "
              f"{row['measured_s_per_step']:.1f} s)", flush=True)
    Path(args.out).write_text(json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows}, indent=1))
    lines = ["| configuration | estimate | measured peak RSS | error | weights | optimizer | activations | "
             "transient | runtime | estimate took |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        g = r["parts_gb"]
        lines.append(f"| {r['config']} | {r['estimate_gb']:.2f} GB | {r['measured_gb']:.2f} GB | "
                     f"{100 * r['error']:+.1f}% | {g['weights']:.2f} | {g['optimizer']:.2f} | {g['activations']:.2f} | "
                     f"{g['backward transient']:.2f} | {g['runtime']:.2f} | {r['estimate_seconds']:.0f} s |")
    command = "python benchmarks/estimate/run.py " + " ".join(sys.argv[1:])
    Path(args.out).with_suffix(".md").write_text(f"`{command}`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
