"""Embeddings benchmark: the built-in retrieval task's test split, one row per model, one table.

    nice -n 5 python benchmarks/embeddings/run.py                 # every row, then results.md
    nice -n 5 python benchmarks/embeddings/run.py minilm-st bm25  # some rows (others keep their JSON)
    python benchmarks/embeddings/run.py --table                    # only rebuild results.md

Each row runs in a process of its own (a crash loses one row) and writes runs/bench-embeddings/<row>.json;
training runs in a child process of that, so its wall time and peak RSS are its own. Metrics come
from tunesmith.eval.retrieval for every row (BM25 included), so all rows are scored by one code path.

The anchor: MiniLM fine-tuned by sentence-transformers' own trainer with MultipleNegativesRankingLoss
and tunesmith's contrastive objective see the SAME batches in the same order (one seeded shuffle
written to a JSONL; tunesmith with data.shuffle=false, sentence-transformers with a sequential
sampler), the same steps, batch, learning rate and schedule (linear decay from the peak, no warm-up),
AdamW (0.9, 0.999), gradient clipping at 1.0, fp32, seed 0. Only dropout's random draws differ.
"""
from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "runs" / "bench-embeddings"
RESULTS = Path(__file__).resolve().parent / "results.md"
SEED = 0
N_TRAIN, BATCH, LR, MAX_LEN = 640, 32, 5e-5, 96  # 20 steps of 32 (query, positive, hard negative): what 2 shared cores allow
STEPS = N_TRAIN // BATCH
LLM = "smollm2-135m-instruct"
LLM_BATCH, LLM_STEPS, LLM_LR = 16, 10, 5e-4  # SmolLM2 LoRA: 10 steps of 16 (the first 160 items of the same order)
THREADS = 2
SUBSET = 40  # queries of the small table (200 documents): the whole split is ~70 min per SmolLM2 pass here
ONLY_SUBSET = {"smollm2-base", "smollm2-bi-lora", "smollm2-grl"}  # run: --subset --train for the LoRA rows
SKIPPED = {  # (row, subset table) -> why it has no numbers; written here, never guessed
    ("smollm2-base", False): "a pass over the whole split is ~25-70 min of these shared cores; see the subset table",
    ("smollm2-bi-lora", False): "evaluated on the subset only (see there)",
    ("minilm-st-seed1", True): "full split only (the noise estimate)",
    ("minilm-tunesmith-seed1", True): "full split only (the noise estimate)",
    ("smollm2-grl", False): "evaluated on the subset only (see there)",
}

ROWS = {  # name -> (label, how it is trained)
    "bm25": ("BM25 (rank-bm25)", "none"),
    "minilm-base": ("all-MiniLM-L6-v2, untuned", "none"),
    "minilm-st": ("MiniLM + sentence-transformers MNRL (anchor)", f"full, {STEPS}×{BATCH}, lr {LR}"),
    "minilm-tunesmith": ("MiniLM + tunesmith contrastive", f"full, {STEPS}×{BATCH}, lr {LR}"),
    "minilm-st-seed1": ("MiniLM + sentence-transformers MNRL, seed 1", f"full, {STEPS}×{BATCH}, lr {LR}"),
    "minilm-tunesmith-seed1": ("MiniLM + tunesmith contrastive, seed 1", f"full, {STEPS}×{BATCH}, lr {LR}"),
    "minilm-moe": ("MiniLM + tunesmith MoE (4 domain experts) contrastive", f"experts, {STEPS}×{BATCH}, lr {LR}"),
    "smollm2-base": ("SmolLM2-135M, mean-pooled, causal, untuned", "none"),
    "smollm2-bi-lora": ("SmolLM2-135M, bidirectional + contrastive LoRA", f"LoRA r16, {LLM_STEPS}×{LLM_BATCH}"),
    "smollm2-grl": ("SmolLM2-135M, bidirectional + GRL LoRA", f"LoRA r16, {LLM_STEPS}×{LLM_BATCH}"),
}


def task():
    from tunesmith.data.tasks.retrieval import RetrievalTask

    return RetrievalTask(seed=SEED)


def train_file() -> Path:
    """The training items in one seeded order: query, positive, its first hard negative, domain."""
    path = WORK / "train.jsonl"
    if not path.is_file():
        records = task().records("train")
        random.Random(SEED).shuffle(records)
        WORK.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for r in records[:N_TRAIN]:
                f.write(json.dumps({"query": r["query"], "positive": r["positive"], "negative": r["negatives"][0],
                                    "domain": r["domain"]}) + "\n")
    return path


def items(n: int) -> list[dict]:
    return [json.loads(line) for line in open(train_file())][:n]


