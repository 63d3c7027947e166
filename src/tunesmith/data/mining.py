"""Searching a corpus (BM25 or an embedding model) and mining hard negatives from the results.

    run = bm25_search(corpus, queries, k=100)                       # {qid: {doc id: score}}
    run = dense_search(model, tokenizer, spec, corpus, queries)     # cosine, models.embedding
    rows = mine_hard_negatives(pairs, corpus_texts, search, negatives=5, skip_top=0)

Both searches live in the data layer because data builders (negatives here, reranking candidate
lists) need them as much as evaluation does; eval.retrieval re-exports them.

Mining, as sentence-transformers' mine_hard_negatives does it: search with the query, drop every
known positive of that query (the same query text may come with several), optionally drop the next
`skip_top` candidates too — near the top of a good retriever many "negatives" are unlabelled
positives, and training against them hurts — then keep the next `negatives` candidates.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import DataError

_WORD = re.compile(r"\w+")


class MiningError(DataError):
    """Pairs or a corpus that mining cannot use; the message names the file and line."""


def bm25_tokens(text: str) -> list[str]:
    """The BM25 tokenizer: lowercase word characters (letters, digits, underscore), nothing else."""
    return _WORD.findall(text.lower())


def doc_text(doc) -> str:
    """A corpus entry as one string: "title text" (BEIR's convention for dense models), or the string."""
    if isinstance(doc, str):
        return doc
    return f"{doc.get('title') or ''} {doc['text']}".strip()


def _top_k(scores: np.ndarray, ids: list[str], id_rank: np.ndarray, k: int) -> dict[str, float]:
    """The k best (score, then ascending id) of one query's scores over the whole corpus."""
    k = min(k, len(ids))
    if k < len(ids):
        threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
        candidates = np.flatnonzero(scores >= threshold)  # ties at the threshold all stay in
    else:
        candidates = np.arange(len(ids))
    order = candidates[np.lexsort((id_rank[candidates], -scores[candidates]))][:k]
    return {ids[i]: float(scores[i]) for i in order}


def _id_ranks(ids: list[str]) -> np.ndarray:
    ranks = np.empty(len(ids), dtype=np.int64)
    ranks[sorted(range(len(ids)), key=ids.__getitem__)] = np.arange(len(ids))
    return ranks


class Bm25Index:
    """rank-bm25's BM25Okapi (its idf, with the epsilon floor for very common terms, and document
    lengths), scored from per-term postings: BM25Okapi.get_scores walks every document for every
    query term in Python, which makes mining thousands of queries take minutes; the sums here are
    the same numbers (tested against get_scores)."""

    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75):
        from rank_bm25 import BM25Okapi

        # An empty document would make rank-bm25 divide by zero in its average length; one dummy token is inert.
        okapi = BM25Okapi([bm25_tokens(t) or ["\0"] for t in texts], k1=k1, b=b)
        self.okapi, self.n = okapi, len(texts)
        norm = k1 * (1 - b + b * np.asarray(okapi.doc_len, dtype=np.float64) / okapi.avgdl)
        postings: dict[str, tuple[list[int], list[int]]] = {}
        for i, freqs in enumerate(okapi.doc_freqs):
            for term, tf in freqs.items():
                docs, tfs = postings.setdefault(term, ([], []))
                docs.append(i)
                tfs.append(tf)
        self.postings = {}
        for term, (docs, tfs) in postings.items():
            docs_a, tf_a = np.asarray(docs), np.asarray(tfs, dtype=np.float64)
            self.postings[term] = (docs_a, okapi.idf[term] * tf_a * (k1 + 1) / (tf_a + norm[docs_a]))

    def scores(self, query: str) -> np.ndarray:
        out = np.zeros(self.n)
        for term in bm25_tokens(query):  # a repeated query word counts each time, as in BM25Okapi
            if term in self.postings:
                docs, weights = self.postings[term]
                out[docs] += weights
        return out


def bm25_search(corpus: dict, queries: dict[str, str], k: int = 100, timing: dict | None = None,
                k1: float = 1.5, b: float = 0.75) -> dict[str, dict[str, float]]:
    """BM25 (Okapi, rank-bm25's formula) top `k` documents per query: {qid: {doc id: score}}.

    `corpus` maps ids to BEIR documents ({"title", "text"}) or to plain strings.
    """
    t0 = time.perf_counter()
    ids = list(corpus)
    index = Bm25Index([doc_text(corpus[d]) for d in ids], k1=k1, b=b)
    id_rank = _id_ranks(ids)
    t1 = time.perf_counter()
    run = {qid: _top_k(index.scores(text), ids, id_rank, k) for qid, text in queries.items()}
    if timing is not None:
        timing.update(index=t1 - t0, search=time.perf_counter() - t1)
    return run


