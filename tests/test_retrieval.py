"""Retrieval evaluation: metrics against hand-computed cases and sentence-transformers' evaluator,
the BEIR folder reader, BM25 and dense search, the built-in generated task, and hard-negative mining."""
import json
import math
import random

import pytest

from tunesmith.data.beir import BeirError, load_beir, write_beir
from tunesmith.data.mining import (Bm25Index, MiningError, bm25_search, bm25_tokens, mine_hard_negatives, pairs_corpus,
                                   read_pairs)
from tunesmith.data.tasks import get_task, task_records
from tunesmith.data.tasks.retrieval import RetrievalTask
from tunesmith.eval.retrieval import evaluate_retrieval, ranked, retrieval_metrics

SMALL = dict(n_train=120, n_validation=20, n_test=40)


# ----------------------------------------------------------------------------- metrics by hand

def test_metrics_hand_computed_binary():
    # q1: relevant a, c; ranking b a d c (scores), so hits at ranks 2 and 4.
    # q2: relevant x; ranking x first.
    run = {"q1": {"a": 0.9, "b": 1.0, "c": 0.5, "d": 0.7}, "q2": {"x": 3.0, "y": 1.0}}
    qrels = {"q1": {"a": 1, "c": 1}, "q2": {"x": 1}}
    m = retrieval_metrics(run, qrels, ks=(1, 3, 10))
    ndcg_q1 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert m["ndcg@10"] == pytest.approx((ndcg_q1 + 1.0) / 2)
    assert m["mrr@10"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["recall@1"] == pytest.approx((0 + 1) / 2)
    assert m["recall@3"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["recall@10"] == pytest.approx(1.0)
    assert m["map@100"] == pytest.approx(((1 / 2 + 2 / 4) / 2 + 1) / 2)
    assert m["queries"] == 2


def test_metrics_graded_ties_missing_and_unjudged():
    # Graded NDCG: gains are the grades; ideal order 2, 1.
    run = {"q": {"a": 1.0, "b": 0.5, "c": 0.2}}
    m = retrieval_metrics(run, {"q": {"a": 1, "c": 2, "b": 0}})
    assert m["ndcg@10"] == pytest.approx((1 + 2 / math.log2(4)) / (2 + 1 / math.log2(3)))
    # Equal scores rank by ascending id, so the result does not depend on dict order.
    assert ranked({"b": 1.0, "a": 1.0, "c": 2.0}) == ["c", "a", "b"]
    assert retrieval_metrics({"q": {"b": 1.0, "a": 1.0}}, {"q": {"a": 1}})["mrr@10"] == 1.0
    assert retrieval_metrics({"q": {"a": 1.0, "b": 1.0}}, {"q": {"b": 1}})["mrr@10"] == 0.5
    # A query with no relevant document is left out; a query missing from the run scores 0.
    m = retrieval_metrics({"q1": {"a": 1.0}}, {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 0}})
    assert m["queries"] == 2 and m["ndcg@10"] == pytest.approx(0.5)
    # Beyond the cutoff counts for nothing.
    far = {"q": {f"d{i:03d}": 1000 - i for i in range(200)}}
    m = retrieval_metrics(far, {"q": {"d150": 1}})
    assert m["recall@100"] == 0 and m["map@100"] == 0 and m["ndcg@10"] == 0
    with pytest.raises(ValueError, match="no query"):
        retrieval_metrics({}, {"q": {"a": 0}})


def _st_metrics(run, qrels):
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    docs = sorted({d for scores in run.values() for d in scores})
    ev = InformationRetrievalEvaluator(
        queries={q: q for q in qrels}, corpus={d: d for d in docs},
        relevant_docs={q: {d for d, g in judged.items() if g > 0} for q, judged in qrels.items()},
        mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=[1, 10, 100], map_at_k=[100])
    results = [[{"corpus_id": d, "score": s} for d, s in run[q].items()] for q in ev.queries_ids]
    return ev.compute_metrics(results)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sentence_transformers(seed):
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(150)]
    run, qrels = {}, {}
    for q in range(25):
        # Scores on a coarse grid, so ties are common and the tie order is tested too.
        run[f"q{q}"] = {d: rng.randrange(40) / 4 for d in rng.sample(docs, 120)}
        qrels[f"q{q}"] = {d: 1 for d in rng.sample(docs, rng.randint(1, 12))}
    ours = retrieval_metrics(run, qrels)
    st = _st_metrics(run, qrels)
    assert ours["ndcg@10"] == pytest.approx(st["ndcg@k"][10], abs=1e-12)
    assert ours["mrr@10"] == pytest.approx(st["mrr@k"][10], abs=1e-12)
    for k in (1, 10, 100):
        assert ours[f"recall@{k}"] == pytest.approx(st["recall@k"][k], abs=1e-12)
    assert ours["map@100"] == pytest.approx(st["map@k"][100], abs=1e-12)
    assert 0 < ours["ndcg@10"] < 1  # the case is not degenerate