def train_tokens(tokenizer, n: int, max_length: int) -> int:
    """Real (non-pad) tokens of the texts trained on: query, positive and hard negative of n items."""
    texts = [t for it in items(n) for t in (it["query"], it["positive"], it["negative"])]
    return sum(len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"])


def run_child(cmd: list[str], log: Path) -> dict:
    """Run `cmd`; its wall time and peak RSS (of that process tree's largest process)."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {os.waitstatus_to_exitcode(status)}); see {log}")
    return {"train_s": seconds, "train_rss_mb": usage.ru_maxrss / 1024}


# ------------------------------------------------------------------------------------------ training


def st_train(out: str, seed: int = SEED) -> None:
    """sentence-transformers' own fine-tuning: MNRL (scale 20 = τ 0.05), the batches in file order."""
    import torch
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from torch.utils.data import SequentialSampler

    from tunesmith.models.embedding import encoder_folder

    torch.set_num_threads(THREADS)
    rows = items(N_TRAIN)
    data = Dataset.from_dict({"anchor": [r["query"] for r in rows], "positive": [r["positive"] for r in rows],
                              "negative": [r["negative"] for r in rows]})
    model = SentenceTransformer(str(encoder_folder()), device="cpu")
    model.max_seq_length = MAX_LEN

    def in_order(dataset, batch_size, drop_last, **kw):
        return DefaultBatchSampler(SequentialSampler(dataset), batch_size=batch_size, drop_last=drop_last, **kw)

    args = SentenceTransformerTrainingArguments(
        output_dir=str(WORK / "st-checkpoints"), per_device_train_batch_size=BATCH, max_steps=STEPS,
        learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        seed=seed, data_seed=seed, batch_sampler=in_order, save_strategy="no", logging_steps=10, report_to="none",
        use_cpu=True, dataloader_drop_last=True)
    t0 = time.perf_counter()
    SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                               loss=MultipleNegativesRankingLoss(model, scale=20.0)).train()
    print(f"train loop {time.perf_counter() - t0:.1f}s")
    model.save(out)


def recipe(name: str, model: str, method: dict, objective: str, options: dict, batch: int, steps: int, lr: float,
           precision: str, seed: int = SEED) -> Path:
    """A tunesmith recipe file for one trained row."""
    import yaml

    body = {"name": name, "output_dir": str(WORK / "runs"), "model": {"name": model, "attention": "sdpa"},
            "data": {"train": str(train_file()), "shuffle": False, "packing": False},
            "method": method,
            "objective": {"name": objective, objective: {"temperature": 0.05, "max_length": MAX_LEN, **options}},
            "train": {"steps": steps, "batch_size": batch, "lr": lr, "schedule": "linear", "warmup": 0,
                      "max_grad_norm": 1.0, "precision": precision, "seed": seed, "threads": THREADS,
                      "log_every": 1}}
    path = WORK / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


TUNESMITH_RUNS = {  # row -> recipe arguments
    "minilm-tunesmith": dict(model="all-minilm-l6-v2", method={"name": "full"}, objective="contrastive",
                             options={"pooling": "mean"}, batch=BATCH, steps=STEPS, lr=LR, precision="fp32"),
    "minilm-tunesmith-seed1": dict(model="all-minilm-l6-v2", method={"name": "full"}, objective="contrastive",
                                   options={"pooling": "mean"}, batch=BATCH, steps=STEPS, lr=LR, precision="fp32",
                                   seed=1),
    "minilm-moe": dict(model="all-minilm-l6-v2", objective="contrastive", options={"pooling": "mean"},
                       method={"name": "moe", "moe": {"experts": 4}},  # the data's domains, sorted, pick the expert
                       batch=BATCH, steps=STEPS, lr=LR, precision="fp32"),
    "smollm2-bi-lora": dict(model=LLM, method={"name": "lora", "lora": {"rank": 16, "alpha": 32, "targets": ["all-linear"]}},
                            objective="contrastive", options={"pooling": "mean", "bidirectional": True},
                            batch=LLM_BATCH, steps=LLM_STEPS, lr=LLM_LR, precision="bf16"),
    "smollm2-grl": dict(model=LLM, method={"name": "lora", "lora": {"rank": 16, "alpha": 32, "targets": ["all-linear"]}},
                        objective="grl", options={"pooling": "mean", "bidirectional": True, "gen_max_length": 192},
                        batch=LLM_BATCH, steps=LLM_STEPS, lr=LLM_LR, precision="bf16"),
}


# ------------------------------------------------------------------------------------------ one row


