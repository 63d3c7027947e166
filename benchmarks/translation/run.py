"""Translation benchmark: English -> Volian (the built-in low-resource constructed language, 200
training pairs) with the embedded SmolLM2-135M-Instruct, on a CPU.

    nice -n 5 python benchmarks/translation/run.py --limit 24 --steps 24 --stage1-steps 24

Rows, all scored on the same first `--limit` test sentences with corpus BLEU, chrF and chrF++
(sacrebleu) and exact match:
- in-context baselines, no training: 0 and k shots (k training pairs as earlier chat turns);
- one-stage fine-tuning on the 200 en->vo pairs: LoRA (recipes/translation-lora.yaml) and full
  fine-tuning (the same recipe, method.name=full, a full-tuning lr), the same steps and batches;
- two-stage (recipes/translation-two-stage.yaml): `--stage1-steps` on en->va (the sister language,
  2000 pairs), then the same steps on en->vo as the one-stage runs.
Each training is a `tunesmith train` run and each score a `tunesmith eval` run, so what is measured
is what a user gets. Results go to benchmarks/translation/results.json (a table is printed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def tunesmith(*args: str, threads: int | None = None) -> float:
    t0 = time.perf_counter()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    subprocess.run([str(Path(sys.executable).parent / "tunesmith"), *args], check=True, cwd=ROOT, env=env)
    return time.perf_counter() - t0


def evaluate(label: str, out: Path, common: list[str], *model_args: str, shots: int = 0) -> dict:
    path = out / f"eval-{label}.json"
    seconds = tunesmith("eval", *model_args, "--task", "translate-vo", "--shots", str(shots),
                        "--output", str(path), *common, threads=1)  # generation: one thread waits less on a busy CPU
    summary = json.loads(path.read_text())["summary"]
    row = {"run": label, "bleu": summary["bleu"], "chrf": summary["chrf"], "chrf++": summary["chrf++"],
           "exact": summary["accuracy"], "eval_s": round(seconds)}
    print(json.dumps(row), flush=True)
    return row


def train(recipe: Path, name: str, out: Path, overrides: list[str]) -> float:
    return tunesmith("train", str(recipe), f"name={name}", f"output_dir={out}", *overrides)


def two_stage_recipe(out: Path, stage1_steps: int, steps: int) -> Path:
    """The shipped two-stage recipe with the benchmark's step counts (and no evaluation during training)."""
    values = yaml.safe_load((ROOT / "recipes/translation-two-stage.yaml").read_text())
    values["stages"][0]["train"].update(steps=stage1_steps)
    values["stages"][1]["train"].update(steps=steps)
    for stage in values["stages"]:
        stage.pop("eval", None)
    path = out / "two-stage.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def plan(args, out: Path, common: list[str]) -> dict:
    """Every row: its label and what produces it (a training, then an evaluation)."""
    quiet = [f"train.steps={args.steps}", f"train.batch_tokens={args.batch_tokens}", "train.eval_every=0",
             "train.save_every=0", "eval.every=0", "train.warmup=0", "train.threads=1"]
    lora = ROOT / "recipes/translation-lora.yaml"
    return {
        "0-shot": lambda: (0, evaluate("0-shot", out, common)),
        f"{args.shots}-shot": lambda: (0, evaluate(f"{args.shots}-shot", out, common, shots=args.shots)),
        "two-stage LoRA": lambda: (train(two_stage_recipe(out, args.stage1_steps, args.steps), "two-stage", out,
                                         quiet[1:]),
                                   evaluate("two-stage LoRA", out, common, "--adapter", str(out / "two-stage"))),
        "LoRA": lambda: (train(lora, "lora", out, quiet),
                         evaluate("LoRA", out, common, "--adapter", str(out / "lora"))),
        "full": lambda: (train(lora, "full", out, quiet + ["method.name=full", "train.lr=1e-4"]),
                         evaluate("full", out, common, "--model", str(out / "full" / "model"))),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=24, help="test sentences scored")
    ap.add_argument("--shots", type=int, default=4, help="the k-shot baseline's k")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps on en->vo (every fine-tuned row)")
    ap.add_argument("--stage1-steps", type=int, default=40, help="two-stage: steps on en->va first")
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--only", default=None, help="comma-separated rows to (re)run; the others keep their results")
    ap.add_argument("--out", default=str(ROOT / "runs/bench-translation"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--limit", str(args.limit), "--max-new-tokens", "36", "--batch-size", str(args.limit)]
    results_path = HERE / "results.json"
    saved = json.loads(results_path.read_text()) if args.only and results_path.is_file() else {"rows": {}}
    rows = plan(args, out, common)
    wanted = args.only.split(",") if args.only else list(rows)
    for label in wanted:
        try:
            train_s, row = rows[label]()
            row["train_s"] = round(train_s)
        except subprocess.CalledProcessError as e:  # keep the other rows; say which failed
            row = {"run": label, "error": str(e)}
        if results_path.is_file():  # another invocation (--only) may have added rows meanwhile
            saved["rows"] = json.loads(results_path.read_text())["rows"]
        saved["rows"][label] = {**row, "args": vars(args)}
        results_path.write_text(json.dumps(saved, indent=1))
    print("| run | BLEU | chrF | chrF++ | exact | train s |\n|---|---|---|---|---|---|")
    for r in saved["rows"].values():
        if "error" in r:
            print(f"| {r['run']} | failed: {r['error']} |")
        else:
            print(f"| {r['run']} | {r['bleu']:.1f} | {r['chrf']:.1f} | {r['chrf++']:.1f} | {100 * r['exact']:.0f}% "
                  f"| {r['train_s']} |")


if __name__ == "__main__":
    main()