# ----------------------------------------------------------------------------- BEIR folders

def _beir(tmp_path, corpus=None, queries=None, qrels=None):
    corpus = corpus or {"d1": {"title": "Oslo", "text": "The capital of Norway."},
                        "d2": {"title": "", "text": "Cats sleep a lot."},
                        "d3": {"title": "", "text": "Dogs bark."}, "d4": {"title": "", "text": "Fish swim."},
                        "d5": {"title": "", "text": "Birds of Norway fly south."}}
    queries = queries or {"q1": "Norwegian capital", "q2": "how much do cats sleep"}
    qrels = qrels or {"q1": {"d1": 1}, "q2": {"d2": 2}}
    return write_beir(tmp_path / "beir", corpus, queries, qrels)


def test_beir_round_trip_and_bm25_eval(tmp_path):
    folder = _beir(tmp_path)
    corpus, queries, qrels = load_beir(folder)
    assert corpus["d1"] == {"title": "Oslo", "text": "The capital of Norway."}
    assert queries["q2"] == "how much do cats sleep" and qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}}
    result = evaluate_retrieval("bm25", corpus, queries, qrels, k=10)
    assert result.metrics["queries"] == 2 and set(result.timing) >= {"index", "search", "total"}


@pytest.mark.parametrize("where, content, message", [
    ("corpus.jsonl", '{"_id": "d1", "text": "a"}\n{"title": "x", "text": "b"}\n', r"corpus.jsonl:2: field `_id`"),
    ("corpus.jsonl", '{"_id": "d1", "text": 5}\n', r"corpus.jsonl:1: field `text` is a int"),
    ("corpus.jsonl", '{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n', r"corpus.jsonl:2: field `_id` 'd1' appears twice"),
    ("corpus.jsonl", '{"_id": "d1", "text": "a"}\n[1, 2]\n', r"corpus.jsonl:2: expected a JSON object"),
    ("corpus.jsonl", '{"_id": "d1", "text": "a"\n', r"corpus.jsonl:1: not valid JSON"),
    ("queries.jsonl", '{"_id": "q1"}\n', r"queries.jsonl:1: field `text` is missing"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\n", r"test.tsv:2: expected 3 tab-separated fields"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\thigh\n", r"test.tsv:2: field `score` must be a whole number"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td9\t1\n", r"test.tsv:3: field `corpus-id` 'd9' is not in"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq7\td1\t1\n", r"test.tsv:2: field `query-id` 'q7' is not in"),
])
def test_beir_errors_name_file_line_and_field(tmp_path, where, content, message):
    folder = _beir(tmp_path)
    (folder / where).write_text(content)
    with pytest.raises(BeirError, match=message):
        load_beir(folder)


def test_beir_missing_files(tmp_path):
    with pytest.raises(BeirError, match="not a folder"):
        load_beir(tmp_path / "nope")
    folder = _beir(tmp_path)
    with pytest.raises(BeirError, match=r"qrels/dev.tsv: file not found"):
        load_beir(folder, split="dev")


# ----------------------------------------------------------------------------- BM25

def test_bm25_finds_the_exact_document_and_keeps_k():
    corpus = {f"d{i}": {"title": "", "text": f"note number {i} about {w}"}
              for i, w in enumerate(["apples", "pears", "quantum chromodynamics", "plums", "apples and pears"])}
    run = bm25_search(corpus, {"q": "Quantum Chromodynamics!"}, k=3)
    assert ranked(run["q"])[0] == "d2" and len(run["q"]) == 3
    assert bm25_tokens("Hello, World-42!") == ["hello", "world", "42"]
    # Asking for more than the corpus returns the whole corpus.
    assert len(bm25_search(corpus, {"q": "apples"}, k=100)["q"]) == 5


def test_bm25_index_equals_rank_bm25(task):
    corpus, queries, _ = task.beir("validation")
    texts = [f"{d['title']} {d['text']}" for d in corpus.values()]
    index = Bm25Index(texts)
    for query in list(queries.values())[:10] + ["the the unknownword", ""]:
        reference = index.okapi.get_scores(bm25_tokens(query))
        assert index.scores(query) == pytest.approx(reference, rel=1e-12, abs=1e-12)
    assert index.scores(list(queries.values())[0]).max() > 0


# ----------------------------------------------------------------------------- the built-in task

@pytest.fixture(scope="module")
def task():
    return RetrievalTask(seed=0, **SMALL)


