"""LDP benchmark: Lunish (the low-resource English-rooted constructed language) -> English with the
embedded SmolLM2-135M-Instruct on a CPU.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/synthesis/ldp/run.py --limit 40 --pool 80 --steps 20

Rows, all chrF++ (sacrebleu) on the same first `--limit` test sentences of translate-lu-en, greedy:
- zero-shot; supervised k-shot (k gold Lunish pairs: the paper's upper reference);
- LDP prompting: k exemplars from k different high-resource languages (Obrish, Irvic, Elsic, Umbric),
  no Lunish pair at all;
- LDP synthetic pairs in context: `tunesmith synth ldp` translates `--pool` monolingual Lunish
  sentences with LDP prompts; k of the kept synthetic pairs are the (intra-lingual) exemplars;
- LoRA fine-tuned on the kept synthetic pairs (both directions, as the command trains), evaluated 0-shot;
- LoRA fine-tuned on the same number of gold pairs (same meanings, same steps), evaluated 0-shot.
`--en2x` adds the English -> Lunish rows (0-shot, gold k-shot, reversed synthetic pairs in context,
the two fine-tuned models). Results: benchmarks/synthesis/ldp/results.json (rows per the synthesis
table), and the eval summaries beside the run folder.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
MODEL = "smollm2-135m-instruct"


def row(setting: str, task: str, measured: tuple[float, dict], command: str, stats: dict | None = None,
        train_s=None):
    """A results row per the synthesis table; `measured`: (chrF++, extra fields such as `copies`)."""
    s, (score, extra) = stats or {}, measured
    return {"method": "LDP", "task": task, "setting": setting, "metric": "chrF++", "score": round(score, 2),
            "kept": s.get("kept"), "generated": s.get("generated"), "dropped": s.get("dropped"),
            "generation_s": round(s["generation_s"], 1) if s.get("generation_s") else None,
            "samples_per_s": round(s["samples_per_s"], 3) if s.get("samples_per_s") else None,
            "train_s": round(train_s, 1) if train_s else None, "command": command, **extra}


def score(model, tok, task, args, shots=None, log=None) -> tuple[float, dict]:
    """chrF++ of `task`'s first --limit test sentences; `shots`: a ShotsTask's exemplars (else 0-shot)."""
    from tunesmith.eval.runner import evaluate
    from tunesmith.synth.ldp import ShotsTask, verdict

    t0 = time.perf_counter()
    k = len(shots) if shots else 0
    result = evaluate(model, tok, ShotsTask(task, shots) if shots else task, limit=args.limit, shots=k,
                      max_new_tokens=args.max_new_tokens, batch_size=8, share_prefix=bool(shots))
    sources = {ex.id: ex.meta["source_text"] for ex in task.examples("test")}
    copied = [verdict(sources[r["id"]], r["extracted"] or "") == "copy" for r in result.records]
    copies = sum(copied) / len(copied)
    summary = {**result.summary, "copies": copies, "eval_s": time.perf_counter() - t0,
               "examples_shown": result.records[:3]}
    if log is not None:
        log.append(summary)
    print(f"  chrF++ {result.summary['chrf++']:.2f}, copies {copies:.0%}  ({summary['eval_s']:.0f} s)", flush=True)
    return result.summary["chrf++"], {"copies": round(copies, 3)}


def copy_floor(task, args) -> float:
    """chrF++ of the source sentence itself as the translation: the English-rooted languages share
    English lemmas, so a model that copies its input scores this much."""
    from tunesmith.eval.metrics import chrf_pp

    examples = task.examples("test")[:args.limit]
    return chrf_pp([ex.meta["source_text"] for ex in examples], [ex.reference for ex in examples])


def gold_train(out: Path, n: int, seed: int) -> Path:
    """The first n gold Lunish training pairs (the pool's meanings), in both directions like the LDP data."""
    from tunesmith.data.tasks.translation import clauses
    from tunesmith.data.tasks.translation_data import realize
    from tunesmith.synth.ldp import Pair, training_records

    pairs = [Pair("lu", realize(c, "lu"), realize(c, "en")) for c in clauses("train", n, seed)]
    path = out / "gold-train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in training_records(pairs, reverse=True)))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--pool", type=int, default=80)
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--en2x", action="store_true")
    p.add_argument("--out", default="runs/bench-ldp")
    p.add_argument("--draws", type=int, default=0,
                   help="instead: the gold k-shot and LDP prompting rows (X -> English) for this many exemplar "
                        "draws each, into draws.json (how much the choice of exemplars moves the score)")
    args = p.parse_args()
    command = "python benchmarks/synthesis/ldp/run.py " + " ".join(sys.argv[1:])
    draws(args, command) if args.draws else run(args, command)


