"""Listwise full ranking: the importance weights, the prompt builder, the answer parser, the sliding
window, rerank evaluation and a tiny end-to-end `tunesmith train` with objective listwise."""
import json
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F

from tunesmith.data import DataError, collate
from tunesmith.data.ranking import (RankingItem, answer_text, clean_passage, importance_weights, load_rankings,
                                    rank_weight, ranking_item, ranking_records, ranking_sample, shuffled_prompt)
from tunesmith.data.render import Renderer
from tunesmith.infer.rerank import (WindowAnswer, parse_ranking, rerank, sliding_window, window_starts)

from conftest import lively_model


def w(r):
    return 1 + 1 / math.log2(r + 1)


# ---- importance weights


def test_rank_weight_formula():
    assert rank_weight(1) == 2.0
    assert rank_weight(2) == pytest.approx(1 + 1 / math.log2(3))
    assert rank_weight(3) == pytest.approx(1.5)
    assert rank_weight(7) == pytest.approx(1 + 1 / 3)


def test_importance_weights_by_hand():
    # "[2] > [10] > [1]" cut as SmolLM2 cuts it: [ 2 ] ␣> ␣[ 1 0 ] ␣> ␣[ 1 ]
    answer = "[2] > [10] > [1]"
    pieces = ["[", "2", "]", " >", " [", "1", "0", "]", " >", " [", "1", "]"]
    spans, at = [], 0
    for p in pieces:
        spans.append((at, at + len(p)))
        at += len(p)
    assert "".join(pieces) == answer
    got = importance_weights(answer, spans)
    expected = [2, 2, 2, 1, w(2), w(2), w(2), w(2), 1, 1.5, 1.5, 1.5]
    assert got == pytest.approx(expected, abs=1e-12)


def test_importance_weights_separator_merged_with_bracket():
    # a tokenizer that merges "]>" makes that token the separator; the next id is rank 2
    answer = "[1]>[2]>[3]"
    spans = [(0, 1), (1, 2), (2, 4), (4, 5), (5, 6), (6, 8), (8, 9), (9, 10), (10, 11)]
    assert importance_weights(answer, spans) == pytest.approx([2, 2, 1, w(2), w(2), 1, 1.5, 1.5, 1.5])


def test_rendered_sample_weights_answer_tokens_only(tokenizer):
    renderer = Renderer(tokenizer, assistant_turns="last")
    item = RankingItem("capital of france", ["Berlin is in Germany.", "Paris is the capital of France.",
                                             "Lyon is a city."], order=[1, 2, 0])
    sample = ranking_sample(renderer, item, rng=None)  # prompt order as given: answer [2] > [3] > [1]
    trained = [(tokenizer.convert_ids_to_tokens(i), wt) for i, wt in zip(sample["input_ids"], sample["weights"]) if wt]
    tokens = [t for t, _ in trained]
    assert tokenizer.convert_tokens_to_string(tokens) == "[2] > [3] > [1]<|im_end|>"
    assert [wt for _, wt in trained] == pytest.approx([2, 2, 2, 1, w(2), w(2), w(2), 1, 1.5, 1.5, 1.5, 1])
    # nothing before the answer trains
    first = next(i for i, wt in enumerate(sample["weights"]) if wt)
    assert tokenizer.decode(sample["input_ids"][:first]).endswith("<|im_start|>assistant\n")


def test_plain_weights_without_importance(tokenizer):
    renderer = Renderer(tokenizer, assistant_turns="last")
    item = RankingItem("q", ["a", "b", "c"], order=[2, 0, 1])
    weighted = ranking_sample(renderer, item, rng=None)
    plain = ranking_sample(renderer, item, rng=None, importance=False)
    assert weighted["input_ids"] == plain["input_ids"]
    assert [x > 0 for x in weighted["weights"]] == [x > 0 for x in plain["weights"]]
    assert set(plain["weights"]) == {0.0, 1.0} and max(weighted["weights"]) == 2.0


