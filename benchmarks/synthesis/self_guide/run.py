"""SELF-GUIDE on the embedded SmolLM2-135M-Instruct: does training on its own synthetic data beat prompting?

    OMP_NUM_THREADS=1 python benchmarks/synthesis/self_guide/run.py     # json and intent: 6 min idle, 32 min under load
    python benchmarks/synthesis/self_guide/run.py --tasks json --rounds 2 --limit 10   # a quick look

For each task (the generation task `json`; the classification task `intent`), from its TASK.yaml in
examples/synth/ (the task's instruction, prompt shape and first three training examples), five
settings on the first `--limit` test examples, each scored with the task's own metric:
  - zero-shot and 3-shot prompting (the three demonstrations as earlier chat turns);
  - synthetic data in context: the demonstrations plus up to `--in-context` synthetic records as shots;
  - fine-tuned on synthetic: `tunesmith synth self-guide` (E = `--rounds` rounds of 10 inputs,
    `--samples` voted output samples each, the paper's filters and thresholds; LoRA r16, 3 epochs,
    the built-in settings), then measured like the others;
  - fine-tuned on the same number of gold training records (the same recipe).
The synthesis and the tuned models live under --work (default runs/bench-self-guide, resumable);
results.json (rows for the synthesis table) and results.md are written next to this file.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent.parent
MODEL = "smollm2-135m-instruct"


class InContext:
    """A task whose training examples (the ones `evaluate` draws shots from) are given ones."""

    def __init__(self, task, shots):
        self.task, self.shots = task, shots
        self.name, self.metric, self.system_prompt = task.name, task.metric, task.system_prompt

    def examples(self, split):
        return self.shots if split == "train" else self.task.examples(split)

    def score(self, prediction, example):
        return self.task.score(prediction, example)


def measure(model, tok, task, args, shots=0):
    from tunesmith.eval.runner import evaluate

    t = time.perf_counter()
    r = evaluate(model, tok, task, split="test", limit=args.limit, shots=shots, max_new_tokens=args.max_new[task.name],
                 batch_size=16, share_prefix=shots > 0, progress=False)
    print(f"  {task.name} shots={shots}: {r.metric} {100 * r.main:.1f}% ({time.perf_counter() - t:.0f} s)", flush=True)
    return r


def train_gold(spec, task, k: int, work: Path) -> tuple[dict, Path]:
    """LoRA on the first k gold training chats with the same recipe as the synthetic run."""
    from tunesmith.data.tasks import task_records
    from tunesmith.jsonl import write_jsonl
    from tunesmith.synth.self_guide import train_recipe
    from tunesmith.train.loop import train

    folder = work / "gold"
    done = folder / "tuned.json"
    if not done.is_file():
        write_jsonl(folder / "train.jsonl", task_records(task, "train")[:k])
        recipe = train_recipe(spec, folder / "train.jsonl", folder)
        t = time.perf_counter()
        run = train(recipe)
        done.write_text(json.dumps({"train_s": time.perf_counter() - t, "steps": run.step}))
    return json.loads(done.read_text()), folder / "train" / "adapter"


def run_task(name: str, args) -> list[dict]:
    from tunesmith.data.tasks.base import Example
    from tunesmith.eval.runner import get_eval_task
    from tunesmith.infer.generate import load_for_inference
    from tunesmith.synth.self_guide import read_rows, self_guide
    from tunesmith.synth.task_spec import load_task

    overrides = [f"synth.rounds={args.rounds}", f"synth.samples={args.samples}", f"eval.limit={args.limit}",
                 f"eval.max_new_tokens={args.max_new[name]}"]
    spec = load_task(ROOT / "examples" / "synth" / f"{name}.yaml", overrides)
    task, work = get_eval_task(name), Path(args.work) / name
    demos = task.examples("train")[:3]
    assert [spec.user_message(d.input) for d in spec.demonstrations] == [d.prompt for d in demos]

    model, tok = load_for_inference(MODEL)
    zero, three = measure(model, tok, task, args), measure(model, tok, task, args, shots=3)
    t = time.perf_counter()
    stats = self_guide(spec, work, model_name=MODEL, model=model, tokenizer=tok)
    wall = time.perf_counter() - t
    print(f"  self-guide: kept {stats['kept']}/{stats['generated']} {stats['dropped']}, "
          f"self-consistency {stats['outputs']['self_consistency_rate']}, tuned {stats['eval']} ({wall:.0f} s)", flush=True)
    synthetic = [Example(f"syn-{i}", r["messages"][-2]["content"], r["messages"][-1]["content"])
                 for i, r in enumerate(read_rows(work / "train.jsonl"))]
    k_ctx = min(args.in_context, len(synthetic))
    in_ctx = measure(model, tok, InContext(task, demos + synthetic[:k_ctx]), args, shots=3 + k_ctx)
    gold_run, adapter = train_gold(spec, task, max(stats["kept"], 1), work)
    gold_model, gold_tok = load_for_inference(MODEL, str(adapter))
    gold = measure(gold_model, gold_tok, task, args)

    command = f"OMP_NUM_THREADS=1 python benchmarks/synthesis/self_guide/run.py --tasks {name} --rounds {args.rounds} " \
              f"--samples {args.samples} --limit {args.limit}"
    base = {"method": "SELF-GUIDE", "task": name, "metric": zero.metric, "kept": None, "generated": None,
            "dropped": None, "generation_s": None, "samples_per_s": None, "train_s": None, "command": command}
    synth = {"kept": stats["kept"], "generated": stats["generated"], "dropped": stats["dropped"],
             "generation_s": round(stats["generation_s"], 1), "samples_per_s": round(stats["samples_per_s"] or 0, 3)}
    return [
        {**base, "setting": "zero-shot", "score": zero.main},
        {**base, "setting": "3-shot", "score": three.main},
        {**base, **synth, "setting": f"synthetic data in context (3 + {k_ctx} shots)", "score": in_ctx.main},
        {**base, **synth, "setting": "fine-tuned on synthetic", "score": stats["eval"]["score"] if stats["eval"] else None,
         "train_s": round(stats["train_s"], 1) if stats["train_s"] else None, "evidence": evidence(stats, work)},
        {**base, "setting": f"same budget of gold ({max(stats['kept'], 1)} records)", "score": gold.main,
         "kept": max(stats["kept"], 1), "train_s": round(gold_run["train_s"], 1)},
    ]


def evidence(stats: dict, work: Path) -> dict:
    """What says whether the model was big enough: consistency, labels, and (json) how often a kept
    answer is a well-formed order whose values all appear in its input."""
    from tunesmith.data.tasks.extract import FIELDS, first_json_object
    from tunesmith.synth.self_guide import read_rows

    out = {"self_consistency_rate": stats["outputs"]["self_consistency_rate"],
           "mean_majority_share": stats["outputs"]["mean_majority_share"],
           "output_samples_dropped": stats["outputs"]["samples_dropped"], "train_steps": stats["train_steps"]}
    if stats["type"] == "classification":
        out.update(labels=stats["labels"], target_label_agreement=stats["target_label_agreement"])
    elif stats["task"] == "json":
        rows = [r for r in read_rows(work / "outputs.jsonl") if r["kept"]]
        faithful = 0
        for r in rows:
            obj = first_json_object(r["vote"]["answer"]) or {}
            faithful += set(obj) == set(FIELDS) and all(str(v).lower() in r["input"].lower() for v in obj.values())
        out["kept_answers_faithful"] = faithful / len(rows) if rows else None
    return out


def write_markdown(rows: list[dict], args, wall: float) -> None:
    lines = ["# SELF-GUIDE on SmolLM2-135M-Instruct", "",
             f"`OMP_NUM_THREADS=1 python benchmarks/synthesis/self_guide/run.py --tasks {','.join(args.tasks)} "
             f"--rounds {args.rounds} --samples {args.samples} --limit {args.limit}` ({wall / 60:.1f} min on {platform.machine()} CPU, "
             f"torch {torch.__version__})", "",
             "| task | setting | score | kept / generated (dropped) | generation | training |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        kept = "" if r["generated"] is None else f"{r['kept']} / {r['generated']} ({_drops(r['dropped'])})"
        gen = "" if r["generation_s"] is None else f"{r['generation_s']:.0f} s, {r['samples_per_s']:.2f} samples/s"
        score = "n/a" if r["score"] is None else f"{100 * r['score']:.1f}% {r['metric']}"
        train_s = "" if r["train_s"] is None else f"{r['train_s']:.0f} s"
        lines.append(f"| {r['task']} | {r['setting']} | {score} | {kept} | {gen} | {train_s} |")
    lines += ["", "Evidence (fine-tuned rows):", ""]
    lines += [f"- {r['task']}: `{json.dumps(r['evidence'])}`" for r in rows if r.get("evidence")]
    old = (HERE / "results.md").read_text() if (HERE / "results.md").is_file() else ""
    notes = old[old.index(NOTES):] if NOTES in old else NOTES + "\n"
    (HERE / "results.md").write_text("\n".join(lines) + "\n\n" + notes)


def _drops(d) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) or "none"


NOTES = "## Notes"  # written by hand below the table; a new run keeps them


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="json,intent", help="comma-separated: json, intent")
    p.add_argument("--rounds", type=int, default=4, help="input-generation rounds E (10 inputs each; paper: 40)")
    p.add_argument("--samples", type=int, default=5, help="output samples per input for the vote (paper: 10)")
    p.add_argument("--limit", type=int, default=40, help="test examples per setting")
    p.add_argument("--in-context", type=int, default=8, help="synthetic records added as shots")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-self-guide"))
    args = p.parse_args()
    args.tasks = args.tasks.split(",")
    args.max_new = {"json": 64, "intent": 8}
    t = time.perf_counter()
    rows = [row for name in args.tasks for row in run_task(name, args)]
    wall = time.perf_counter() - t
    (HERE / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    write_markdown(rows, args, wall)
    print(f"wrote {HERE / 'results.json'} ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
