"""Every tuning method on the same task with the same budget, and what each one forgets.

    python benchmarks/methods/run.py                   # all methods (~1 h on a 2-core CPU)
    python benchmarks/methods/run.py --methods lora,hft --steps 30
    python benchmarks/methods/run.py --task intent     # another built-in task: results-intent.json/.md

Each method fine-tunes the embedded SmolLM2-135M-Instruct on a built-in task (`--task`, default
`sql`) with `recipes/quickstart.yaml` (bf16 autocast, packed 1024-token steps; its data and eval
task swapped for `--task`; `--precision fp32` for a CPU without native bf16) for the same number
of steps, then the tuned model is measured on
  - the task: its main metric on test questions, zero-shot (`sql`: execution accuracy);
  - forgetting, as the change from the base model in
      · loss on held-out general text (English prose from Python's bundled documentation topics,
        `pydoc_data`, which every Python install ships and no method trains on), and
      · score on a second, unrelated task (`json` extraction, two-shot, share of fields right; when
        `--task json`, `intent` classification, two-shot, accuracy).
Every method runs in its own process, so peak memory is its own. Results of `sql` go to
`benchmarks/methods/results.json` and the table to `results.md`; of another task to
`results-<task>.json` and `results-<task>.md`, so the `sql` figures stay reproducible.
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
    """Task score, second-task score and general-text loss of a model, keyed by the tasks' names.
    `--json-limit 0` / `--docs 0` skip the two forgetting measures (None): on a shared CPU the
    two-shot second task costs as much time as the task itself."""
    import torch

    from tunesmith.objectives.sft import perplexity
    from tunesmith.eval.runner import evaluate, get_eval_task
    from tunesmith.runtime import autocast

    other = forget_task(args.task)
    out = {other: None, "text_loss": None}
    with autocast(model.device, args.precision):
        main = evaluate(model, tokenizer, get_eval_task(args.task), split="test", limit=args.limit,
                        max_new_tokens=MAX_NEW_TOKENS[args.task], batch_size=16, progress=False)
        out[args.task] = main.main
        if args.json_limit > 0:  # two solved examples in the prompt show the format; json: share of fields right
            js = evaluate(model, tokenizer, get_eval_task(other), split="test", limit=args.json_limit, shots=2,
                          max_new_tokens=MAX_NEW_TOKENS[other], batch_size=16, progress=False)
            out[other] = js.summary.get("mean_score", js.main)
    if args.docs > 0:
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
        *task_overrides(args.task), *precision_overrides(args.precision), *overrides, f"train.lr={lr}",
        f"train.steps={args.steps}", "train.eval_every=0", "train.save_every=0", "eval.every=0",
        f"name={run_name(label, args.task)}", f"output_dir={args.runs}"])
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


def task_overrides(task: str) -> list[str]:
    """Recipe overrides that tune on `task`: none for sql, the recipe's own task, so its runs stay as they were."""
    if task == "sql":
        return []
    return [f"data.train=task:{task}/train", f"data.validation=task:{task}/validation", f"eval.task={task}"]


def precision_overrides(precision: str) -> list[str]:
    """fp32 training and scoring for a CPU without native bf16 (no avx512_bf16/AMX), where bf16 autocast is
    emulated and several times slower; the recipe's bf16 otherwise."""
    return ["train.precision=fp32", "model.frozen_dtype=same"] if precision == "fp32" else []


def run_name(label: str, task: str) -> str:
    """The run directory's name: sql keeps its historical `bench-<label>`, other tasks get their own."""
    stem = "bench" if task == "sql" else f"bench-{task}"
    return f"{stem}-{label.replace('+', 'plus').replace('@', '-at-')}"


def _last_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return sum(losses[-5:]) / len(losses[-5:])


# Generation budget per task: enough for the longest gold answer, no more (decoding dominates eval time).
MAX_NEW_TOKENS = {"sql": 64, "json": 96, "intent": 16}
TASK_METRIC = {"sql": "accuracy", "json": "exact match", "intent": "accuracy"}


