"""Retrieval evaluation: rank a corpus for each query, then NDCG@10, MRR@10, Recall@k and MAP@100.

    corpus, queries, qrels = load_beir("my-beir-folder")            # or RetrievalTask().beir("test")
    result = evaluate_retrieval("bm25", corpus, queries, qrels)     # or a (model, tokenizer, spec)
    print(format_retrieval(result)); save_retrieval(result, "eval-retrieval.json")

The metric definitions are those of sentence-transformers' InformationRetrievalEvaluator (and of
BEIR for graded relevance), so numbers here and there can be compared:
- a run is ranked by score, ties broken by ascending document id;
- a document is relevant when its qrels grade is > 0; queries with no relevant document are left out;
- NDCG@k uses the graded relevance as gain, rel / log2(rank + 1), over the ideal ordering of the
  query's judged grades (binary qrels give exactly sentence-transformers' value);
- Recall@k = relevant found in the top k / all relevant; MRR@k = 1 / rank of the first relevant;
- MAP@k divides the summed precisions by min(k, number relevant), as sentence-transformers does
  (trec_eval divides by the number relevant; the two differ only when a query has more than k).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..data.beir import Corpus, load_beir, BeirError
from ..data.mining import bm25_search, dense_search, doc_text

__all__ = ["BeirError", "RetrievalResult", "bm25_search", "dense_search", "doc_text", "evaluate_retrieval",
           "format_retrieval", "load_beir", "load_retrieval", "ranked", "retrieval_metrics", "save_retrieval"]


def ranked(scores: dict[str, float]) -> list[str]:
    """Document ids best first; equal scores in ascending id order, so a run has one ranking."""
    return [d for d, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))]


def _dcg(gains: list[float]) -> float:
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def _query_metrics(order: list[str], judged: dict[str, int], ks, ndcg_k: int, mrr_k: int, map_k: int) -> dict:
    relevant = {d for d, g in judged.items() if g > 0}
    hits = [d in relevant for d in order]
    out = {}
    ideal = _dcg(sorted((g for g in judged.values() if g > 0), reverse=True)[:ndcg_k])
    out[f"ndcg@{ndcg_k}"] = _dcg([max(judged.get(d, 0), 0) for d in order[:ndcg_k]]) / ideal
    first = next((i for i, h in enumerate(hits[:mrr_k]) if h), None)
    out[f"mrr@{mrr_k}"] = 0.0 if first is None else 1.0 / (first + 1)
    for k in ks:
        out[f"recall@{k}"] = sum(hits[:k]) / len(relevant)
    found, precisions = 0, 0.0
    for i, h in enumerate(hits[:map_k]):
        if h:
            found += 1
            precisions += found / (i + 1)
    out[f"map@{map_k}"] = precisions / min(map_k, len(relevant))
    return out


def retrieval_metrics(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]],
                      ks: tuple[int, ...] = (1, 10, 100), ndcg_k: int = 10, mrr_k: int = 10,
                      map_k: int = 100, per_query: bool = False) -> dict:
    """Mean NDCG@10, MRR@10, Recall@k (each k of `ks`) and MAP@100 of `run` against `qrels`.

    Args:
        run: query id -> {document id: score}, higher is better (any number of documents; a query
            missing from the run scores 0 everywhere).
        qrels: query id -> {document id: grade}; grade > 0 means relevant.
        per_query: also return each query's values under "per_query".
    Returns:
        {"ndcg@10": ..., "mrr@10": ..., "recall@1": ..., ..., "map@100": ..., "queries": n}.
    """
    rows = {}
    for qid, judged in qrels.items():
        if not any(g > 0 for g in judged.values()):
            continue  # nothing to find: left out, as sentence-transformers and BEIR do
        rows[qid] = _query_metrics(ranked(run.get(qid, {})), judged, ks, ndcg_k, mrr_k, map_k)
    if not rows:
        raise ValueError("no query in the qrels has a relevant document (grade > 0)")
    names = next(iter(rows.values())).keys()
    out: dict = {name: sum(r[name] for r in rows.values()) / len(rows) for name in names}
    out["queries"] = len(rows)
    if per_query:
        out["per_query"] = rows
    return out


def load_retrieval(spec: str, split: str = "test", seed: int = 0, limit: int | None = None):
    """(name, corpus, queries, qrels) for `tunesmith eval --task`: `retrieval` or `retrieval:builtin`
    (the generated task's split) or `retrieval:FOLDER` (a BEIR folder, qrels/<split>.tsv). `limit`
    keeps the first N judged queries (the corpus stays whole)."""
    source = spec.partition(":")[2] or "builtin"
    if source == "builtin":
        from ..data.tasks.retrieval import RetrievalTask

        corpus, queries, qrels = RetrievalTask(seed=seed).beir(split)
        name = f"retrieval:builtin (seed {seed})"
    else:
        corpus, queries, qrels = load_beir(source, split)
        name = f"retrieval:{source}"
    if limit:
        qrels = dict(list(qrels.items())[:limit])
    return name, corpus, queries, qrels


@dataclass
class RetrievalResult:
    task: str
    model: str
    metrics: dict
    timing: dict
    "Seconds: `index` (embedding the corpus or building BM25), `search` (queries), `total`."
    run: dict = field(default_factory=dict)
    "query id -> {document id: score}, the top k of each query."

    @property
    def main(self) -> float:
        return self.metrics["ndcg@10"]


def evaluate_retrieval(searcher, corpus: Corpus, queries: dict[str, str], qrels: dict[str, dict[str, int]], *,
                       k: int = 100, task: str = "retrieval", model_name: str | None = None,
                       batch_size: int = 32, progress: bool = False) -> RetrievalResult:
    """Search `corpus` for every judged query, then score the run.

    `searcher` is "bm25" or a (model, tokenizer, spec) triple from models.embedding.load_embedder.
    Only queries that appear in `qrels` with a relevant document are searched.
    """
    asked = {q: queries[q] for q in qrels if q in queries and any(g > 0 for g in qrels[q].values())}
    if not asked:
        from .runner import EvalError

        raise EvalError("none of the judged queries has a text in the queries file")
    t0 = time.perf_counter()
    timing: dict = {}
    if searcher == "bm25":
        run = bm25_search(corpus, asked, k=k, timing=timing)
        model_name = model_name or "bm25"
    else:
        model, tokenizer, spec = searcher
        run = dense_search(model, tokenizer, spec, corpus, asked, k=k, batch_size=batch_size, progress=progress,
                           timing=timing)
    timing["total"] = time.perf_counter() - t0
    metrics = retrieval_metrics(run, {q: qrels[q] for q in asked}, ks=tuple(x for x in (1, 10, 100) if x <= k) or (k,))
    metrics["corpus"] = len(corpus)
    return RetrievalResult(task, model_name or "model", metrics, timing, run)


def format_retrieval(result: RetrievalResult) -> str:
    """The metric table printed by `tunesmith eval --task retrieval:...`."""
    rows = [("task", result.task), ("model", result.model), ("queries", str(result.metrics["queries"])),
            ("corpus", str(result.metrics["corpus"]))]
    rows += [(name, f"{value:.4f}") for name, value in result.metrics.items() if "@" in name]
    rows += [(f"{name}_s", f"{value:.2f}") for name, value in result.timing.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def save_retrieval(result: RetrievalResult, path: str | Path, top: int = 10, **context) -> Path:
    """The metrics, timing and each query's top `top` documents as one JSON file (written atomically,
    like eval.runner.save_result)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{"query": q, "top": [[d, round(float(s), 6)] for d, s in
                                    sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]}
               for q, scores in result.run.items()]
    payload = {"task": result.task, "model": result.model, **context, "metrics": result.metrics,
               "timing": result.timing, "records": records}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
    return path
