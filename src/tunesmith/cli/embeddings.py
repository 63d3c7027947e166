"""The embedding verbs: `embed`, `mine`, and the parts of `export` and `eval` that serve embedders
and rerankers (`export --format st`, `eval --task retrieval:...`, `eval --task rerank:...`).

    tunesmith embed --adapter runs/emb --input texts.jsonl --output vectors.npy
    tunesmith mine --input pairs.jsonl --from-pairs --method bm25 --negatives 5 --output mined.jsonl
"""
from __future__ import annotations


def add_embedding_verbs(sub, model_args) -> None:
    """The `embed` and `mine` subcommands (`model_args` adds --model/--adapter/--dtype)."""
    p = sub.add_parser("embed", help="embed the texts of a file ({\"text\": ...} JSONL or .txt) into a .npy")
    model_args(p)
    p.add_argument("--input", required=True, help="JSONL with a `text` per line, or a .txt with one text per line")
    p.add_argument("--output", required=True, help="the .npy to write: float32 (n, d), row i = text i")
    p.add_argument("--kind", default="document", choices=["query", "document"],
                   help="which of the embedder's prefixes to add (its query or document prefix)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--domain", default=None,
                   help="a domain-expert (MoE) embedder: run every text through this domain's expert")
    p.set_defaults(fn=cmd_embed)

    p = sub.add_parser("mine", help="add hard negatives to (query, positive) pairs by searching a corpus")
    model_args(p)
    p.add_argument("--input", required=True, help="pairs: query (or anchor) and positive per record, or task:NAME/SPLIT")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--corpus", default=None, help="a BEIR corpus.jsonl (_id, title, text) to mine from")
    where.add_argument("--from-pairs", action="store_true", help="mine from the positives of the input itself")
    p.add_argument("--method", default="bm25", choices=["bm25", "model"], help="bm25, or the --model/--adapter embedder")
    p.add_argument("--negatives", type=int, default=5, help="hard negatives per row")
    p.add_argument("--skip-top", type=int, default=0,
                   help="skip this many best candidates after the positives (likely unlabelled positives)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--output", required=True, help="the JSONL to write: each row with its `negatives`")
    p.set_defaults(fn=cmd_mine)


def export_st(args) -> int:
    """`export --format st`: an embedder as a sentence-transformers folder."""
    from ..export.atomic import ExportError
    from ..export.sentence_transformers import export_sentence_transformers
    from ..infer.embed import load_embedder

    if args.quant is not None:
        raise ExportError("--quant is for --format gguf / gguf-lora; a sentence-transformers folder takes --dtype")
    model, tokenizer, spec = load_embedder(args.model, args.adapter, dtype=args.dtype)
    out = export_sentence_transformers(model, tokenizer, spec, args.output)
    print(f"[tunesmith] sentence-transformers folder written to {out} (pooling {spec.pooling}"
          f"{', bidirectional' if spec.bidirectional else ''})")
    return 0


def cmd_embed(args) -> int:
    from ..infer.embed import embed_file, load_embedder

    model, tokenizer, spec = load_embedder(args.model, args.adapter, dtype=args.dtype)
    out = embed_file(model, tokenizer, spec, args.input, args.output, kind=args.kind, batch_size=args.batch_size,
                     domain=args.domain)
    print(f"[tunesmith] {args.kind} vectors written to {out}")
    return 0


def _searcher(args):
    """`--model bm25`, or an embedder (any model, run or adapter folder load_embedder reads)."""
    if args.model == "bm25":
        return "bm25", "bm25"
    from ..infer.embed import load_embedder

    model, tokenizer, spec = load_embedder(args.model, args.adapter, dtype=args.dtype)
    return (model, tokenizer, spec), args.adapter or args.model


def eval_retrieval(args) -> int:
    """`eval --task retrieval:builtin|FOLDER`: an embedder or BM25 on a retrieval test split."""
    from ..eval.retrieval import evaluate_retrieval, format_retrieval, load_retrieval, save_retrieval

    name, corpus, queries, qrels = load_retrieval(args.task, args.split, seed=args.seed, limit=args.limit)
    searcher, label = _searcher(args)
    result = evaluate_retrieval(searcher, corpus, queries, qrels, task=name, model_name=label,
                                batch_size=args.batch_size, progress=True)
    out = args.output or f"eval-retrieval-{args.split}.json"
    save_retrieval(result, out, split=args.split, adapter=args.adapter)
    print(format_retrieval(result))
    print(f"[tunesmith] metrics and each query's top 10: {out}")
    return 0


def eval_rerank(args) -> int:
    """`eval --task rerank:builtin|FOLDER`: BM25 top k before and after the model reranks it."""
    from ..eval.rerank import evaluate_rerank, format_rerank, save_rerank
    from ..eval.retrieval import load_retrieval

    source = args.task.partition(":")[2] or "builtin"
    name, corpus, queries, qrels = load_retrieval(f"retrieval:{source}", args.split, seed=args.seed, limit=args.limit)
    from . import _load

    model, tok = _load(args)
    result = evaluate_rerank(model, tok, corpus, queries, qrels, top_k=args.top_k, mode=args.mode, window=args.window,
                             step=args.step, passage_tokens=args.passage_tokens, batch_size=args.batch_size,
                             task=name.replace("retrieval", "rerank", 1))
    out = args.output or f"eval-rerank-{args.split}.json"
    save_rerank(result, out, model=args.model, adapter=args.adapter, split=args.split)
    print(format_rerank(result))
    print(f"[tunesmith] per-query orders and answers: {out}")
    return 0


def cmd_mine(args) -> int:
    from ..data.beir import read_corpus
    from ..data.mining import bm25_search, dense_search, mine_hard_negatives, pairs_corpus, read_pairs, write_jsonl

    rows = read_pairs(args.input)
    corpus = read_corpus(args.corpus) if args.corpus else pairs_corpus(rows)
    if args.method == "bm25":
        search = bm25_search
    else:
        (model, tokenizer, spec), _ = _searcher(args)
        def search(c, q, k):
            return dense_search(model, tokenizer, spec, c, q, k, batch_size=args.batch_size, progress=True)
    mined, stats = mine_hard_negatives(rows, corpus, search, negatives=args.negatives, skip_top=args.skip_top)
    write_jsonl(mined, args.output)
    print(f"[tunesmith] {stats['rows']} rows ({stats['queries']} distinct queries) mined against {stats['corpus']} "
          f"documents with {args.method}; {stats['short']} got fewer than {args.negatives} negatives")
    print(f"[tunesmith] written to {args.output}")
    return 0
