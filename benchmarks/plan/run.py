"""Does `tunesmith plan` pick what full runs pick? Its ranking against the methods benchmark's ground truth.

    python benchmarks/plan/run.py --task sql       # plan over the methods benchmark's candidates, compare
    python benchmarks/plan/run.py --task intent
    python benchmarks/plan/run.py --table-only     # rewrite results.md from the results-<task>.json files

The methods benchmark (`benchmarks/methods/`) fine-tuned every method for the same 40 steps and scored
each on the task's test questions: that is the ground truth. Here `tunesmith plan` is given exactly the
same candidates (each method with the benchmark's overrides and learning rate, as a `--candidates`
file), the same recipe and task, and a final-run budget equal to a full run's, and its ranking is
compared with the full runs': is its top pick among the three best full runs, how well do its ranks and
predicted losses order the task scores (Spearman), and what did the pilots cost against the full runs.

The plan ranks by predicted loss at the steps its time budget allows each candidate, from its pilots'
measured step times; the full runs all ran 40 steps. So each candidate's fitted curve is also read at
exactly 40 steps (`loss@40`), the like-for-like prediction. Results: `results-<task>.json` and one
table per task in `results.md`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RECIPE = "recipes/quickstart.yaml"  # the methods benchmark's recipe, relative to the repository root
FULL_STEPS = 40  # the methods benchmark's budget, in steps, for every method


def methods_module():
    """The methods benchmark's script, for its candidate set (METHODS) and task overrides."""
    spec = importlib.util.spec_from_file_location("methods_bench", ROOT / "benchmarks/methods/run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ground_truth(task: str) -> list[dict]:
    """The methods benchmark's rows for `task` (base model excluded)."""
    path = ROOT / "benchmarks/methods" / ("results.json" if task == "sql" else f"results-{task}.json")
    if not path.is_file():
        raise SystemExit(f"no ground truth for `{task}`: run benchmarks/methods/run.py --task {task} first "
                         f"({path.name})")
    return [r for r in json.loads(path.read_text()) if r["method"] != "base"]


def plan_label(method: str) -> str:
    """A candidate label the planner accepts as a folder name (`sparse@lora-size` -> `sparse-at-lora-size`)."""
    return method.replace("@", "-at-")


def candidate_list(rows: list[dict], methods: dict) -> list[dict]:
    """The benchmark's candidates, in its order: {label, overrides: {key: value}} with its learning rate."""
    import yaml

    out = []
    for r in rows:
        strings, lr = methods[r["method"]]
        overrides = {}
        for s in strings:
            key, value = s.split("=", 1)
            overrides[key] = yaml.safe_load(value)
        overrides["train.lr"] = r.get("lr", lr)
        out.append({"label": plan_label(r["method"]), "overrides": overrides})
    return out


def run_plan(task: str, rows: list[dict], args) -> tuple[Path, list[str], float]:
    """Write the candidate file and run `tunesmith plan` over it (resumable: the same command continues).
    Without --time the final-run budget is 40 steps at this machine's estimated speed: a first plan
    with --no-pilots gives every candidate's estimated step time, and the budget is 40 × their median."""
    import yaml

    bench = methods_module()
    cand_file = HERE / f"candidates-{task}.yaml"
    cand_file.write_text(yaml.safe_dump(candidate_list(rows, bench.METHODS), sort_keys=False))
    out = Path(args.plans) / task
    common = [RECIPE, *bench.task_overrides(task), *bench.precision_overrides(args.precision),
              "--candidates", str(cand_file.relative_to(ROOT))]
    budget = args.time
    if budget is None:
        _plan([*common, "--no-pilots", "--time", "1h", "--out", f"{out}-estimates"], args)
        state = json.loads(_abs(Path(f"{out}-estimates")).joinpath("plan.json").read_text())
        budget = FULL_STEPS * statistics.median(c["estimate"]["step_s"] for c in state["candidates"]
                                                if (c.get("estimate") or {}).get("step_s"))
    cmd = [*common, "--time", f"{budget:.0f}s", "--pilot-time", args.pilot_time, "--out", str(out)]
    if args.pilot_steps:
        cmd += ["--pilot-steps", str(args.pilot_steps)]
    _plan(cmd, args)
    return _abs(out), ["tunesmith", "plan", *cmd], budget


def _abs(path: Path) -> Path:
    return path if path.is_absolute() else ROOT / path


def _plan(cmd: list[str], args) -> None:
    print("[planval] tunesmith plan " + " ".join(cmd), flush=True)
    if args.compare_only:
        return
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "plan", *cmd], cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"tunesmith plan exited with {proc.returncode}; rerun to continue it")