def dense_search(model, tokenizer, spec, corpus: dict, queries: dict[str, str], k: int = 100, *,
                 batch_size: int = 32, progress: bool = False, timing: dict | None = None,
                 query_block: int = 256, corpus_block: int = 20000) -> dict[str, dict[str, float]]:
    """Cosine top `k` documents per query with an embedding model (models.embedding.embed_texts;
    queries get the spec's query prefix, documents its document prefix).

    Scores are computed block by block (`query_block` x `corpus_block`) and merged into a running
    top k, so memory beyond the embeddings stays flat however large the corpus.
    """
    import torch

    from ..models.embedding import embed_texts

    t0 = time.perf_counter()
    ids = list(corpus)
    docs = torch.as_tensor(embed_texts(model, tokenizer, [doc_text(corpus[d]) for d in ids], spec,
                                       batch_size=batch_size, kind="document", progress=progress)).float()
    docs = torch.nn.functional.normalize(docs, dim=-1)
    t1 = time.perf_counter()
    qids = list(queries)
    qs = torch.as_tensor(embed_texts(model, tokenizer, [queries[q] for q in qids], spec,
                                     batch_size=batch_size, kind="query", progress=progress)).float()
    qs = torch.nn.functional.normalize(qs, dim=-1)
    k = min(k, len(ids))
    run = {}
    for qs_start in range(0, len(qids), query_block):
        block = qs[qs_start:qs_start + query_block]
        best_s = torch.full((len(block), 0), float("-inf"))
        best_i = torch.zeros((len(block), 0), dtype=torch.long)
        for start in range(0, len(ids), corpus_block):
            sims = block @ docs[start:start + corpus_block].T  # (q, chunk)
            s, i = sims.topk(min(k, sims.shape[1]), dim=1)
            best_s, pick = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
            best_i = torch.cat([best_i, i + start], 1).gather(1, pick)
        for row, qid in enumerate(qids[qs_start:qs_start + query_block]):
            run[qid] = {ids[j]: float(v) for j, v in zip(best_i[row].tolist(), best_s[row].tolist())}
    if timing is not None:
        timing.update(index=t1 - t0, search=time.perf_counter() - t1)
    return run


# ----------------------------------------------------------------------------- mining

def read_pairs(path: str | Path) -> list[dict]:
    """The (query, positive) rows of any file the contrastive data takes (data.pairs: `query` or
    `anchor`, `positive`, optional negatives and `domain`; errors name the record and field), as
    {"query", "positive", "negatives", "domain"?}; `task:retrieval/train` works too."""
    from .pairs import pair_record
    from .sources import read_records

    rows = []
    for r in map(pair_record, read_records(path)):
        rows.append({"query": r.query, "positive": r.positive, "negatives": r.negatives,
                     **({"domain": r.domain} if r.domain is not None else {})})
    if not rows:
        raise MiningError(f"{path}: no records")
    return rows


def pairs_corpus(rows: list[dict]) -> dict[str, str]:
    """The corpus mined from when none is given: every distinct positive and listed negative."""
    texts = dict.fromkeys(t for r in rows for t in [r["positive"], *r.get("negatives", [])])
    return {f"p{i}": t for i, t in enumerate(texts)}


Search = Callable[[dict, dict, int], dict]
"(corpus, queries, k) -> run; e.g. `lambda c, q, k: bm25_search(c, q, k)`."


def mine_hard_negatives(rows: list[dict], corpus: dict, search: Search, negatives: int = 5,
                        skip_top: int = 0) -> tuple[list[dict], dict]:
    """Each row with `negatives` hard negatives from `corpus` (a row's existing ones are replaced).

    A candidate is never a positive of the row's query (compared by text, so the same document in
    the corpus under any id is caught, with or without its title). Returns (rows, stats); a row
    whose search runs dry gets fewer negatives, counted in stats["short"].
    """
    if negatives < 1 or skip_top < 0:
        raise MiningError(f"need negatives >= 1 and skip_top >= 0 (got {negatives}, {skip_top})")
    positives: dict[str, set[str]] = {}
    for r in rows:
        positives.setdefault(r["query"], set()).add(r["positive"].strip())
    qids = {text: f"q{i}" for i, text in enumerate(positives)}
    texts = {d: doc_text(doc).strip() for d, doc in corpus.items()}
    bodies = {d: (doc["text"].strip() if isinstance(doc, dict) else texts[d]) for d, doc in corpus.items()}
    k = min(len(corpus), skip_top + negatives + 4 * max(len(p) for p in positives.values()) + 8)
    run = search(corpus, {qid: text for text, qid in qids.items()}, k)
    out, short = [], 0
    for r in rows:
        known = positives[r["query"]]
        found = [texts[d] for d in sorted(run[qids[r["query"]]], key=lambda d: (-run[qids[r["query"]]][d], d))
                 if texts[d] not in known and bodies[d] not in known]
        found = list(dict.fromkeys(found))[skip_top:skip_top + negatives]
        short += len(found) < negatives
        out.append({**r, "negatives": found})
    return out, {"rows": len(out), "queries": len(qids), "corpus": len(corpus), "short": short}


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
