"""Domain-expert MoE embeddings (methods.md §15) on the built-in retrieval task: does giving each of
its four domains (company, person, product, venue) its own MLP expert beat one dense MiniLM trained
on the same batches?

    nice -n 5 python benchmarks/moe/run.py            # train + evaluate every row, then results.md
    python benchmarks/moe/run.py --table               # only rebuild results.md from the rows' JSON

Same data, order, steps, batch, learning rate and schedule as benchmarks/embeddings (its seeded
train.jsonl of (query, positive, hard negative, domain)); every row is scored on the test split.
MoE rows embed each text with its domain's expert: a document by its own domain, a query by the
domain of its relevant document (the domain is known at search time, as in the paper); they are also
scored unrouted (every text through expert 0) to show what the routing carries.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "runs" / "bench-moe"
RESULTS = Path(__file__).resolve().parent / "results.md"
SEED, N_TRAIN, BATCH, LR, MAX_LEN, THREADS = 0, 640, 32, 5e-5, 96, 2
STEPS = N_TRAIN // BATCH

ROWS = {  # row -> (label, method block or None for the untuned model)
    "minilm-base": ("all-MiniLM-L6-v2, untuned", None),
    "minilm-dense": ("MiniLM + contrastive, full fine-tuning", {"name": "full"}),
    "minilm-moe-experts": ("MiniLM + MoE (4 experts, all layers), experts train", {"name": "moe", "moe": {"experts": 4}}),
    "minilm-moe-all": ("MiniLM + MoE (4 experts, all layers), everything trains",
                       {"name": "moe", "moe": {"experts": 4, "train": "all"}}),
    "minilm-mlp-only": ("MiniLM, only the MLPs train (one dense MLP per layer: the control of the experts row)",
                        {"name": "freeze", "freeze": {"modules": ["intermediate.dense", r"layer\.\d+\.output\.dense"]}}),
}


def task():
    from tunesmith.data.tasks.retrieval import RetrievalTask

    return RetrievalTask(seed=SEED)


def train_file() -> Path:
    """The first N_TRAIN training records in one seeded order (as benchmarks/embeddings writes them)."""
    path = WORK / "train.jsonl"
    if not path.is_file():
        records = task().records("train")
        random.Random(SEED).shuffle(records)
        WORK.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"query": r["query"], "positive": r["positive"], "negative": r["negatives"][0],
                                            "domain": r["domain"]}) + "\n" for r in records[:N_TRAIN]))
    return path


def train_row(row: str, method: dict) -> dict:
    import yaml

    body = {"name": row, "output_dir": str(WORK / "runs"), "model": {"name": "all-minilm-l6-v2", "attention": "sdpa"},
            "data": {"train": str(train_file()), "shuffle": False, "packing": False, "val_fraction": 0},
            "method": method,
            "objective": {"name": "contrastive", "contrastive": {"temperature": 0.05, "max_length": MAX_LEN}},
            "train": {"steps": STEPS, "batch_size": BATCH, "lr": LR, "schedule": "linear", "warmup": 0,
                      "max_grad_norm": 1.0, "precision": "fp32", "seed": SEED, "threads": THREADS, "log_every": 5}}
    recipe = WORK / f"{row}.yaml"
    recipe.write_text(yaml.safe_dump(body, sort_keys=False))
    t0 = time.perf_counter()
    with open(WORK / f"{row}.log", "w") as log:
        code = subprocess.call([sys.executable, "-m", "tunesmith", "train", str(recipe)], stdout=log,
                               stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    if code:
        raise RuntimeError(f"training {row} failed (exit {code}); see {WORK / f'{row}.log'}")
    return {"train_s": time.perf_counter() - t0}


def search(doc_vecs, query_vecs, doc_ids, query_ids, k=100) -> dict:
    import torch

    sims = torch.nn.functional.normalize(query_vecs, dim=-1) @ torch.nn.functional.normalize(doc_vecs, dim=-1).T
    s, i = sims.topk(min(k, len(doc_ids)), dim=1)
    return {q: {doc_ids[j]: float(v) for j, v in zip(i[r].tolist(), s[r].tolist())} for r, q in enumerate(query_ids)}


def evaluate(row: str) -> dict:
    """Metrics of a row on the test split: routed by domain for MoE rows, plus unrouted."""
    import torch

    from tunesmith.data.mining import doc_text
    from tunesmith.eval.retrieval import retrieval_metrics
    from tunesmith.infer.embed import load_embedder
    from tunesmith.models.embedding import embed_texts
    from tunesmith.models.moe import embed_routed, moe_modules

    torch.set_num_threads(THREADS)
    corpus, queries, qrels = task().beir("test")
    doc_domain = task().domains("test")
    asked = [q for q in qrels if q in queries and any(g > 0 for g in qrels[q].values())]
    doc_ids = list(corpus)
    name = "all-minilm-l6-v2" if ROWS[row][1] is None else str(WORK / "runs" / row)
    model, tokenizer, spec = load_embedder(name)
    spec.max_length = MAX_LEN
    docs = [doc_text(corpus[d]) for d in doc_ids]
    qtexts = [queries[q] for q in asked]
    out = {}
    t0 = time.perf_counter()
    d_vecs = embed_texts(model, tokenizer, docs, spec, kind="document")
    q_vecs = embed_texts(model, tokenizer, qtexts, spec, kind="query")
    out["unrouted"] = retrieval_metrics(search(d_vecs, q_vecs, doc_ids, asked), {q: qrels[q] for q in asked})
    out["eval_s"] = time.perf_counter() - t0
    if moe_modules(model):
        names = json.loads((WORK / "runs" / row / "adapter" / "tunesmith_domains.json").read_text())
        ids = {n: i for i, n in enumerate(names)}
        q_domain = [doc_domain[next(d for d, g in qrels[q].items() if g > 0)] for q in asked]
        d_vecs = embed_routed(model, tokenizer, docs, [ids[doc_domain[d]] for d in doc_ids], spec, kind="document")
        q_vecs = embed_routed(model, tokenizer, qtexts, [ids[d] for d in q_domain], spec, kind="query")
        out["routed"] = retrieval_metrics(search(d_vecs, q_vecs, doc_ids, asked), {q: qrels[q] for q in asked})
    return out


def one_row(row: str) -> None:
    figures = {} if ROWS[row][1] is None else train_row(row, ROWS[row][1])
    result = {"row": row, **figures, **evaluate(row)}
    (WORK / f"{row}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


def table() -> str:
    lines = ["| model | NDCG@10 | MRR@10 | Recall@10 | NDCG@10 unrouted (expert 0) | train time |",
             "|---|---|---|---|---|---|"]
    for row, (label, _) in ROWS.items():
        path = WORK / f"{row}.json"
        if not path.is_file():
            lines.append(f"| {label} | not run | | | | |")
            continue
        r = json.loads(path.read_text())
        m = r.get("routed", r["unrouted"])
        unrouted = f"{r['unrouted']['ndcg@10']:.4f}" if "routed" in r else "—"
        train = f"{r['train_s']:.0f} s" if "train_s" in r else "—"
        lines.append(f"| {label} | {m['ndcg@10']:.4f} | {m['mrr@10']:.4f} | {m['recall@10']:.4f} | {unrouted} | {train} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--one"]:
        one_row(argv[1])
        return 0
    if argv[:1] != ["--table"]:
        train_file()
        for row in argv or list(ROWS):
            code = subprocess.call([sys.executable, __file__, "--one", row], cwd=ROOT)
            print(f"[bench] {row}: exit {code}", flush=True)
    text = table()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