def embedder(row: str, train: bool = True) -> tuple[object, dict]:
    """(searcher for evaluate_retrieval, training figures) of a row; trains first if the row trains
    (with train=False the row's trained model is reused as it is)."""
    from tunesmith.infer.embed import load_embedder

    if row == "bm25":
        return "bm25", {}
    if row == "minilm-base":
        return load_embedder("all-minilm-l6-v2"), {}
    if row == "smollm2-base":
        return load_embedder(LLM), {}
    if row.startswith("minilm-st"):
        out = WORK / row
        if not train:
            return load_embedder(str(out)), {}
        seed = "1" if row.endswith("seed1") else str(SEED)
        figures = run_child([sys.executable, __file__, "--st-train", str(out), seed], WORK / f"{row}.log")
        searcher = load_embedder(str(out))
        figures["train_tokens"] = train_tokens(searcher[1], N_TRAIN, MAX_LEN)
        return searcher, figures
    if not train:
        return load_embedder(str(WORK / "runs" / row)), {}
    args = TUNESMITH_RUNS[row]
    path = recipe(row, **args)
    figures = run_child([sys.executable, "-m", "tunesmith", "train", str(path)], WORK / f"{row}.log")
    searcher = load_embedder(str(WORK / "runs" / row))
    figures["train_tokens"] = train_tokens(searcher[1], args["batch"] * args["steps"], MAX_LEN)
    return searcher, figures


def subset(corpus: dict, queries: dict, qrels: dict) -> tuple[dict, dict, dict]:
    """The first SUBSET test queries with only their own documents (positive, the 4 distractors,
    anything else judged relevant): a 5x smaller corpus, for models too slow for the whole split."""
    from tunesmith.eval.retrieval import doc_text

    records = task().records("test")[:SUBSET]
    keep_q = list(queries)[:SUBSET]
    texts = {t for r in records for t in (r["positive"], *r["negatives"])}
    keep_d = {d for d, doc in corpus.items() if doc_text(doc) in texts} | {d for q in keep_q for d in qrels[q]}
    return ({d: corpus[d] for d in sorted(keep_d)}, {q: queries[q] for q in keep_q}, {q: qrels[q] for q in keep_q})


def routed_retrieval(searcher, corpus: dict, queries: dict, qrels: dict):
    """An MoE embedder's run: every text through its domain's expert (documents by the task's
    document domains, queries by their positive's domain), cosine top 100, the same metrics."""
    from types import SimpleNamespace

    from tunesmith.eval.retrieval import doc_text, retrieval_metrics
    from tunesmith.models.moe import embed_routed

    model, tokenizer, spec = searcher
    t = task()
    names = sorted(set(t.domains("test").values()))
    doc_domain = t.domains("test")
    query_domain = {ex.id: ex.meta["domain"] for ex in t.examples("test")}
    t0 = time.perf_counter()
    ids = list(corpus)
    docs = embed_routed(model, tokenizer, [doc_text(corpus[d]) for d in ids],
                        [names.index(doc_domain[d]) for d in ids], spec, kind="document")
    asked = [q for q in qrels if q in queries]
    qv = embed_routed(model, tokenizer, [queries[q] for q in asked], [names.index(query_domain[q]) for q in asked],
                      spec, kind="query")
    scores = qv @ docs.T
    top = scores.topk(min(100, len(ids)), dim=1)
    run = {q: {ids[j]: float(v) for v, j in zip(top.values[i], top.indices[i])} for i, q in enumerate(asked)}
    metrics = retrieval_metrics(run, {q: qrels[q] for q in asked})
    metrics["corpus"] = len(corpus)
    return SimpleNamespace(metrics=metrics, timing={"total": time.perf_counter() - t0})