def _direct_loss(model, samples):
    """Σ w·NLL and the count of weighted tokens, from each sample's full logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s["input_ids"]])
            nll = F.cross_entropy(model(ids).logits[0, :-1].float(), ids[0, 1:], reduction="none")
            wts = torch.tensor(s["weights"][1:])
            total += float((nll * wts).sum())
            count += int((wts > 0).sum())
    return total, count


def test_loss_is_weighted_nll_over_trained_tokens(tokenizer):
    """The objective's (loss_sum, units) against a direct computation from full logits."""
    from tunesmith.objectives.listwise import Listwise

    renderer = Renderer(tokenizer, assistant_turns="last")
    items = [RankingItem("q one", ["alpha", "beta", "gamma"], [2, 0, 1]),
             RankingItem("q two", ["delta", "eps"], [1, 0])]
    model = lively_model(tokenizer)
    sums = {}
    for importance in (True, False):
        samples = [ranking_sample(renderer, it, rng=random.Random(i), importance=importance)
                   for i, it in enumerate(items)]
        batch = collate(samples, packing=True, pad_id=tokenizer.pad_token_id)
        with torch.no_grad():
            loss_sum, units, _ = Listwise(chunk=7)(model, batch)
        total, count = _direct_loss(model, samples)
        assert units == count
        assert float(loss_sum) == pytest.approx(total, rel=1e-4)
        sums[importance] = float(loss_sum)
    assert sums[True] > sums[False] * 1.2  # the same tokens, the top ranks weighing up to 2


# ---- prompt builder and records


def _prompt_lines(text):
    return dict(re.findall(r"^\[(\d+)\] (.*)$", text, flags=re.M))


def test_shuffled_prompt_is_consistent_with_gold(tokenizer):
    passages = [f"passage number {i}" for i in range(12)]
    order = [5, 2, 11, 0, 1, 3, 4, 6, 7, 8, 9, 10]
    item = RankingItem("q", passages, order)
    shown, labels = shuffled_prompt(item, random.Random(3))
    assert shown != passages and sorted(shown) == sorted(passages)  # really shuffled, nothing lost
    assert [shown[label - 1] for label in labels] == [passages[i] for i in order]
    again, labels2 = shuffled_prompt(item, random.Random(3))
    assert again == shown and labels2 == labels  # seeded
    # rendered: the answer's ids point at the gold passages through the prompt's own lines
    renderer = Renderer(tokenizer, assistant_turns="last")
    sample = ranking_sample(renderer, item, rng=random.Random(3))
    text = tokenizer.decode(sample["input_ids"])
    prompt, answer = text.split("<|im_start|>assistant\n")
    lines, answer = _prompt_lines(prompt), answer.split("<|im_end|>")[0]
    assert answer == answer_text(labels)
    assert [lines[i] for i in re.findall(r"\[(\d+)\]", answer)] == [passages[i] for i in order]


def test_passages_cut_to_tokens_and_one_line(tokenizer):
    text = "one two three\nfour five six seven eight"
    cut = clean_passage(tokenizer, text, 4)
    assert "\n" not in cut and len(tokenizer(cut, add_special_tokens=False)["input_ids"]) == 4
    assert "one two three four five six seven eight".startswith(cut)
    assert clean_passage(tokenizer, "short", 100) == "short"


def test_relevance_gives_stable_gold_order():
    item = ranking_item({"query": "q", "passages": ["a", "b", "c", "d", "e"], "relevance": [0, 2, 1, 2, 0]}, "f:1")
    assert item.order == [1, 3, 2, 0, 4]
    item = ranking_item({"query": "q", "passages": [{"id": "x", "text": "a"}, {"id": "y", "text": "b"},
                                                    {"id": "z", "text": "c"}], "relevance": {"z": 1}}, "f:1")
    assert item.order == [2, 0, 1]
    item = ranking_item({"query": "q", "passages": ["a", "b", "c"], "ranking": [3, 1, 2]}, "f:1")
    assert item.order == [2, 0, 1]


@pytest.mark.parametrize("record, message", [
    ({"passages": ["a"], "ranking": [1]}, "field 'query' is missing"),
    ({"query": "q", "passages": [], "ranking": []}, "field 'passages'"),
    ({"query": "q", "passages": ["a", 3], "ranking": [1, 2]}, "passages[1] is int"),
    ({"query": "q", "passages": ["a", "b"], "ranking": [1, 7]}, "ranking[1] = 7 is not a passage id"),
    ({"query": "q", "passages": ["a", "b"], "ranking": [1, 1]}, "ranking[1] = 1 appears twice"),
    ({"query": "q", "passages": ["a", "b", "c"], "ranking": [2]}, "orders 1 of 3 passages"),
    ({"query": "q", "passages": ["a", "b"]}, "exactly one of 'ranking'"),
    ({"query": "q", "passages": ["a", "b"], "relevance": [1]}, "1 grades for 2 passages"),
    ({"query": "q", "passages": ["a", "b"], "relevance": {"9": 1}}, "relevance names '9'"),
    ({"query": "q", "passages": [{"id": 1, "text": "a"}, {"id": "1", "text": "b"}], "relevance": [1, 0]},
     "passages[1].id '1' is the id of passages[0] too"),
])
def test_bad_records_name_file_line_and_field(tokenizer, tmp_path, record, message):
    from tunesmith.config import DataConfig

    path = tmp_path / "rank.jsonl"
    good = {"query": "q", "passages": ["a", "b"], "ranking": [2, 1]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as e:
        load_rankings(DataConfig(train=str(path)), tokenizer, report=False)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)


