"""The main job: prove on a fresh machine that tuning works.

    tunesmith quickstart            # or: make quickstart

Build the `sql` task → measure the base model on its test split → LoRA-tune it on the train split
(`recipes/quickstart.yaml`) → measure the tuned model → `runs/quickstart/report.md` with the
before/after table, loss curves, speed, memory, time per stage and answers before vs after.
"""
from __future__ import annotations

import time
from pathlib import Path

from .recipe import load_recipe

DEFAULT_RECIPE = "recipes/quickstart.yaml"


def quickstart(recipe_path: str | Path | None = None, overrides: list[str] | None = None) -> Path:
    """Run the whole job; returns the path of the report."""
    from .eval.runner import evaluate, format_summary, get_eval_task, save_result
    from .infer.generate import load_for_inference
    from .train.loop import train
    from .train.report import write_report
    from .runtime import peak_memory_gb, pick_device, set_threads

    recipe = load_recipe(recipe_path or DEFAULT_RECIPE, overrides)
    cfg = recipe.eval
    if not cfg.task:
        raise ValueError("the quickstart recipe needs eval.task")
    run_dir = recipe.run_dir
    stages: dict[str, float] = {}
    set_threads(recipe.train.threads)
    device = pick_device(recipe.train.device)

    t = time.perf_counter()
    task = get_eval_task(cfg.task, cfg.metric, seed=cfg.seed)
    n_test = len(task.examples("test"))
    stages["build task"] = time.perf_counter() - t
    print(f"[tunesmith] task {task.name}: {len(task.examples('train'))} train / {n_test} test examples")

    def measure(label: str, adapter=None):
        t = time.perf_counter()
        model, tok = load_for_inference(recipe.model.name, adapter, dtype=recipe.model.dtype)
        model.to(device)
        result = evaluate(model, tok, task, split="test", limit=cfg.limit, max_new_tokens=cfg.max_new_tokens,
                          batch_size=cfg.batch_size)
        save_result(result, run_dir / f"eval-{label}.json", model=recipe.model.name, adapter=str(adapter or ""))
        stages[f"evaluate {label}"] = time.perf_counter() - t
        print(f"--- {label} model ---\n{format_summary(result)}", flush=True)
        return result

    run_dir.mkdir(parents=True, exist_ok=True)
    base = measure("base")
    t = time.perf_counter()
    run = train(recipe)
    stages["train (LoRA)"] = time.perf_counter() - t
    if run.status != "completed":
        raise SystemExit(f"training stopped at step {run.step}; rerun with resume=true to finish")
    tuned = measure("tuned", run.run_dir / "adapter")

    sections = [before_after(base, tuned), stage_table(stages, peak_memory_gb(device)),
                plot_before_after(base, tuned, run_dir), examples_table(base, tuned)]
    report = write_report(run_dir, run.summary, sections)
    delta = 100 * (tuned.main - base.main)
    print(f"[tunesmith] {task.name} {tuned.metric}: base {100 * base.main:.1f}% → tuned {100 * tuned.main:.1f}% "
          f"({delta:+.1f} points) in {sum(stages.values()) / 60:.1f} min")
    print(f"[tunesmith] report: {report}")
    return report


def before_after(base, tuned) -> str:
    keys = [k for k in tuned.summary if k in ("accuracy", "mean_score") or k.startswith("pass@")]
    lines = [f"## Before and after: {tuned.task} ({tuned.split} split, {tuned.summary['examples']} questions)", "",
             "| metric | base | tuned | change |", "|---|---|---|---|"]
    for k in keys:
        b, a = base.summary[k], tuned.summary[k]
        lines.append(f"| {k} | {100 * b:.1f}% | {100 * a:.1f}% | {100 * (a - b):+.1f} points |")
    return "\n".join(lines)


def stage_table(stages: dict[str, float], peak_gb: float) -> str:
    lines = ["## Time per stage", "", "| stage | wall time |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} s |" for k, v in stages.items()]
    lines += [f"| **total** | **{sum(stages.values()):.0f} s** |", "", f"Peak memory of the whole job: {peak_gb:.2f} GB."]
    return "\n".join(lines)


def plot_before_after(base, tuned, run_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in tuned.summary if k in ("accuracy", "mean_score")]
    fig, ax = plt.subplots(figsize=(5, 3), dpi=110)
    x = range(len(keys))
    ax.bar([i - 0.2 for i in x], [100 * base.summary[k] for k in keys], 0.4, label="base")
    ax.bar([i + 0.2 for i in x], [100 * tuned.summary[k] for k in keys], 0.4, label="tuned")
    ax.set_xticks(list(x), keys)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "before_after.png")
    plt.close(fig)
    return "![before and after](before_after.png)"


def examples_table(base, tuned, n: int = 5) -> str:
    def cell(text: str) -> str:
        return (text or "").strip().replace("|", "\\|").replace("\n", " ")[:160]

    def mark(record: dict) -> str:
        return ("✅ " if record["correct"] else "❌ ") + cell(record["prediction"])

    lines = ["## Answers before and after", "", "| question | base | tuned |", "|---|---|---|"]
    for b, a in list(zip(base.records, tuned.records))[:n]:
        question = b["prompt"].strip().splitlines()[-1]
        lines.append(f"| {cell(question)} | {mark(b)} | {mark(a)} |")
    return "\n".join(lines)