def loss_at(prediction: dict | None, steps: int):
    """The candidate's fitted curve L(t) = a + b·t^-c (+ its validation gap) read at `steps`, or None."""
    if not prediction or prediction.get("a") is None:
        return None
    return prediction["a"] + prediction["b"] * steps ** -prediction["c"] + (prediction.get("gap") or 0.0)


def ranks(values: list[float], descending: bool = False) -> list[float]:
    """1-based ranks, ties sharing their average rank (what Spearman's coefficient needs)."""
    order = sorted(range(len(values)), key=lambda i: -values[i] if descending else values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on tie-averaged ranks); None under 3 pairs or a constant side."""
    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def compare(task: str, rows: list[dict], plan_dir: Path) -> dict:
    """Join the plan's candidates with the full runs: per-candidate rows and the verdict."""
    state = json.loads((plan_dir / "plan.json").read_text())
    by_label = {c["label"]: c for c in state["candidates"]}
    truth_rank = ranks([r[task] for r in rows], descending=True)
    table = []
    for r, gt_rank in zip(rows, truth_rank):
        c = by_label.get(plan_label(r["method"]), {})
        pilot = c.get("pilot") or {}
        table.append({
            "method": r["method"], "plan_rank": c.get("rank"), "predicted_loss": c.get("predicted_final_loss"),
            "steps_in_budget": c.get("steps_in_budget"), f"loss@{FULL_STEPS}": loss_at(c.get("prediction"), FULL_STEPS),
            "pilot_steps": pilot.get("steps_run"), "pilot_rung": pilot.get("rung"),
            "stopped_early": bool(pilot.get("stopped_early")),
            "reason": pilot.get("reason"), "fits": c.get("fits"), "score": r[task], "truth_rank": gt_rank,
            "full_final_loss": r.get("final_loss"), "full_train_s": r.get("train_s")})
    rank_at_full(table)
    return {"task": task, "rows": table, "verdict": verdict(table), "pilot_wall_s": state.get("pilot_wall_s"),
            "full_runs_s": sum(r["train_s"] for r in rows), "winner": state.get("winner"),
            "pilot_steps_total": sum(t["pilot_steps"] or 0 for t in table), "full_steps_total": FULL_STEPS * len(rows)}


def rank_at_full(table: list[dict]) -> None:
    """`rank@40`: the plan's own ordering (pilots that ran every rung first, then those stopped early,
    later rungs first; within each, by predicted loss) with every loss read at the full runs' 40 steps
    instead of at the steps its time budget gives each candidate — the like-for-like budget."""
    def key(t):
        loss = t[f"loss@{FULL_STEPS}"]
        return (t["stopped_early"], -(t["pilot_rung"] if t["pilot_rung"] is not None else -1),
                math.inf if loss is None else loss)
    ranked = sorted((t for t in table if t["fits"]), key=key)
    for t in table:
        t[f"rank@{FULL_STEPS}"] = ranked.index(t) + 1 if t in ranked else None


def verdict(table: list[dict]) -> dict:
    """Top pick in the full runs' top 3 (ties at third place count as top 3), and the rank correlations."""
    ranked = [t for t in table if t["plan_rank"] is not None]
    top = min(ranked, key=lambda t: t["plan_rank"]) if ranked else None
    third = sorted((t["score"] for t in table), reverse=True)[:3][-1]
    predicted = [t for t in table if t["predicted_loss"] is not None]
    at_full = [t for t in table if t[f"loss@{FULL_STEPS}"] is not None]
    by40 = next((t for t in table if t[f"rank@{FULL_STEPS}"] == 1), None)

    def rho(rows, key):  # lower loss / better plan rank should go with a higher score: report agreement as +
        return spearman([-t[key] for t in rows], [t["score"] for t in rows])
    return {
        "top_pick": top and top["method"], "top_pick_truth_rank": top and top["truth_rank"],
        "top_pick_in_top3": bool(top and top["score"] >= third),
        "top_at_40": by40 and by40["method"], "top_at_40_in_top3": bool(by40 and by40["score"] >= third),
        "spearman_rank@40": rho([t for t in table if t[f"rank@{FULL_STEPS}"]], f"rank@{FULL_STEPS}"),
        "spearman_plan_rank": rho(ranked, "plan_rank"), "n_ranked": len(ranked),
        "spearman_predicted_loss": rho(predicted, "predicted_loss"), "n_predicted": len(predicted),
        f"spearman_loss@{FULL_STEPS}": rho(at_full, f"loss@{FULL_STEPS}"), "n_at_full": len(at_full),
        "truth_top3": [t["method"] for t in sorted(table, key=lambda t: -t["score"]) if t["score"] >= third]}


