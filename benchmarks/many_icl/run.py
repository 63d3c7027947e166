"""Many-shot learning on `sql`: in-context prompting without training vs plain SFT vs ManyICL, each
measured at 0, 1, 4, 16 and as many shots as fit.

    python benchmarks/many_icl/run.py                          # ~1 h on a shared 2-core CPU
    python benchmarks/many_icl/run.py --train-examples 100 --limit 20 --epochs 1

Three arms on the embedded SmolLM2-135M-Instruct, all from `benchmarks/many_icl/sql.yaml` (LoRA r=16,
bf16 autocast, 2560-token steps, lr 1e-3 cosine):
  - base:     no training; the in-context curve alone;
  - sft:      LoRA SFT on the first N training questions, one question per sample, `--epochs` passes;
  - many_icl: LoRA on the SAME N questions as many-shot sequences (instruction + as many
              demonstrations as fit 2560 tokens, every answer trained), `--epochs` shuffled passes
              (objective.many_icl.repeats), so both arms train every answer equally often, on about
              the same tokens per step.
Each model is then measured by `evaluate_shots` (what `tunesmith eval --shots` runs) on the first
`--limit` test questions at 0,1,4,16,max shots, max = as many demonstrations as fit a context of
`--context` tokens (the ManyICL training length) with 64 new tokens. Every phase saves its training
(`train-<arm>.json`) and its curve (`curve-<arm>.json`) and is skipped when they exist, so an
interrupted run picks up where it stopped, and arms may run as parallel invocations (`--arms sft`).
Outputs: `results.json`, `results.md` (table), `curve.png`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SHOTS = "0,1,4,16,max"
ARMS = {  # arm -> recipe overrides (besides the shared ones)
    "sft": ["objective.name=sft"],
    "many_icl": ["objective.name=many_icl"],
}


def train_arm(arm: str, args, out: Path) -> dict:
    """Train one arm; return what the run did (steps, tokens, time, final loss)."""
    from tunesmith.recipe import load_recipe
    from tunesmith.train.loop import train
    from tunesmith.train.metrics import read_metrics

    passes = [f"train.epochs={args.epochs}"] if arm == "sft" else [f"objective.many_icl.repeats={args.epochs}"]
    overrides = [f"name={arm}", f"output_dir={out / 'runs'}", f"data.limit={args.train_examples}",
                 f"data.max_length={args.context}", f"train.batch_tokens={args.context}",
                 f"train.threads={args.threads}", *ARMS[arm], *passes]
    t0 = time.perf_counter()
    result = train(load_recipe(str(HERE / "sql.yaml"), overrides))
    wall = time.perf_counter() - t0
    rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    return {"run_dir": os.path.relpath(result.run_dir, ROOT), "status": result.status, "steps": result.step, "wall_s": wall,
            "tokens_per_s": result.summary.get("tokens_per_s"), "final_loss": rows[-1]["loss"] if rows else None,
            "overrides": overrides}


def eval_arm(arm: str, args, out: Path, run_dir: str | None):
    """The arm's model (the base, or its adapter) measured at every shot count; saved as curve-<arm>.json."""
    from tunesmith.eval.runner import get_eval_task
    from tunesmith.eval.shots import evaluate_shots, save_shots
    from tunesmith.infer.generate import load_for_inference

    import torch

    torch.set_num_threads(args.threads)  # a shared CPU: more threads than free cores wait on each other
    model, tokenizer = load_for_inference("smollm2-135m-instruct", run_dir and str(ROOT / run_dir), dtype="fp32")
    curve = evaluate_shots(model, tokenizer, get_eval_task("sql"), args.shots, split="test", limit=args.limit,
                           context=args.context, max_new_tokens=64, batch_size=args.batch_size)
    save_shots(curve, out / f"curve-{arm}.json", arm=arm, adapter=run_dir)
    return curve


def phase(arm: str, args, out: Path, info: dict):
    """Train (unless base) and evaluate one arm, or reuse what an earlier invocation saved."""
    from tunesmith.eval.shots import load_shots

    path = out / f"curve-{arm}.json"
    if path.exists():
        print(f"[bench] {arm}: reusing {path.name}", flush=True)
        return load_shots(path)
    run_dir = None
    if arm != "base":
        if arm not in info:  # trained by an earlier invocation (e.g. --train-only) otherwise
            info[arm] = train_arm(arm, args, out)
            (out / f"train-{arm}.json").write_text(json.dumps(info[arm], indent=1))  # arms may run in parallel
        run_dir = info[arm]["run_dir"]
    if args.train_only:
        return None
    t0 = time.perf_counter()
    curve = eval_arm(arm, args, out, run_dir)
    print(f"[bench] {arm}: {curve.points()} in {time.perf_counter() - t0:.0f} s", flush=True)
    return curve


def write_results(curves: dict, info: dict, args, out: Path) -> None:
    """results.json, the markdown table and the curve."""
    from tunesmith.eval.shots import plot_shot_curves

    shots = [k for k, _ in next(iter(curves.values())).points()]
    top = next(iter(curves.values())).max_shots
    head = "| model | " + " | ".join(f"max={k}" if k == top else f"{k} shots" for k in shots) + " |"
    lines = [head, "|---" * (len(shots) + 1) + "|"]
    for arm, curve in curves.items():
        lines.append(f"| {arm} | " + " | ".join(f"{100 * v:.1f}%" for _, v in curve.points()) + " |")
    prompt = " | ".join(f"{r.summary['prompt_tokens']:.0f}" for r in next(iter(curves.values())).results)
    lines.append(f"| *prompt tokens (mean)* | {prompt} |")
    train_rows = ["| arm | steps | train time | tokens/s | final train loss |", "|---|---:|---:|---:|---:|"]
    for arm, t in info.items():
        train_rows.append(f"| {arm} | {t['steps']} | {t['wall_s']:.0f} s | {t['tokens_per_s'] or 0:.0f} | "
                          f"{t['final_loss']:.3f} |")
    command = "python benchmarks/many_icl/run.py " + " ".join(sys.argv[1:])
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), torch CPU"
    (out / "results.json").write_text(json.dumps({
        "command": command, "machine": machine, "train": info,
        "curves": {arm: {"points": c.points(), "max_shots": c.max_shots, "context": c.context}
                   for arm, c in curves.items()}}, indent=1))
    plot_shot_curves(curves, out / "curve.png")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n\n" + "\n".join(train_rows) + "\n")
    print(table + "\n\n" + "\n".join(train_rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-examples", type=int, default=160, help="training questions (the same for both arms)")
    parser.add_argument("--epochs", type=int, default=2, help="passes over them (SFT epochs = ManyICL repeats)")
    parser.add_argument("--limit", type=int, default=20, help="test questions measured")
    parser.add_argument("--context", type=int, default=2560, help="tokens a prompt and its answer may take (max shots); also the ManyICL sequence length and "
                             "the tokens of a training step")
    parser.add_argument("--shots", default=SHOTS, help="shot counts measured (16 needs --context >= ~2100)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (training and evaluation)")
    parser.add_argument("--arms", default="base,sft,many_icl")
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--train-only", action="store_true", help="train the arms now, measure them later")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {p.stem[len("train-"):]: json.loads(p.read_text()) for p in sorted(out.glob("train-*.json"))}
    curves = {arm: phase(arm, args, out, info) for arm in args.arms.split(",")}
    if not args.train_only:
        write_results(curves, info, args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
