"""LiST self-training benchmark: the `intent` task (8 labels) with the embedded SmolLM2-135M-Instruct on a CPU.

    OMP_NUM_THREADS=2 nice -n 5 python benchmarks/synthesis/self_train/run.py --rounds 1 --pool 64 --limit 32 \
        --validation 8 --teacher-steps 10 --student-steps 10

(these are the defaults; about 30 minutes on a 2-core CPU shared with other jobs). The
warm-start row of results.md comes from `tunesmith synth self-train --warm-start` run afterwards
(the command is in results.md).

Rows, all accuracy (%) on the same first `--limit` test questions of `intent` (a class-balanced
prefix; phrasings and slot values never seen in training), classified the way LiST (and LM-BFF's
prompt-based fine-tuning) classify: the label whose answer tokens the model scores highest
(`synth.self_train.label_accuracy`; no generation, so a chatty base model is not penalised for
its wording):
- zero-shot and `--shots`-shot prompting with the K gold examples (the paper's prompting baselines);
- pseudo-labels in context: `--shots` of the first teacher's most confident pseudo-labels
  (round-robin over the predicted labels) as demonstrations;
- the teacher: a LoRA adapter on the K labelled examples (prompt-based fine-tuning);
- the LiST student after each round (`tunesmith synth self-train`: confidence-weighted,
  class-balanced pseudo-labels of the `--pool` unlabelled questions plus the K gold ones);
- the same budget of gold labels: an adapter trained the students' way on the K + pool questions
  with their true labels (the upper bound the paper compares to).
Results: benchmarks/synthesis/self_train/results.json (rows per the synthesis table) and results.md.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
MODEL = "smollm2-135m-instruct"


def row(setting: str, acc: float, command: str, stats: dict | None = None, train_s=None, **extra) -> dict:
    s = stats or {}
    return {"method": "LiST self-training", "task": "intent", "setting": setting, "metric": "accuracy (%)",
            "score": round(100 * acc, 1), "kept": s.get("kept"), "generated": s.get("generated"),
            "dropped": s.get("dropped"), "generation_s": round(s["generation_s"], 1) if s.get("generation_s") else None,
            "samples_per_s": round(s["samples_per_s"], 2) if s.get("samples_per_s") else None,
            "train_s": round(train_s, 1) if train_s else None, "command": command, **extra}


def accuracy(model, tok, task, args, demos=()) -> float:
    """Closed-set accuracy on the first --limit test questions: the best-scored label word, after `demos`."""
    from tunesmith.synth.self_train import label_accuracy

    t0 = time.perf_counter()
    acc = label_accuracy(model, tok, task, task.examples("test")[:args.limit], list(task.labels), demos=demos,
                         progress=False)
    print(f"  accuracy {100 * acc:.1f}% ({time.perf_counter() - t0:.0f} s)", flush=True)
    return acc


def confident_shots(pseudo_path: Path, task, labels, k: int):
    """The k most confident pseudo-labelled pool questions, round-robin over the predicted labels."""
    rows = [json.loads(x) for x in pseudo_path.read_text().splitlines()]
    by_label = {lab: sorted((r for r in rows if r["label"] == lab), key=lambda r: -r["confidence"]) for lab in labels}
    picked = []
    while len(picked) < k and any(by_label.values()):
        picked += [by_label[lab].pop(0) for lab in labels if by_label[lab]][:k - len(picked)]
    return [(r["question"], r["label"]) for r in picked]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labelled", type=int, default=16)
    p.add_argument("--pool", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--limit", type=int, default=32)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--teacher-steps", type=int, default=10)
    p.add_argument("--student-steps", type=int, default=10)
    p.add_argument("--batch-tokens", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--validation", type=int, default=8)
    p.add_argument("--out", default="runs/bench-self-train")
    args = p.parse_args()
    command = "python benchmarks/synthesis/self_train/run.py " + shlex.join(sys.argv[1:])
    t_start = time.perf_counter()

    from tunesmith.data.tasks import get_task
    from tunesmith.infer.generate import load_for_inference
    from tunesmith.synth.self_train import SelfTrainConfig, _record, self_train, train_adapter

    task = get_task("intent")
    labels = list(task.labels)
    out = Path(args.out)
    cfg = SelfTrainConfig(labelled=args.labelled, pool=args.pool, rounds=args.rounds, validation=args.validation,
                          teacher_steps=args.teacher_steps, student_steps=args.student_steps,
                          batch_tokens=args.batch_tokens, lr=args.lr)
    rows = []

    print("== base model: zero-shot and k-shot prompting", flush=True)
    model, tok = load_for_inference(MODEL)
    rows.append(row("zero-shot", accuracy(model, tok, task, args), command))
    gold_demos = [(e.prompt, e.reference) for e in task.examples("train")[:args.shots]]
    rows.append(row(f"{args.shots}-shot prompting (gold examples)", accuracy(model, tok, task, args, gold_demos),
                    command))

    print("== tunesmith synth self-train", flush=True)
    stats = self_train(cfg, out / "list", MODEL, progress=False)
    shots = confident_shots(out / "list" / "round-1" / "pseudo.jsonl", task, labels, args.shots)
    print(f"== base model with {len(shots)} pseudo-labelled examples in context", flush=True)
    rows.append(row(f"{len(shots)} pseudo-labelled examples in context (first teacher's labels)",
                    accuracy(model, tok, task, args, shots), command, stats))
    del model

    runs = out / "list" / "runs"
    print("== teacher", flush=True)
    model, tok = load_for_inference(MODEL, str(runs / "teacher" / "adapter"))
    rows.append(row(f"fine-tuned on {args.labelled} gold labels (teacher)", accuracy(model, tok, task, args),
                    command, train_s=stats["teacher_train_s"], val_accuracy=stats["val_accuracy"][0]))
    for r in stats["rounds"]:
        print(f"== student, round {r['round']}", flush=True)
        model, tok = load_for_inference(MODEL, str(runs / f"round-{r['round']}" / "adapter"))
        rows.append(row(f"fine-tuned on pseudo-labels, round {r['round']} (LiST student)",
                        accuracy(model, tok, task, args), command, stats, r["student_train_s"],
                        val_accuracy=r["student_val_accuracy"], pseudo_label_accuracy=r["pseudo_label_accuracy"],
                        kept_this_round=r["kept"], predicted=r["predicted"]))

    print(f"== same budget of gold labels: {args.labelled + args.pool}", flush=True)
    train_ex = task.examples("train")[:args.labelled + args.pool]
    gold, gold_s = train_adapter(cfg, [_record(task, e, e.reference) for e in train_ex], out / "gold", MODEL,
                                 args.student_steps)
    model, tok = load_for_inference(MODEL, str(gold))
    rows.append(row(f"fine-tuned on {len(train_ex)} gold labels (same budget)", accuracy(model, tok, task, args),
                    command, train_s=gold_s))

    wall = time.perf_counter() - t_start
    for r in rows:
        r["total_wall_s"] = round(wall, 1)
    (HERE / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    (HERE / "self_train_stats.json").write_text(json.dumps(
        {k: v for k, v in stats.items() if k not in ("student", "model")}, indent=1) + "\n")
    print(f"done in {wall:.0f} s", flush=True)
    for r in rows:
        print(f"{r['setting']:<70} {r['score']:5.1f}")


if __name__ == "__main__":
    main()