def test_load_rankings_shuffles_per_record(tokenizer, tmp_path):
    from tunesmith.config import DataConfig

    path = tmp_path / "rank.jsonl"
    rec = {"query": "q", "passages": [f"p{i}" for i in range(8)], "ranking": list(range(1, 9))}
    path.write_text((json.dumps(rec) + "\n") * 6)
    splits = load_rankings(DataConfig(train=str(path)), tokenizer, seed=1, report=False)
    answers = {tokenizer.decode(s["input_ids"]).split("assistant\n")[-1] for s in splits.train}
    assert len(splits.train) == 6 and len(answers) > 1  # the same record, shown in different orders
    again = load_rankings(DataConfig(train=str(path)), tokenizer, seed=1, report=False)
    assert [s["input_ids"] for s in again.train] == [s["input_ids"] for s in splits.train]
    plain = load_rankings(DataConfig(train=str(path)), tokenizer, shuffle=False, report=False)
    assert {tokenizer.decode(s["input_ids"]).split("assistant\n")[-1] for s in plain.train} == \
        {"[1] > [2] > [3] > [4] > [5] > [6] > [7] > [8]<|im_end|>\n"}


def test_ranking_records_from_a_run():
    corpus = {"d1": {"title": "", "text": "one"}, "d2": {"title": "T", "text": "two"}, "d3": "three"}
    queries = {"q1": "first", "q2": "second"}
    qrels = {"q1": {"d3": 1}, "q2": {"d9": 1}}
    run = {"q1": {"d1": 3.0, "d2": 3.0, "d3": 1.0}, "q2": {"d1": 1.0}}
    recs = ranking_records(corpus, queries, qrels, run, k=3)
    assert len(recs) == 1  # q2's top holds nothing relevant
    assert [p["id"] for p in recs[0]["passages"]] == ["d1", "d2", "d3"]  # ties by ascending id
    assert recs[0]["passages"][1]["text"] == "T two" and recs[0]["relevance"] == {"d3": 1}
    assert ranking_item(recs[0], "x").order == [2, 0, 1]


# ---- parsing and windows


def test_parse_ranking_lenient():
    p = parse_ranking("[3] > [1] > [3] > [9] > [0]", 4)
    assert p.order == [2, 0, 1, 3] and (p.listed, p.invalid, p.repeated) == (2, 2, 1) and not p.complete
    p = parse_ranking("The ranking is: [2] > [ 1 ] > [3].", 3)
    assert p.order == [1, 0, 2] and p.complete
    p = parse_ranking("I cannot rank these.", 3)
    assert p.order == [0, 1, 2] and p.listed == 0 and not p.complete


def test_window_starts():
    assert window_starts(100, 20, 10) == [80, 70, 60, 50, 40, 30, 20, 10, 0]
    assert window_starts(25, 20, 10) == [5, 0]  # the top window is never skipped
    assert window_starts(20, 20, 10) == [0] and window_starts(7, 20, 10) == [0]
    assert window_starts(30, 10, 10) == [20, 10, 0]


def oracle(scores, calls=None):
    """A fake ranker that knows each passage's true score (and records what it was shown)."""
    def rank(batch):
        if calls is not None:
            calls.append([list(p) for _, p in batch])
        return [WindowAnswer(sorted(range(len(p)), key=lambda i: -scores[p[i]]), tokens=len(p)) for _, p in batch]
    return rank