def test_task_splits_are_disjoint_in_queries_and_documents(task):
    views = {s: task.beir(s) for s in ("train", "validation", "test")}
    for a, b in [("train", "test"), ("train", "validation"), ("validation", "test")]:
        docs_a = {d["title"] for d in views[a][0].values()}
        docs_b = {d["title"] for d in views[b][0].values()}
        assert not docs_a & docs_b, (a, b)  # no entity (name) in two splits
        assert not set(views[a][0]) & set(views[b][0])
        assert not set(views[a][1].values()) & set(views[b][1].values())
    train_texts = {t for r in task.records("train") for t in [r["positive"], *r["negatives"]]}
    test_corpus, test_queries, _ = views["test"]
    assert not train_texts & {f"{d['title']} {d['text']}" for d in test_corpus.values()}
    # Sizes: each query brings its positive and 4 distractors.
    assert len(test_queries) == 40 and len(test_corpus) == 40 * 5


def test_task_is_deterministic_by_seed(task):
    again = RetrievalTask(seed=0, **SMALL)
    assert again.beir("test") == task.beir("test") and again.records("train") == task.records("train")
    other = RetrievalTask(seed=1, **SMALL)
    assert other.beir("test")[1] != task.beir("test")[1]
    # The test split does not depend on how much training data is asked for.
    assert RetrievalTask(seed=0, n_train=10, n_validation=20, n_test=40).beir("test") == task.beir("test")


def test_task_positives_and_distractors(task):
    corpus, queries, qrels = task.beir("test")
    domains = task.domains("test")
    examples = task.examples("test")
    assert [e.id for e in examples] == list(queries)
    for ex in examples:
        pos = ex.meta["positive_id"]
        assert pos in corpus and qrels[ex.id][pos] == 1
        assert ex.reference == f"{corpus[pos]['title']} {corpus[pos]['text']}"
        assert domains[pos] == ex.meta["domain"]
        # The query never names the entity it asks for.
        assert corpus[pos]["title"] not in ex.prompt
    for rec in task.records("test"):
        assert len(rec["negatives"]) == 4 and rec["positive"] not in rec["negatives"]
        assert rec["domain"] in {"company", "person", "product", "venue"}
    # Distractors are hard: the same domain as the positive, and they share most of its words.
    by_text = {f"{d['title']} {d['text']}": i for i, d in corpus.items()}
    rec = task.records("test")[0]
    assert {domains[by_text[n]] for n in rec["negatives"]} == {rec["domain"]}
    assert {r["domain"] for r in task.records("train")} == {"company", "person", "product", "venue"}


def test_task_records_reach_the_data_pipeline():
    from tunesmith.data.sources import read_records

    task = get_task("retrieval")
    assert task_records(task, "validation")[0].keys() == {"query", "positive", "negatives", "domain"}
    first = next(iter(read_records("task:retrieval/train")))
    assert first.where == "task:retrieval/train[#0]" and set(first.fields) == {"query", "positive", "negatives", "domain"}


def test_bm25_on_the_task_is_far_from_perfect_and_far_from_zero(task):
    corpus, queries, qrels = task.beir("test")
    m = evaluate_retrieval("bm25", corpus, queries, qrels).metrics
    assert 0.1 < m["ndcg@10"] < 0.8


# ----------------------------------------------------------------------------- mining

def _bm25(corpus, queries, k):
    return bm25_search(corpus, queries, k)


def test_mining_never_returns_a_positive_and_skips_the_top(tmp_path):
    rows = [{"query": "red apples", "positive": "red apples are sweet", "domain": "food"},
            {"query": "red apples", "positive": "apples that are red"},
            {"query": "green pears", "positive": "green pears are crisp"}]
    corpus = {"a": {"title": "", "text": "red apples are sweet"},
              "b": {"title": "Apples", "text": "apples that are red"},  # a positive with a title
              "c": "red apples and red cherries", "d": "red cars", "e": "apples in pies", "f": "green pears are crisp",
              "g": "green tea"}
    mined, stats = mine_hard_negatives(rows, corpus, _bm25, negatives=2)
    positives = {"red apples are sweet", "apples that are red", "Apples apples that are red"}
    for r in mined[:2]:
        assert not set(r["negatives"]) & positives and len(r["negatives"]) == 2
    assert mined[0]["negatives"][0] == "red apples and red cherries" and mined[0]["domain"] == "food"
    assert "green pears are crisp" not in mined[2]["negatives"]
    skipped, _ = mine_hard_negatives(rows, corpus, _bm25, negatives=2, skip_top=1)
    assert skipped[0]["negatives"][0] == mined[0]["negatives"][1]
    assert stats == {"rows": 3, "queries": 2, "corpus": 7, "short": 0}
    # Without a corpus, the positives of the other rows are the candidates.
    from_pairs, _ = mine_hard_negatives(rows, pairs_corpus(rows), _bm25, negatives=1)
    assert from_pairs[2]["negatives"][0] in {"red apples are sweet", "apples that are red"}
    assert from_pairs[0]["negatives"] == ["green pears are crisp"]
    with pytest.raises(MiningError):
        mine_hard_negatives(rows, corpus, _bm25, negatives=0)


