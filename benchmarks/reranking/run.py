"""Listwise reranking on the built-in retrieval task: BM25 top k, then SmolLM2-135M-Instruct as a
RankGPT-style reranker, untuned and LoRA-tuned with the importance-aware listwise loss. Run from
the repository root (one sitting, CPU, one torch thread):

    nice -n 5 python benchmarks/reranking/run.py            # trains runs/reranking/listwise, then evaluates

Training lists: the first `--train-queries` queries of the train split, BM25 top `--top-k` over the
train corpus; a query whose top k missed its document gets it in place of the k-th candidate
(`ranking_records(add_relevant=True)`). Gold order: the relevant document, then BM25's order.

Rows, on the first `--test-limit` queries of the test split (BM25 top k over the test corpus; test
documents and queries are never trained on): BM25 alone; the untuned model, full list; the tuned
model, full list; the tuned model, sliding window (`--window` < k, `--step`). A query whose top k
holds no relevant document scores 0 whatever the order, so the model is asked only about the others
(`skip_unfound`); NDCG@10 is over all the queries, latency over the reranked ones.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tunesmith.data.mining import bm25_search
from tunesmith.data.ranking import ranking_records
from tunesmith.data.tasks.retrieval import RetrievalTask
from tunesmith.eval.rerank import evaluate_rerank, format_rerank, save_rerank
from tunesmith.eval.retrieval import retrieval_metrics
from tunesmith.infer.generate import load_for_inference

OUT = Path("runs/reranking")
HERE = Path(__file__).parent


def build_train(args) -> Path:
    corpus, queries, qrels = RetrievalTask().beir("train")
    qids = [q for q in qrels if q in queries][:args.train_queries]
    t0 = time.perf_counter()
    run = bm25_search(corpus, {q: queries[q] for q in qids}, k=args.top_k)
    records = ranking_records(corpus, queries, {q: qrels[q] for q in qids}, run, k=args.top_k, add_relevant=True)
    found = retrieval_metrics(run, {q: qrels[q] for q in qids}, ks=(args.top_k,))[f"recall@{args.top_k}"]
    path = OUT / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"[bench] {len(records)} training lists ({100 * found:.0f}% of queries had their document in BM25's "
          f"top {args.top_k}), {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def train_reranker(args, data: Path) -> dict:
    from tunesmith.recipe import load_recipe
    from tunesmith.train.loop import train

    overrides = [f"data.train={data}", f"output_dir={OUT}", f"name={args.name}", "objective.name=listwise",
                 f"objective.listwise.passage_tokens={args.passage_tokens}",
                 f"objective.listwise.importance={str(not args.no_importance).lower()}",
                 *([f"objective.listwise.min_passages={args.min_passages}"] if args.min_passages else []),
                 "data.val_fraction=0", "data.max_length=2048", f"train.steps={args.steps}", f"train.lr={args.lr}",
                 f"train.batch_tokens={args.batch_tokens}", "train.warmup=0.05", "train.threads=1", "train.eval_every=0",
                 "train.save_every=0"]
    t0 = time.perf_counter()
    train(load_recipe("recipes/lora-sft.yaml", overrides))
    rows = [json.loads(line) for line in open(OUT / args.name / "metrics.jsonl") if '"loss"' in line]
    return {"seconds": time.perf_counter() - t0, "steps": len(rows), "first_loss": rows[0]["loss"],
            "last_loss": sum(r["loss"] for r in rows[-10:]) / min(10, len(rows)),
            "step_s": sum(r["step_s"] for r in rows) / len(rows), "overrides": overrides}


def evaluate_rows(args) -> dict:
    corpus, queries, qrels = RetrievalTask().beir("test")
    qids = [q for q in qrels if q in queries][:args.test_limit]
    qrels = {q: qrels[q] for q in qids}
    run = bm25_search(corpus, {q: queries[q] for q in qids}, k=args.top_k)
    common = dict(top_k=args.top_k, passage_tokens=args.passage_tokens, run=run, skip_unfound=True)
    plan = {"untuned, full list": (None, "full"), "tuned, full list": (OUT / args.name, "full"),
            f"tuned, window {args.window}/{args.step}": (OUT / args.name, "window")}
    out, loaded, wanted = {"random order": random_order(run, qrels, args.top_k)}, {}, set(args.rows.split(","))
    for row, (adapter, mode) in plan.items():
        if row.split(",")[0] not in wanted or mode not in args.modes.split(","):
            continue
        if adapter not in loaded:
            loaded = {adapter: load_for_inference(None, adapter=None if adapter is None else str(adapter))}
        model, tok = loaded[adapter]
        r = evaluate_rerank(model, tok, corpus, queries, qrels, mode=mode, window=args.window, step=args.step,
                            task="rerank:builtin", **common)
        save_rerank(r, OUT / f"eval-{args.name}-{row.split(',')[0]}-{mode}.json")
        print(f"--- {row}\n{format_rerank(r)}", flush=True)
        out.setdefault("bm25", r.before)
        out[row] = {"metrics": r.after, "latency": r.latency, "complete": r.complete}
    return out


def random_order(run: dict, qrels: dict, k: int, draws: int = 300) -> dict:
    """Mean metrics of the BM25 top k shuffled: what a reranker that ignores the text scores."""
    import random

    from tunesmith.data.ranking import candidate_order

    rng, sums = random.Random(0), {}
    for _ in range(draws):
        shuffled = {}
        for q, scores in run.items():
            top = candidate_order(scores)[:k]
            rng.shuffle(top)
            shuffled[q] = {d: float(len(top) - i) for i, d in enumerate(top)}
        for name, value in retrieval_metrics(shuffled, qrels, ks=(1, k)).items():
            sums[name] = sums.get(name, 0.0) + value / draws
    return sums


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train-queries", type=int, default=100)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-tokens", type=int, default=700, help="one list per step at the default sizes")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--passage-tokens", type=int, default=32)
    p.add_argument("--test-limit", type=int, default=60)
    p.add_argument("--window", type=int, default=6)
    p.add_argument("--step", type=int, default=2)
    p.add_argument("--name", default="listwise")
    p.add_argument("--min-passages", type=int, default=None, help="train on lists cut to random lengths >= this")
    p.add_argument("--no-importance", action="store_true", help="train with every answer token weighing 1")
    p.add_argument("--rows", default="untuned,tuned", help="which model rows to evaluate")
    p.add_argument("--modes", default="full,window", help="which reranking modes to evaluate")
    p.add_argument("--output", default=str(HERE / "results.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread, torch {torch.__version__}",
              "args": vars(args)}
    if not (OUT / args.name / "adapter").is_dir() and "tuned" in args.rows.split(","):
        result["train"] = train_reranker(args, build_train(args))
        print(f"[bench] trained in {result['train']['seconds']:.0f} s ({result['train']['step_s']:.1f} s/step)")
    result["rows"] = evaluate_rows(args)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(f"[bench] results: {args.output}")


if __name__ == "__main__":
    main()