def test_sliding_window_back_to_front_with_a_perfect_ranker():
    rng = random.Random(0)
    passages = [f"p{i}" for i in range(100)]
    scores = {p: rng.random() for p in passages}
    calls = []
    [result] = sliding_window(oracle(scores, calls), [("q", passages)], window=20, step=10)
    truth = sorted(range(100), key=lambda i: -scores[passages[i]])
    assert result.order[:10] == truth[:10]  # window - step settled by the last window
    assert result.order != truth  # one pass does not sort the tail
    assert sorted(result.order) == list(range(100)) and result.windows == 9 and result.generated_tokens == 180
    assert [len(c[0]) for c in calls] == [20] * 9 and calls[0][0] == passages[80:]  # the back first
    # the best passage is carried to the front from wherever it starts
    best = max(passages, key=scores.get)
    assert result.order[0] == passages.index(best)


def test_sliding_window_batches_queries_like_one_at_a_time():
    rng = random.Random(1)
    lists = [("a", [f"a{i}" for i in range(35)]), ("b", [f"b{i}" for i in range(12)]), ("c", [f"c{i}" for i in range(50)])]
    scores = {p: rng.random() for _, ps in lists for p in ps}
    together = sliding_window(oracle(scores), lists, window=10, step=5)
    alone = [sliding_window(oracle(scores), [x], window=10, step=5)[0] for x in lists]
    calls = []
    one_by_one = sliding_window(oracle(scores, calls), lists, window=10, step=5, batch_size=1)
    assert [r.order for r in together] == [r.order for r in alone] == [r.order for r in one_by_one]
    assert all(len(c) == 1 for c in calls) and len(calls) == sum(r.windows for r in together)
    assert [r.windows for r in together] == [len(window_starts(len(p), 10, 5)) for _, p in lists]


def test_sliding_window_full_list_is_one_window():
    rng = random.Random(2)
    passages = [f"p{i}" for i in range(30)]
    scores = {p: rng.random() for p in passages}
    [result] = sliding_window(oracle(scores), [("q", passages)], window=30, step=10)
    assert result.order == sorted(range(30), key=lambda i: -scores[passages[i]]) and result.windows == 1


def test_rerank_with_a_tiny_model_returns_permutations(tokenizer):
    model = lively_model(tokenizer)
    lists = [("q", ["alpha beta", "gamma", "delta epsilon zeta"]), ("r", [f"text {i}" for i in range(5)])]
    full = rerank(model, tokenizer, lists, mode="full")
    window = rerank(model, tokenizer, lists, mode="window", window=3, step=2)
    for results in (full, window):
        assert [sorted(r.order) for r in results] == [list(range(3)), list(range(5))]
        assert all(r.generated_tokens > 0 and r.seconds > 0 and len(r.answers) == r.windows for r in results)
    assert [r.windows for r in full] == [1, 1] and [r.windows for r in window] == [1, 2]


# ---- evaluation


def test_rerank_eval_before_and_after(monkeypatch, tokenizer):
    """An oracle reranker (monkeypatched in) lifts NDCG@10 to 1 wherever BM25 found the document."""
    import tunesmith.eval.rerank as ev
    from tunesmith.eval.retrieval import bm25_search, retrieval_metrics
    from tunesmith.infer.rerank import RerankResult

    words = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "kiwi", "lime", "fig"]
    corpus = {f"d{i}": {"title": "", "text": f"{a} and {b} fruit"} for i, (a, b) in
              enumerate(zip(words, words[1:] + words[:1]))}
    queries = {f"q{i}": f"{a} {b}" for i, (a, b) in enumerate(zip(words, words[1:] + words[:1]))}
    qrels = {f"q{i}": {f"d{(i + 1) % len(words)}": 1} for i in range(len(words))}  # the neighbour's document

    def perfect(model, tok, lists, **kw):
        out = []
        for (q, passages) in lists:
            qid = next(k for k, v in queries.items() if v == q)
            rel = {ev.doc_text(corpus[d]) for d in qrels[qid]}
            out.append(RerankResult(order=sorted(range(len(passages)), key=lambda i: passages[i] not in rel),
                                    seconds=0.5, generated_tokens=7, windows=1, complete=1))
        return out

    monkeypatch.setattr(ev, "rerank", perfect)
    result = ev.evaluate_rerank(None, tokenizer, corpus, queries, qrels, top_k=5)
    bm25 = bm25_search(corpus, queries, k=5)
    assert result.before["ndcg@10"] == pytest.approx(retrieval_metrics(bm25, qrels, ks=(1, 5, 10))["ndcg@10"])
    assert result.before["ndcg@10"] < 1
    found = result.before["recall@5"]
    assert 0 < found and result.after["ndcg@10"] == pytest.approx(found)  # every found one moved to the top
    assert result.after["recall@5"] == result.before["recall@5"]  # reranking cannot find more
    assert result.latency["mean_s"] == 0.5 and result.latency["tokens"] == 7 and result.complete == 1
    assert "ndcg@10" in ev.format_rerank(result)