def forget_task(task: str) -> str:
    """The unrelated task whose score change measures forgetting: `json`, or `intent` for `json` itself."""
    return "intent" if task == "json" else "json"


BASE_PARAMETERS = 134_515_008  # SmolLM2-135M-Instruct (tied embeddings counted once)


def table(rows: list[dict], args) -> str:
    """The markdown table; % is of the base model's parameters."""
    task, other = args.task, forget_task(args.task)
    base = next(r for r in rows if r["method"] == "base")
    lines = [f"| method | {task} {TASK_METRIC[task]} | trainable | % | peak memory | tokens/s | train time | lr | "
             f"final train loss | Δ general-text loss | Δ {other} score |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| base model | {100 * base[task]:.1f}% | — | — | — | — | — | — | — | "
             f"{_num(base['text_loss'], '(loss {:.3f})')} | {_num(base[other], '(score {:.1%})')} |"]
    for r in rows:
        if r["method"] == "base":
            continue
        lines.append(
            f"| {r['method']} | {100 * r[task]:.1f}% | {r['trainable']:,} | {100 * r['trainable'] / BASE_PARAMETERS:.2f} | "
            f"{r['peak_mem_gb']:.2f} GB | {r['tokens_per_s']:.0f} | {r['train_s']:.0f} s | {r['lr']:g} | {r['final_loss']:.3f} | "
            f"{_diff(r['text_loss'], base['text_loss'], '{:+.3f}')} | "
            f"{_diff(r[other], base[other], '{:+.1f} points', 100)} |")
    return "\n".join(lines)


def _num(value, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def _diff(value, base, fmt: str, scale: float = 1.0) -> str:
    """A change from the base model, or — where either was not measured (--json-limit 0, --docs 0)."""
    return "—" if value is None or base is None else fmt.format(scale * (value - base))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated labels (default: all)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of 1024 tokens for every method")
    p.add_argument("--task", default="sql", help="built-in task to tune on and score (default: sql)")
    p.add_argument("--limit", "--sql-limit", dest="limit", type=int, default=60, help="test questions of --task")
    p.add_argument("--json-limit", type=int, default=40, help="second-task questions (0: skip that measure)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                   help="training and scoring precision (bf16: the recipe's; fp32 for CPUs without native bf16)")
    p.add_argument("--docs", type=int, default=40, help="general-text documents (0: skip that measure)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "bench-methods"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one method in this process
    p.add_argument("--out", default=None, help="results JSON (default: results.json for sql, results-<task>.json)")
    p.add_argument("--table-only", action="store_true", help="rewrite results.md from results.json")
    args = p.parse_args()
    if args.task not in MAX_NEW_TOKENS:
        p.error(f"--task {args.task}: this benchmark scores only {', '.join(MAX_NEW_TOKENS)}")
    args.out = args.out or str(HERE / ("results.json" if args.task == "sql" else f"results-{args.task}.json"))
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
        cmd = [sys.executable, __file__, "--one", label, "--task", args.task, "--precision", args.precision,
               "--steps", str(args.steps),
               "--limit", str(args.limit),
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
    md = Path(args.out).with_suffix(".md")
    task_arg = ("" if args.task == "sql" else f" --task {args.task}") + \
        ("" if args.precision == "bf16" else f" --precision {args.precision}")
    limit_arg = "--sql-limit" if args.task == "sql" else "--limit"  # the sql results were made with this spelling
    md.write_text(f"# Methods on `{args.task}`, {args.steps} steps × 1024 tokens, SmolLM2-135M-Instruct\n\n"
                  f"Command: `python benchmarks/methods/run.py{task_arg} --steps {args.steps} {limit_arg} {args.limit} "
                  f"--json-limit {args.json_limit} --docs {args.docs}`\n\n{table(rows, args)}\n")
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