def draws(args, command: str) -> None:
    """Gold k-shot: consecutive blocks of k training pairs; LDP: pick_diverse under seeds 0..n-1."""
    from tunesmith.data.tasks import get_task
    from tunesmith.infer.generate import load_for_inference
    from tunesmith.synth.ldp import HIGH, as_examples, high_resource_pairs, pick_diverse

    k = args.shots
    x2en = get_task("translate-lu-en", n_train=max(args.pool, k * args.draws), n_validation=5, n_test=args.limit)
    model, tok = load_for_inference(MODEL)
    high = high_resource_pairs(HIGH, 10, args.seed, skip=args.pool)
    out = {"command": command, "gold k-shot": [], "LDP prompting": []}
    for d in range(args.draws):
        out["gold k-shot"].append(round(score(model, tok, x2en, args, x2en.examples("train")[d * k:(d + 1) * k])[0], 2))
        shots = as_examples(pick_diverse(high, k, random.Random(f"bench/{args.seed + d}")))
        out["LDP prompting"].append(round(score(model, tok, x2en, args, shots)[0], 2))
    (HERE / "draws.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


def run(args, command: str) -> None:
    from tunesmith.data.tasks import get_task
    from tunesmith.infer.generate import load_for_inference
    from tunesmith.synth.ldp import (HIGH, LdpConfig, Pair, as_examples, fine_tune, high_resource_pairs,
                                     pick_diverse, run_ldp)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = dict(n_train=max(args.pool, args.shots), n_validation=5, n_test=args.limit)
    x2en, en2x = get_task("translate-lu-en", **sizes), get_task("translate-lu", **sizes)
    train_overrides = (f"train.steps={args.steps}", f"train.batch_tokens={args.batch_tokens}", "train.threads=1",
                       "train.save_every=0", "train.eval_every=0")
    model, tok = load_for_inference(MODEL)
    rows, log, x2en_name, en2x_name = [], [], "translate-lu-en (Lunish -> English)", "translate-lu (English -> Lunish)"

    print("zero-shot / gold k-shot / LDP prompting", flush=True)
    rows.append(row("copy the source sentence (no model)", x2en_name, (copy_floor(x2en, args), {"copies": 1.0}),
                    command))
    rows.append(row("zero-shot", x2en_name, score(model, tok, x2en, args, log=log), command))
    gold_shots = x2en.examples("train")[:args.shots]
    rows.append(row(f"{args.shots}-shot gold Lunish pairs (supervised reference)", x2en_name,
                    score(model, tok, x2en, args, gold_shots, log), command))
    diverse = pick_diverse(high_resource_pairs(HIGH, 10, args.seed, skip=args.pool), args.shots,
                           random.Random(f"bench/{args.seed}"))
    rows.append(row(f"{args.shots}-shot LDP: one exemplar each of {', '.join(sorted({d.language for d in diverse}))}",
                    x2en_name, score(model, tok, x2en, args, as_examples(diverse), log), command))

    print("synthesis + LoRA on the synthetic pairs", flush=True)
    cfg = LdpConfig(pool=args.pool, shots=args.shots, seed=args.seed, max_new_tokens=args.max_new_tokens,
                    overrides=train_overrides)
    stats = run_ldp(model, tok, cfg, out / "ldp", model_name=MODEL)
    kept = [json.loads(line) for line in (out / "ldp" / "pairs.jsonl").read_text().splitlines()]
    kept = [Pair("lu", r["source"], r["english"]) for r in kept if r["verdict"] == "kept"]
    intra = random.Random(f"bench/intra/{args.seed}").sample(kept, args.shots)
    rows.append(row(f"{args.shots} synthetic Lunish pairs in context (intra-lingual)", x2en_name,
                    score(model, tok, x2en, args, as_examples(intra), log), command, stats))
    tuned, _ = load_for_inference(MODEL, stats["output"])
    rows.append(row(f"LoRA on {stats['kept']} synthetic pairs (x2 directions), 0-shot", x2en_name,
                    score(tuned, tok, x2en, args, log=log), command, stats, stats["train_s"]))

    print("LoRA on the same number of gold pairs", flush=True)
    gold_cfg = LdpConfig(overrides=train_overrides)
    gold_out, gold_s = fine_tune(gold_train(out, stats["kept"], args.seed), out / "gold", MODEL, gold_cfg)
    gold, _ = load_for_inference(MODEL, gold_out)
    rows.append(row(f"LoRA on {stats['kept']} gold pairs (same budget), 0-shot", x2en_name,
                    score(gold, tok, x2en, args, log=log), command, train_s=gold_s))

    if args.en2x:
        print("English -> Lunish", flush=True)
        rows.append(row("copy the source sentence (no model)", en2x_name, (copy_floor(en2x, args), {"copies": 1.0}),
                        command))
        rows.append(row("zero-shot", en2x_name, score(model, tok, en2x, args, log=log), command))
        rows.append(row(f"{args.shots}-shot gold Lunish pairs (supervised reference)", en2x_name,
                        score(model, tok, en2x, args, en2x.examples("train")[:args.shots], log), command))
        rows.append(row(f"{args.shots} reversed synthetic pairs in context (intra-lingual)", en2x_name,
                        score(model, tok, en2x, args, as_examples(intra, to_english=False), log), command, stats))
        rows.append(row(f"LoRA on {stats['kept']} synthetic pairs (x2 directions), 0-shot", en2x_name,
                        score(tuned, tok, en2x, args, log=log), command, stats, stats["train_s"]))
        rows.append(row(f"LoRA on {stats['kept']} gold pairs (same budget), 0-shot", en2x_name,
                        score(gold, tok, en2x, args, log=log), command, train_s=gold_s))

    (HERE / "results.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    (out / "evals.json").write_text(json.dumps(log, indent=1, ensure_ascii=False, default=str))
    for r in rows:
        print(f"| {r['task']} | {r['setting']} | {r['score']:.2f} | {r['copies']:.0%} |")


if __name__ == "__main__":
    main()
