"""Knowledge preference (instruction > context > parametric) on the embedded SmolLM2-135M-Instruct:
zero-shot, 3-shot (demonstrations from the synthesized data) and LoRA fine-tuned on the synthesized
HierPref-style data, each on the `knowledge` task's test split (8 examples per condition).

    OMP_NUM_THREADS=2 python benchmarks/synthesis/knowledge/run.py --n 400 --steps 30 --limit 64

Data: `tunesmith synth knowledge --out DIR --n 400 --seed 1` (the task's training split, world seed 0:
no test entity or fact). Training: recipes/lora-sft.yaml with data.train=DIR/train.jsonl, rank 16,
constant lr 1e-3, --steps steps of 2048-token micro-batches. Scores: accuracy (answer line contains the
gold object and no conflicting source's answer), per condition in `by_group`. Writes results.json
beside this script (rows per the synthesis table contract) and the eval records under --out.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from tunesmith.eval.runner import evaluate, get_eval_task, save_result
from tunesmith.infer.generate import load_for_inference
from tunesmith.recipe import load_recipe
from tunesmith.synth.knowledge import synthesize_knowledge
from tunesmith.train.loop import train

HERE = Path(__file__).parent
MODEL = "smollm2-135m-instruct"


def row(setting: str, result, command: str, stats: dict | None = None, train_s: float | None = None) -> dict:
    errors = Counter(r["error"] for r in result.records if r["error"])
    return {"method": "knowledge-preference", "task": "knowledge", "setting": setting, "metric": "accuracy",
            "score": result.main, "kept": stats["kept"] if stats else None,
            "generated": stats["generated"] if stats else None, "dropped": stats["dropped"] if stats else None,
            "generation_s": stats["generation_s"] if stats else None, "samples_per_s": None, "train_s": train_s,
            "command": command, "examples": result.summary["examples"],
            "by_group": {g: round(v["accuracy"], 3) for g, v in result.summary["by_group"].items()},
            "errors": dict(errors.most_common())}


def run_eval(model, tok, task, limit: int, shots: int, out: Path, label: str):
    t0 = time.perf_counter()
    result = evaluate(model, tok, task, split="test", limit=limit, shots=shots, max_new_tokens=24, batch_size=16,
                      share_prefix=shots > 0)
    save_result(result, out / f"eval-{label}.json", model=MODEL)
    print(f"{label}: {100 * result.main:.1f}% in {time.perf_counter() - t0:.0f} s "
          f"{ {g: round(v['accuracy'], 2) for g, v in result.summary['by_group'].items()} }", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400, help="synthesized training records")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--limit", type=int, default=64, help="test questions (8 per condition)")
    ap.add_argument("--out", default="runs/bench-knowledge")
    ap.add_argument("--results", default=str(HERE / "results.json"))
    args = ap.parse_args()
    out = Path(args.out)
    cmd = (f"OMP_NUM_THREADS=2 python benchmarks/synthesis/knowledge/run.py --n {args.n} --steps {args.steps} "
           f"--limit {args.limit}")
    task = get_eval_task("knowledge")
    wall0 = time.perf_counter()
    model, tok = load_for_inference(MODEL)
    rows = [row("zero-shot", run_eval(model, tok, task, args.limit, 0, out, "zero-shot"), cmd),
            row("3-shot (synthetic data in context)", run_eval(model, tok, task, args.limit, 3, out, "3-shot"), cmd)]
    stats = synthesize_knowledge(out / "data", n=args.n, seed=1)
    recipe = load_recipe("recipes/lora-sft.yaml", [
        "name=knowledge-lora", f"output_dir={out}", f"data.train={out / 'data' / 'train.jsonl'}",
        "data.val_fraction=0", "data.max_length=512", "method.lora.rank=16", "method.lora.alpha=32",
        f"train.lr={args.lr}", "train.schedule=constant", "train.warmup=0", "train.batch_tokens=2048",
        f"train.steps={args.steps}", "train.save_every=0", "train.eval_every=0"])
    t0 = time.perf_counter()
    job = train(recipe)
    train_s = time.perf_counter() - t0
    assert job.status == "completed", job
    tuned, tok = load_for_inference(MODEL, str(job.output))
    rows.append(row(f"fine-tuned on synthetic ({args.n} records, {args.steps} LoRA steps)",
                    run_eval(tuned, tok, task, args.limit, 0, out, "fine-tuned"), cmd, stats, train_s))
    payload = {"command": cmd, "wall_s": round(time.perf_counter() - wall0), "rows": rows}
    Path(args.results).write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
