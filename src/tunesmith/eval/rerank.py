"""Rerank evaluation: NDCG@10 of BM25's top k before and after a listwise LLM reranker.

    name, corpus, queries, qrels = load_retrieval("retrieval:builtin", "test")   # or retrieval:BEIR_FOLDER
    result = evaluate_rerank(model, tokenizer, corpus, queries, qrels, top_k=20, mode="full")
    print(format_rerank(result))

    tunesmith eval --task rerank:builtin --adapter runs/rank --top-k 20 --mode full|window

Both runs are scored by `eval.retrieval.retrieval_metrics` over the same judged queries, so the
difference is the reranker's alone: it can only reorder the k candidates, and a query whose relevant
document BM25 missed scores 0 either way (that ceiling is reported as recall@k).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..data.ranking import PASSAGE_TOKENS, candidate_order
from ..infer.rerank import MODES, rerank
from .retrieval import bm25_search, doc_text, retrieval_metrics


class RerankEvalError(ValueError):
    """A rerank evaluation that cannot run as asked; the message says what to change."""


@dataclass
class RerankEvalResult:
    task: str
    mode: str
    top_k: int
    before: dict
    "retrieval_metrics of the BM25 top k."
    after: dict
    "retrieval_metrics of the reranked top k."
    latency: dict
    "Per query: mean/median/max seconds of reranking, generated tokens, prompts (windows)."
    complete: float
    "Fraction of the model's answers that named every candidate exactly once."
    records: list = field(default_factory=list)
    "Per query: id, the BM25 order, the reranked order, the raw answers."

    @property
    def main(self) -> float:
        return self.after["ndcg@10"]


def evaluate_rerank(model, tokenizer, corpus: dict, queries: dict[str, str], qrels: dict[str, dict[str, int]], *,
                    top_k: int = 20, mode: str = "full", window: int = 20, step: int = 10,
                    passage_tokens: int = PASSAGE_TOKENS, limit: int | None = None, batch_size: int = 1,
                    task: str = "rerank", run: dict | None = None, skip_unfound: bool = False) -> RerankEvalResult:
    """BM25 top `top_k` of each judged query (first `limit` in qrels order), reranked by the model.

    `run` replaces the BM25 search (any first-stage {qid: {doc: score}}). Latency is wall time per
    query with `batch_size` queries decoding together (1: one query at a time). `skip_unfound` keeps
    BM25's order, without asking the model, for queries whose top k holds no relevant document:
    any order of those scores 0, so the metrics are the same and the time goes where it can count
    (latency is then measured on the reranked queries)."""
    if mode not in MODES:
        raise RerankEvalError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if top_k < 1:
        raise RerankEvalError(f"--top-k must be >= 1, got {top_k}")
    judged = [q for q in qrels if q in queries and any(g > 0 for g in qrels[q].values())][:limit]
    if not judged:
        raise RerankEvalError("no judged query (a qrels grade > 0) has a text in the queries")
    if run is None:
        run = bm25_search(corpus, {q: queries[q] for q in judged}, k=top_k)
    tops = {q: candidate_order(run.get(q, {}))[:top_k] for q in judged}
    asked = [q for q in judged if not skip_unfound or any(qrels[q].get(d, 0) > 0 for d in tops[q])]
    lists = [(queries[q], [doc_text(corpus[d]) for d in tops[q]]) for q in asked]
    t0 = time.perf_counter()
    results = rerank(model, tokenizer, lists, mode=mode, window=window, step=step, passage_tokens=passage_tokens,
                     batch_size=batch_size) if lists else []
    wall = time.perf_counter() - t0
    reranked = {**tops, **{q: [tops[q][i] for i in r.order] for q, r in zip(asked, results)}}
    sub = {q: qrels[q] for q in judged}
    ks = tuple(sorted({1, 10, top_k}))
    before = retrieval_metrics({q: _scores(tops[q]) for q in judged}, sub, ks=ks)
    after = retrieval_metrics({q: _scores(reranked[q]) for q in judged}, sub, ks=ks)
    seconds = sorted(r.seconds for r in results) or [0.0]
    n = max(len(results), 1)
    latency = {"mean_s": sum(seconds) / len(seconds), "median_s": seconds[len(seconds) // 2], "max_s": seconds[-1],
               "wall_s": wall, "tokens": sum(r.generated_tokens for r in results) / n,
               "prompts": sum(r.windows for r in results) / n, "reranked_queries": len(results)}
    prompts = sum(r.windows for r in results)
    records = [{"query": q, "bm25": tops[q], "reranked": reranked[q], "answers": r.answers,
                "seconds": round(r.seconds, 4)} for q, r in zip(asked, results)]
    return RerankEvalResult(task=task, mode=mode, top_k=top_k, before=before, after=after, latency=latency,
                            complete=sum(r.complete for r in results) / max(prompts, 1), records=records)


def _scores(order: list[str]) -> dict[str, float]:
    """A run entry that ranks `order` as given (higher score first)."""
    return {d: float(len(order) - i) for i, d in enumerate(order)}


def format_rerank(result: RerankEvalResult) -> str:
    """The table printed by `tunesmith eval --task rerank:...`."""
    k = result.top_k
    rows = [("task", result.task), ("mode", result.mode),
            ("queries", f"{result.after['queries']} ({result.latency['reranked_queries']} reranked)"),
            ("candidates", f"BM25 top {k}")]
    for name in ("ndcg@10", "mrr@10", f"recall@{k}"):
        if name in result.after:
            rows.append((name, f"{result.before[name]:.4f} -> {result.after[name]:.4f}"))
    rows += [("complete answers", f"{100 * result.complete:.1f}%"),
             ("seconds/query", f"{result.latency['mean_s']:.2f} (median {result.latency['median_s']:.2f})"),
             ("tokens/query", f"{result.latency['tokens']:.1f} in {result.latency['prompts']:.1f} prompts")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def save_rerank(result: RerankEvalResult, path: str | Path, **context) -> Path:
    """Metrics, latency and per-query orders as one JSON file (written aside, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"task": result.task, "mode": result.mode, "top_k": result.top_k, **context,
               "before": result.before, "after": result.after, "latency": result.latency,
               "complete": result.complete, "records": result.records}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
    return path