def _f(value, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def markdown(result: dict) -> str:
    """One task's table and verdict."""
    v, task = result["verdict"], result["task"]
    lines = [f"## `{task}`", "", f"Command: `{result['command']}` (final-run budget {result['budget_s']:.0f} s)", "",
             f"| candidate | plan rank | predicted loss (at steps) | rank@{FULL_STEPS} | loss@{FULL_STEPS} | pilot | "
             f"{task} score | full-run rank |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for t in sorted(result["rows"], key=lambda t: (t["plan_rank"] is None, t["plan_rank"] or 0)):
        pilot = "did not fit" if t["fits"] is False else _f(t["pilot_steps"], "{} steps") + (
            f", stopped: {t['reason']}" if t["stopped_early"] else "")
        lines.append(f"| {t['method']} | {_f(t['plan_rank'], '{}')} | {_f(t['predicted_loss'], '{:.3f}')} "
                     f"({_f(t['steps_in_budget'], '{}')}) | {_f(t[f'rank@{FULL_STEPS}'], '{}')} | "
                     f"{_f(t[f'loss@{FULL_STEPS}'], '{:.3f}')} | {pilot} | "
                     f"{100 * t['score']:.1f}% | {t['truth_rank']:g} |")
    pilot_s = result["pilot_wall_s"]
    lines += ["", f"- Top pick **{v['top_pick']}**: full-run rank {_f(v['top_pick_truth_rank'], '{:g}')} — "
              f"{'in' if v['top_pick_in_top3'] else 'not in'} the top 3 ({', '.join(v['truth_top3'])}).",
              f"- Top pick at {FULL_STEPS} steps (rank@{FULL_STEPS}): **{v['top_at_40']}** — "
              f"{'in' if v['top_at_40_in_top3'] else 'not in'} the top 3; Spearman of rank@{FULL_STEPS} with the "
              f"score {_f(v[f'spearman_rank@{FULL_STEPS}'], '{:+.2f}')}.",
              f"- Spearman with the {task} score: plan rank {_f(v['spearman_plan_rank'], '{:+.2f}')} "
              f"(n={v['n_ranked']}), predicted loss {_f(v['spearman_predicted_loss'], '{:+.2f}')} "
              f"(n={v['n_predicted']}), loss@{FULL_STEPS} {_f(v[f'spearman_loss@{FULL_STEPS}'], '{:+.2f}')} "
              f"(n={v['n_at_full']}); + means lower loss / better rank went with a higher score.",
              f"- Pilots {_f(pilot_s, '{:.0f}')} s in all against {result['full_runs_s']:.0f} s for the full runs' "
              f"training ({_f(pilot_s and pilot_s / result['full_runs_s'], '{:.0%}')}); in steps, which do not "
              f"depend on the machine: {result['pilot_steps_total']} against {result['full_steps_total']} "
              f"({result['pilot_steps_total'] / result['full_steps_total']:.0%})."]
    return "\n".join(lines)


def write_tables() -> None:
    parts = [json.loads(p.read_text()) for p in sorted(HERE.glob("results-*.json"))]
    text = "# `tunesmith plan` against full runs\n\n" + "\n\n".join(markdown(r) for r in parts) + "\n"
    (HERE / "results.md").write_text(text)
    print(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="sql", help="a task the methods benchmark has results for (default: sql)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of the ground truth's methods (default: all it has)")
    p.add_argument("--time", type=float, default=None,
                   help="final-run budget in seconds (default: the median full run's training time)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                   help="as the methods benchmark's --precision: fp32 on a CPU without native bf16")
    p.add_argument("--pilot-time", default="5m", help="passed to tunesmith plan")
    p.add_argument("--pilot-steps", type=int, default=None, help="passed to tunesmith plan")
    p.add_argument("--plans", default="runs/plan-bench", help="plan folders, one per task")
    p.add_argument("--compare-only", action="store_true", help="compare an existing plan; run nothing")
    p.add_argument("--table-only", action="store_true", help="rewrite results.md from results-<task>.json")
    args = p.parse_args()
    if not args.table_only:
        rows = ground_truth(args.task)
        if args.methods:
            wanted = args.methods.split(",")
            missing = sorted(set(wanted) - {r["method"] for r in rows})
            if missing:
                raise SystemExit(f"--methods: no {args.task} ground truth for {', '.join(missing)}")
            rows = [r for r in rows if r["method"] in wanted]
        plan_dir, cmd, budget = run_plan(args.task, rows, args)
        result = {"command": "python benchmarks/plan/run.py " + " ".join(sys.argv[1:]),
                  "plan_command": " ".join(cmd), "budget_s": budget, **compare(args.task, rows, plan_dir)}
        (HERE / f"results-{args.task}.json").write_text(json.dumps(result, indent=1))
    write_tables()
    return 0


if __name__ == "__main__":
    sys.exit(main())