def test_read_pairs_uses_the_contrastive_formats(tmp_path):
    from tunesmith.data import DataError

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"anchor": "q", "positive": "p"}) + "\n" + json.dumps({"query": "q2"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:2: .*'positive'"):
        read_pairs(path)
    path.write_text(json.dumps({"anchor": "q", "positive": "p", "negatives": 3}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:1: field 'negatives'"):
        read_pairs(path)
    path.write_text(json.dumps({"anchor": "q", "positive": "p", "negative": "n", "domain": "x"}) + "\n")
    assert read_pairs(path) == [{"query": "q", "positive": "p", "negatives": ["n"], "domain": "x"}]


# ----------------------------------------------------------------------------- dense search and the CLI

@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A tiny random BERT with MiniLM's tokenizer, saved as a model folder load_embedder reads."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from tunesmith.models.embedding import encoder_folder

    tok = AutoTokenizer.from_pretrained(str(encoder_folder()))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=512))
    path = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_dense_search_blocks_do_not_change_the_result(tiny_bert_dir, task):
    import torch

    from tunesmith.eval.retrieval import dense_search
    from tunesmith.infer.embed import load_embedder
    from tunesmith.models.embedding import embed_texts

    model, tok, spec = load_embedder(str(tiny_bert_dir))
    corpus, queries, _ = task.beir("validation")
    queries = dict(list(queries.items())[:7])
    whole = dense_search(model, tok, spec, corpus, queries, k=15)
    blocked = dense_search(model, tok, spec, corpus, queries, k=15, query_block=3, corpus_block=11)
    assert {q: ranked(s) for q, s in whole.items()} == {q: ranked(s) for q, s in blocked.items()}
    # Against brute-force cosine over the whole corpus.
    ids = list(corpus)
    d = torch.nn.functional.normalize(embed_texts(model, tok, [f"{corpus[i]['title']} {corpus[i]['text']}" for i in ids],
                                                  spec, kind="document"), dim=-1)
    q = torch.nn.functional.normalize(embed_texts(model, tok, list(queries.values()), spec, kind="query"), dim=-1)
    sims = q @ d.T
    for row, qid in enumerate(queries):
        assert ranked(whole[qid]) == [ids[j] for j in sims[row].argsort(descending=True)[:15].tolist()]
        assert whole[qid][ranked(whole[qid])[0]] == pytest.approx(float(sims[row].max()), abs=1e-5)


def test_cli_eval_retrieval_end_to_end(tiny_bert_dir, tmp_path, capsys):
    from tunesmith.cli import main

    out = tmp_path / "res.json"
    assert main(["eval", "--task", "retrieval:builtin", "--split", "validation", "--model", str(tiny_bert_dir),
                 "--limit", "12", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ndcg@10" in printed and "recall@100" in printed
    saved = json.loads(out.read_text())
    assert saved["metrics"]["queries"] == 12 and saved["metrics"]["corpus"] == 500
    assert len(saved["records"]) == 12 and len(saved["records"][0]["top"]) == 10
    # A BEIR folder with BM25; a broken one is one line on stderr, exit code 2.
    folder = _beir(tmp_path)
    assert main(["eval", "--task", f"retrieval:{folder}", "--model", "bm25", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"]["mrr@10"] == 1.0
    (folder / "queries.jsonl").write_text('{"_id": "q1"}\n')
    assert main(["eval", "--task", f"retrieval:{folder}", "--model", "bm25"]) == 2
    err = capsys.readouterr().err
    assert "queries.jsonl:1: field `text` is missing" in err and "Traceback" not in err


def test_cli_mine(tiny_bert_dir, tmp_path, task):
    from tunesmith.cli import main

    pairs = tmp_path / "pairs.jsonl"
    rows = [{k: r[k] for k in ("query", "positive", "domain")} for r in task.records("validation")]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "mined.jsonl"
    assert main(["mine", "--input", str(pairs), "--from-pairs", "--negatives", "3", "--output", str(out)]) == 0
    mined = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(mined) == len(rows) and all(len(m["negatives"]) == 3 and m["positive"] not in m["negatives"]
                                           for m in mined)
    assert mined[0]["domain"] == rows[0]["domain"]
    corpus_folder = write_beir(tmp_path / "b", *task.beir("validation"))
    assert main(["mine", "--input", str(pairs), "--corpus", str(corpus_folder / "corpus.jsonl"), "--method", "model",
                 "--model", str(tiny_bert_dir), "--negatives", "2", "--skip-top", "1", "--output", str(out)]) == 0
    mined = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(len(m["negatives"]) == 2 and m["positive"] not in m["negatives"] for m in mined)
