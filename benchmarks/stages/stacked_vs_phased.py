"""Stacked vs phased training of the embedded SmolLM2-135M-Instruct (LoRA) on two built-in tasks,
the comparison of the small-LLM SFT study (methods.md §12), through recipe `stages:`.

    python benchmarks/stages/stacked_vs_phased.py --steps 20 --batch-tokens 1024 --lr 1e-3 --n 64 --limit 40

phased:  stage `json` (task:json/train, N steps), then stage `sql` (task:sql/train, N steps)
stacked: one run over task:json/train+task:sql/train for 2N steps (`stage_mode=stacked`)
Both under the same train section (--lr, constant, no warm-up, --batch-tokens micro-batches), so each
sees the same number of tokens. Measured: the loss (nats per answer token) on the first --n
validation examples of each task, and greedy accuracy on the first --limit test questions of each
(execution accuracy for sql, exact match for json), for the base model, after phased stage 1, after
phased, and stacked. Writes --results (results.json beside this script); results.md is written from it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tunesmith.config import DataConfig
from tunesmith.data import collate, load_data
from tunesmith.eval.runner import evaluate, get_eval_task
from tunesmith.export.tuned import load_tuned
from tunesmith.models.load import load_model
from tunesmith.recipe import load_recipe
from tunesmith.train.loop import train
from tunesmith.train.step import mean_loss

HERE = Path(__file__).parent
MODEL = "smollm2-135m-instruct"


def recipe(out: Path, steps: int, mode: str, batch_tokens: int, lr: float):
    return load_recipe(None, [
        f"name={mode}", f"output_dir={out}", f"model.name={MODEL}", "model.frozen_dtype=bf16",
        "data.train=task:json/train", "data.max_length=256", "data.val_fraction=0", "method.name=lora",
        "method.lora.rank=16", "method.lora.alpha=32", "method.lora.dropout=0", f"train.lr={lr}",
        "train.schedule=constant", "train.warmup=0", f"train.batch_tokens={batch_tokens}",
        f"train.steps={2 * steps}", "train.save_every=0", f"stage_mode={mode}",
        f"stages=[{{name: json, data: {{train: 'task:json/train'}}, train: {{steps: {steps}}}}}, "
        f"{{name: sql, data: {{train: 'task:sql/train'}}, train: {{steps: {steps}}}}}]"])


def task_scores(adapter: Path | None, task: str, tokenizer, n: int, limit: int) -> dict:
    """Validation loss and test accuracy of the base model with `adapter` on one task."""
    model, _ = load_model(MODEL, "fp32")
    if adapter is not None:
        load_tuned(model, adapter)
    model.eval()
    result = evaluate(model, tokenizer, get_eval_task(task), split="test", limit=limit, max_new_tokens=96,
                      batch_size=8, progress=False)
    return {"loss": task_loss(model, task, tokenizer, n), "accuracy": result.main}


def task_loss(model, task: str, tokenizer, n: int) -> float:
    samples = load_data(DataConfig(train=f"task:{task}/validation", limit=n, max_length=256), tokenizer,
                        report=False).train
    batches = [collate(samples[i:i + 16], packing=False, pad_id=tokenizer.pad_token_id)
               for i in range(0, len(samples), 16)]
    return mean_loss(model, batches, torch.device("cpu"), "fp32")[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20, help="steps per phased stage")
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--n", type=int, default=64, help="validation examples per task (loss)")
    ap.add_argument("--limit", type=int, default=40, help="test questions per task (accuracy)")
    ap.add_argument("--out", default="runs/bench-stages", help="where the runs go")
    ap.add_argument("--results", default=str(HERE / "results.json"), help="where the figures go")
    args = ap.parse_args()
    out = Path(args.out)
    results = {"args": vars(args), "runs": {}}
    walls = {}
    for mode in ("phased", "stacked"):
        t0 = time.perf_counter()
        job = train(recipe(out, args.steps, mode, args.batch_tokens, args.lr))
        walls[mode] = time.perf_counter() - t0
        assert job.status == "completed", job
    _, tokenizer = load_model(MODEL, "fp32")
    points = {"base": None, "phased, after stage json": out / "phased" / "json" / "adapter",
              "phased (json → sql)": out / "phased" / "sql" / "adapter", "stacked (json + sql)": out / "stacked" / "stacked" / "adapter"}
    for label, adapter in points.items():
        results["runs"][label] = {t: task_scores(adapter, t, tokenizer, args.n, args.limit) for t in ("json", "sql")}
        print(label, results["runs"][label], flush=True)
    results["wall_s"] = walls
    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