def one_row(row: str, small: bool = False, eval_only: bool = False, force_train: bool = False) -> None:
    import torch

    from tunesmith.eval.retrieval import evaluate_retrieval

    torch.set_num_threads(THREADS)
    corpus, queries, qrels = task().beir("test")
    if small:
        corpus, queries, qrels = subset(corpus, queries, qrels)
    previous = WORK / f"{row}.json"
    if eval_only and previous.is_file():  # the model trained earlier: keep its training figures
        figures = {k: v for k, v in json.loads(previous.read_text()).items() if k.startswith("train")}
        searcher = embedder(row, train=False)[0]
    else:
        searcher, figures = embedder(row, train=force_train or (not small and row not in ONLY_SUBSET))
    if searcher != "bm25":
        searcher[2].max_length = MAX_LEN  # every text of the task fits: no row is cut differently
    if row == "minilm-moe":
        result = routed_retrieval(searcher, corpus, queries, qrels)
    else:
        result = evaluate_retrieval(searcher, corpus, queries, qrels, k=100, model_name=row)
        from tunesmith.eval.retrieval import retrieval_metrics

        per_query = retrieval_metrics(result.run, {q: qrels[q] for q in result.run}, per_query=True)["per_query"]
        figures["per_query_ndcg"] = {q: m["ndcg@10"] for q, m in per_query.items()}
    out = {"row": row, "metrics": result.metrics, "eval_timing": result.timing, **figures,
           "eval_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if searcher != "bm25":
        tok = searcher[1]
        texts = [d.get("title", "") + " " + d["text"] for d in corpus.values()] + list(queries.values())
        out["eval_tokens"] = sum(len(x) for x in tok(texts, truncation=True, max_length=MAX_LEN)["input_ids"])
    if "train_tokens" in figures and "train_tok_s" not in figures:
        out["train_tok_s"] = figures["train_tokens"] / figures["train_s"]
    (WORK / f"{row}{'.subset' if small else ''}.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "metrics"}), result.metrics)


# ------------------------------------------------------------------------------------------ the table


def table(subset: bool = False) -> str:
    head = ("| model | training | NDCG@10 | MRR@10 | Recall@10 | train time | train tok/s | train peak RSS "
            "| eval (index+search) | eval peak RSS |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for row, (label, how) in ROWS.items():
        path = WORK / f"{row}{'.subset' if subset else ''}.json"
        if subset and path.is_file() and (WORK / f"{row}.json").is_file():  # training figures from the full run
            full = json.loads((WORK / f"{row}.json").read_text())
            r = json.loads(path.read_text())
            path = WORK / f"{row}.subset-merged.json"
            path.write_text(json.dumps({**{k: v for k, v in full.items() if k.startswith("train")}, **r}))
        if not path.is_file():
            reason = SKIPPED.get((row, subset), "")
            lines.append(f"| {label} | {how} | not run{': ' + reason if reason else ''} | | | | | | | |")
            continue
        r = json.loads(path.read_text())
        m = r["metrics"]
        train = (f"{r['train_s']:.0f} s", f"{r['train_tok_s']:.0f}", f"{r['train_rss_mb']:.0f} MB") \
            if "train_s" in r else ("—", "—", "—")
        lines.append(f"| {label} | {how} | {m['ndcg@10']:.4f} | {m['mrr@10']:.4f} | {m['recall@10']:.4f} | "
                     f"{train[0]} | {train[1]} | {train[2]} | {r['eval_timing']['total']:.0f} s | "
                     f"{r['eval_rss_mb']:.0f} MB |")
    return "\n".join(lines)


def gap(a: str = "minilm-st", b: str = "minilm-tunesmith", draws: int = 10000) -> str:
    """The tunesmith - anchor NDCG@10 difference with a 95% paired bootstrap interval over queries
    (the test set's sampling noise; the seed-1 rows show the training noise)."""
    rows = {r: WORK / f"{r}.json" for r in (a, b)}
    if not all(p.is_file() for p in rows.values()):
        return ""
    per = {r: json.loads(p.read_text()).get("per_query_ndcg") for r, p in rows.items()}
    if not all(per.values()):
        return ""
    qs = sorted(per[a])
    diffs = [per[b][q] - per[a][q] for q in qs]
    rng = random.Random(SEED)
    means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(draws))
    lo, hi = means[int(0.025 * draws)], means[int(0.975 * draws) - 1]
    return (f"{b} − {a}: NDCG@10 {sum(diffs) / len(diffs):+.4f} (95% paired bootstrap over the "
            f"{len(qs)} queries: {lo:+.4f} to {hi:+.4f})")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--st-train"]:
        st_train(argv[1], int(argv[2]) if len(argv) > 2 else SEED)
        return 0
    if argv[:1] == ["--one"]:
        one_row(argv[1], small="--subset" in argv[2:], eval_only="--eval-only" in argv[2:],
                force_train="--train" in argv[2:])
        return 0
    if argv[:1] != ["--table"]:
        train_file()
        flags = [a for a in argv if a in ("--subset", "--eval-only", "--train")]
        small = "--subset" in flags
        for row in [a for a in argv if a not in flags] or list(ROWS):
            code = subprocess.call([sys.executable, __file__, "--one", row, *flags], cwd=ROOT)
            print(f"[bench] {row}{' (subset)' if small else ''}: exit {code}", flush=True)
    print(table())
    for a, b in (("minilm-st", "minilm-tunesmith"), ("minilm-st-seed1", "minilm-tunesmith-seed1"),
                 ("minilm-st", "minilm-st-seed1"), ("minilm-tunesmith", "minilm-tunesmith-seed1")):
        print(gap(a, b))
    print(table(subset=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