def test_eval_rerank_cli(tmp_path, tiny_model_dir, capsys):
    from tunesmith.cli import main
    from tunesmith.data.beir import write_beir

    corpus = {f"d{i}": {"title": "", "text": f"document {i} about {w}"} for i, w in
              enumerate(["cats", "dogs", "birds", "fish", "cats and dogs"])}
    folder = write_beir(tmp_path / "beir", corpus, {"q1": "cats", "q2": "fish"}, {"q1": {"d0": 1}, "q2": {"d3": 1}})
    out = tmp_path / "eval.json"
    code = main(["eval", "--task", f"rerank:{folder}", "--model", str(tiny_model_dir), "--top-k", "3", "--mode",
                 "window", "--window", "2", "--step", "1", "--batch-size", "1", "--output", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    saved = json.loads(out.read_text())
    assert saved["mode"] == "window" and saved["before"]["queries"] == 2 and "ndcg@10" in saved["after"]
    assert all(len(r["answers"]) == 2 for r in saved["records"])  # windows [1, 3) then [0, 2)
    code = main(["eval", "--task", f"rerank:{tmp_path / 'nope'}", "--model", str(tiny_model_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "nope" in err and "Traceback" not in err


# ---- end to end


def test_train_listwise_end_to_end(tmp_path, tiny_model_dir, capsys):
    from tunesmith.cli import main
    from tunesmith.train.metrics import read_metrics

    rng = random.Random(0)
    rows = []
    for i in range(6):
        passages = [f"doc {i}-{j} about topic {rng.randint(0, 9)}" for j in range(4)]
        rows.append({"query": f"topic {i}", "passages": passages, "relevance": [rng.randint(0, 2) for _ in range(4)]})
    data = tmp_path / "rank.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["train", "recipes/lora-sft.yaml", f"model.name={tiny_model_dir}", f"data.train={data}",
                 f"output_dir={tmp_path / 'runs'}", "name=rank", "objective.name=listwise",
                 "objective.listwise.passage_tokens=8", "data.val_fraction=0", "train.steps=3",
                 "train.batch_tokens=2048", "data.max_length=512", "train.precision=fp32", "train.threads=1",
                 "train.warmup=0", "train.lr=1e-3"])
    assert code == 0, capsys.readouterr().err[-2000:]
    run = tmp_path / "runs" / "rank"
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert (run / "adapter").is_dir()
    # the trained adapter reranks through the same prompts
    from tunesmith.infer.generate import load_for_inference

    model, tok = load_for_inference(str(tiny_model_dir), str(run))
    [res] = rerank(model, tok, [("topic 1", ["a", "b", "c"])], mode="full")
    assert sorted(res.order) == [0, 1, 2]


def test_sub_lists_keep_the_gold_first_and_its_order():
    from tunesmith.data.ranking import sub_list

    item = RankingItem("q", [f"p{i}" for i in range(10)], order=[7, 2, 9, 0, 1, 3, 4, 5, 6, 8])
    sizes = set()
    for seed in range(30):
        part = sub_list(item, random.Random(seed), 4)
        sizes.add(len(part.passages))
        gold = [part.passages[i] for i in part.order]
        assert gold[0] == "p7" and sorted(part.order) == list(range(len(part.passages)))
        assert gold == [p for p in (item.passages[i] for i in item.order) if p in part.passages]
    assert min(sizes) == 4 and max(sizes) == 10


def test_data_inspect_shows_ranking_samples(tmp_path, tiny_model_dir, capsys):
    from tunesmith.cli import main

    data = tmp_path / "rank.jsonl"
    data.write_text(json.dumps({"query": "q", "passages": ["alpha", "beta", "gamma"], "ranking": [2, 3, 1]}) + "\n")
    code = main(["data", "inspect", "recipes/lora-sft.yaml", f"model.name={tiny_model_dir}", f"data.train={data}",
                 "objective.name=listwise", "objective.listwise.shuffle=false", "data.val_fraction=0", "-n", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "⟦[2] > [3] > [1]<|im_end|>⟧" in out and "[1] alpha" in out
