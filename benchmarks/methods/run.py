"""Every tuning method on the same task with the same budget, and what each one forgets.

    python benchmarks/methods/run.py                   # all methods (~1 h on a 2-core CPU)
    python benchmarks/methods/run.py --methods lora,hft --steps 30

Each method LoRA-style fine-tunes the embedded SmolLM2-135M-Instruct on the built-in `sql` task
(`recipes/quickstart.yaml`: bf16 autocast, packed 1024-token steps) for the same number of steps,
then the tuned model is measured on
  - the task: execution accuracy on `sql` test questions;
  - forgetting, as the change from the base model in
      · loss on held-out general text (English prose from Python's bundled documentation topics,
        `pydoc_data`, which every Python install ships and no method trains on), and
      · score on a second, unrelated task (`json` extraction, two-shot, share of fields right).
Every method runs in its own process, so peak memory is its own. Results go to
`benchmarks/methods/results.json` and the table to `benchmarks/methods/results.md`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

# label -> (recipe overrides, learning rate). Learning rates are each method's usual range for a
# small model (adapters and prefixes take larger steps than whole-weight methods); none was tuned here.
METHODS = {
    "full": (["method.name=full"], 5e-5),
    "freeze": (["method.name=freeze", "method.freeze.layers=8"], 1e-4),
    "hft": (["method.name=hft"], 5e-5),
    "lora": (["method.name=lora"], 1e-3),
    "dora": (["method.name=lora", "method.lora.dora=true"], 1e-3),
    "lora+": (["method.name=lora", "method.lora.plus_ratio=16"], 2.5e-4),
    "pissa": (["method.name=lora", "method.lora.init=pissa"], 2.5e-4),
    # 1e-3 (LoRA's rate) was too high for values that act like full fine-tuning weights: final loss 0.46
    "sparse": (["method.name=sparse"], 2e-4),
    # SpIEL at LoRA's size: 4.6% of every linear weight = LoRA r=16's 4.88M trained values
    "sparse@lora-size": (["method.name=sparse", "method.sparse.density=0.046"], 2e-4),
    "adapter": (["method.name=adapter"], 1e-3),
    "houlsby": (["method.name=adapter", "method.adapter.form=sequential", "method.adapter.sublayers=[attn,ffn]",
                 "method.adapter.scale=1"], 1e-3),
    "prefix": (["method.name=prefix"], 5e-4),  # 1e-2 diverged (final loss 5.3) through the MLP reparameterisation
    "ia3": (["method.name=ia3"], 5e-3),
    "mam": (["method.name=mam"], 1e-3),
    "longlora": (["method.name=longlora"], 5e-4),
}


def general_text(path: Path, docs: int) -> Path:
    """Held-out English prose: the first `docs` documentation topics bundled with Python."""
    import pydoc_data.topics as topics

    with path.open("w") as f:
        for key in sorted(topics.topics)[:docs]:
            f.write(json.dumps({"text": topics.topics[key]}) + "\n")
    return path


def measure(model, tokenizer, args, text_file: Path) -> dict:
    """Task score, second-task score and general-text loss of a model."""
    import torch

    from tunesmith.objectives.sft import perplexity
    from tunesmith.eval.runner import evaluate, get_eval_task
    from tunesmith.runtime import autocast

    out = {}
    with autocast(model.device, "bf16"):
        sql = evaluate(model, tokenizer, get_eval_task("sql"), split="test", limit=args.sql_limit, max_new_tokens=64,
                       batch_size=16, progress=False)
        # two solved examples in the prompt show the format; the score is the share of fields right
        js = evaluate(model, tokenizer, get_eval_task("json"), split="test", limit=args.json_limit, shots=2,
                      max_new_tokens=96, batch_size=16, progress=False)
    out["sql"], out["json"] = sql.main, js.summary.get("mean_score", js.main)
    with torch.no_grad():
        out["text_loss"] = perplexity(model, tokenizer, str(text_file), max_length=512)["loss"]
    return out


def run_one(label: str, args, text_file: Path) -> dict:
    """Train one method (or measure the base model) in this process; return its row."""
    from tunesmith.infer.generate import load_for_inference
    from tunesmith.recipe import load_recipe
    from tunesmith.train.loop import train
    from tunesmith.runtime import set_threads

    set_threads(0)
    if label == "base":
        model, tok = load_for_inference("smollm2-135m-instruct")
        return {"method": "base", **measure(model, tok, args, text_file)}
    overrides, lr = METHODS[label]
    recipe = load_recipe(ROOT / "recipes/quickstart.yaml", [
        *overrides, f"train.lr={lr}", f"train.steps={args.steps}", "train.eval_every=0", "train.save_every=0",
        "eval.every=0", f"name=bench-{label.replace('+', 'plus').replace('@', '-at-')}", f"output_dir={args.runs}"])
    t = time.perf_counter()
    result = train(recipe)
    wall = time.perf_counter() - t
    if result.status != "completed":
        raise SystemExit(f"{label}: training stopped at step {result.step}")
    trainable, total = result.summary["trainable_parameters"], result.summary["parameters"]
    if (result.run_dir / "adapter").is_dir():
        model, tok = load_for_inference("smollm2-135m-instruct", adapter=str(result.run_dir / "adapter"))
    else:
        model, tok = load_for_inference(str(result.run_dir / "model"))
    row = {"method": label, "lr": lr, "trainable": trainable, "total": total, "train_s": wall,
           "tokens_per_s": result.summary["tokens_per_s"], "peak_mem_gb": result.summary["peak_mem_gb"],
           "final_loss": _last_loss(result.run_dir)}
    return {**row, **measure(model, tok, args, text_file)}


def _last_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return sum(losses[-5:]) / len(losses[-5:])


BASE_PARAMETERS = 134_515_008  # SmolLM2-135M-Instruct (tied embeddings counted once)


def table(rows: list[dict], args) -> str:
    """The markdown table; % is of the base model's parameters."""
    base = next(r for r in rows if r["method"] == "base")
    lines = [f"| method | sql accuracy | trainable | % | peak memory | tokens/s | train time | lr | final train loss | "
             f"Δ general-text loss | Δ json score |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| base model | {100 * base['sql']:.1f}% | — | — | — | — | — | — | — | "
             f"(loss {base['text_loss']:.3f}) | (score {100 * base['json']:.1f}%) |"]
    for r in rows:
        if r["method"] == "base":
            continue
        lines.append(
            f"| {r['method']} | {100 * r['sql']:.1f}% | {r['trainable']:,} | {100 * r['trainable'] / BASE_PARAMETERS:.2f} | "
            f"{r['peak_mem_gb']:.2f} GB | {r['tokens_per_s']:.0f} | {r['train_s']:.0f} s | {r['lr']:g} | {r['final_loss']:.3f} | "
            f"{r['text_loss'] - base['text_loss']:+.3f} | {100 * (r['json'] - base['json']):+.1f} points |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated labels (default: all)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of 1024 tokens for every method")
    p.add_argument("--sql-limit", type=int, default=60)
    p.add_argument("--json-limit", type=int, default=40)
    p.add_argument("--docs", type=int, default=40, help="general-text documents")
    p.add_argument("--runs", default=str(ROOT / "runs" / "bench-methods"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one method in this process
    p.add_argument("--out", default=str(HERE / "results.json"))
    p.add_argument("--table-only", action="store_true", help="rewrite results.md from results.json")
    args = p.parse_args()
    if args.table_only:
        return write_table(json.loads(Path(args.out).read_text()), args)
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    text_file = general_text(Path(args.runs) / "general_text.jsonl", args.docs)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args, text_file)), flush=True)
        return 0

    labels = ["base"] + [m for m in args.methods.split(",") if m]
    unknown = [m for m in labels[1:] if m not in METHODS]
    if unknown:
        p.error(f"unknown method label(s) {unknown}; choose from {', '.join(METHODS)}")
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.is_file() else []
    done = {r["method"] for r in rows}
    for label in labels:
        if label in done:
            print(f"[bench] {label}: already in {out}, skipped", flush=True)
            continue
        print(f"[bench] {label} ...", flush=True)
        cmd = [sys.executable, __file__, "--one", label, "--steps", str(args.steps), "--sql-limit", str(args.sql_limit),
               "--json-limit", str(args.json_limit), "--docs", str(args.docs), "--runs", args.runs]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not found:
            print(f"[bench] {label} failed:\n{proc.stderr[-3000:]}", flush=True)
            continue
        rows.append(json.loads(found[-1][len("RESULT "):]))
        out.write_text(json.dumps(rows, indent=1))
        print(f"[bench] {label}: {rows[-1]}", flush=True)
    return write_table(rows, args)


def write_table(rows: list[dict], args) -> int:
    md = HERE / "results.md"
    md.write_text(f"# Methods on `sql`, {args.steps} steps × 1024 tokens, SmolLM2-135M-Instruct\n\n"
                  f"Command: `python benchmarks/methods/run.py --steps {args.steps} --sql-limit {args.sql_limit} "
                  f"--json-limit {args.json_limit} --docs {args.docs}`\n\n{table(rows, args)}\n")
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
