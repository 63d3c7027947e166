"""Contrastive data: pairs, triplets, negatives lists and domain-tagged records in JSONL and parquet,
tokenized as `models.embedding.tokenize` does, and bad records named by file:line and field."""
import json

import pytest

from tunesmith.cli import main
from tunesmith.config import DataConfig
from tunesmith.data import DataError
from tunesmith.data.pairs import PairDataError, load_contrastive
from tunesmith.models.embedding import tokenize


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(tokenizer, path, **options):
    options.setdefault("max_length", 64)
    return load_contrastive(DataConfig(train=path), tokenizer, report=False, **options)


def ids_of(tokenizer, text, max_length=64):
    batch = tokenize(tokenizer, [text], max_length)
    return batch["input_ids"][0][: int(batch["attention_mask"][0].sum())].tolist()


def test_every_record_shape_and_the_prefixes(tokenizer, tmp_path):
    rows = [
        {"query": "q0", "positive": "p0"},
        {"anchor": "q1", "positive": "p1", "negative": "n1"},
        {"query": "q2", "positive": "p2", "negatives": ["n2a", "n2b"]},
        {"query": "q3", "positive": "p3", "negative_2": "n3b", "negative_1": "n3a"},
        {"query": "q4", "positive": 4, "negatives": []},
    ]
    splits = load(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows), query_prefix="query: ",
                  document_prefix="passage: ")
    items = splits.train
    assert [len(it["negatives"]) for it in items] == [0, 1, 2, 2, 0]
    assert items[1]["query"] == ids_of(tokenizer, "query: q1")
    assert items[2]["negatives"][1] == ids_of(tokenizer, "passage: n2b")
    assert items[3]["negatives"] == [ids_of(tokenizer, "passage: n3a"), ids_of(tokenizer, "passage: n3b")]
    assert items[4]["positive"] == ids_of(tokenizer, "passage: 4")
    assert all(it["domain"] == -1 for it in items) and splits.domains == []
    assert splits.stats["train"]["negatives"] == 5 and splits.stats["train"]["texts"] == 15


def test_domains_are_numbered_in_sorted_order(tokenizer, tmp_path):
    rows = [{"query": f"q{i}", "positive": f"p{i}", "domain": d} for i, d in enumerate(["law", "code", "law", "bio"])]
    splits = load(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows))
    assert splits.domains == ["bio", "code", "law"]
    assert [it["domain"] for it in splits.train] == [2, 1, 2, 0]


def test_parquet_reads_like_jsonl(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"query": "q0", "positive": "p0", "negatives": ["a", "b"], "domain": "x"},
            {"query": "q1", "positive": "p1", "negatives": [], "domain": "y"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    a = load(tokenizer, str(tmp_path / "d.parquet"))
    b = load(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows))
    assert a.train == b.train and a.domains == b.domains == ["x", "y"]


def test_long_texts_are_cut_to_max_length(tokenizer, tmp_path):
    splits = load(tokenizer, write_jsonl(tmp_path / "d.jsonl", [{"query": "word " * 50, "positive": "p"}]),
                  max_length=8)
    assert len(splits.train[0]["query"]) == 8 and splits.stats["train"]["truncated"] == 1


@pytest.mark.parametrize("record,message", [
    ({"positive": "p"}, "d.jsonl:2: record has no field 'query'"),
    ({"query": "q"}, "d.jsonl:2: record has no field 'positive'"),
    ({"query": "q", "positive": ["p"]}, "d.jsonl:2: field 'positive' is list; expected a string"),
    ({"query": "  ", "positive": "p"}, "d.jsonl:2: field 'query' is empty"),
    ({"query": "q", "positive": "p", "negatives": "n"}, "d.jsonl:2: field 'negatives' is a string but not a JSON list"),
    ({"query": "q", "positive": "p", "negatives": {"a": 1}}, "d.jsonl:2: field 'negatives' is dict; expected a list"),
    ({"query": "q", "positive": "p", "negatives": ["a", None]}, "d.jsonl:2: field 'negatives[1]' is null"),
    ({"query": "q", "positive": "p", "domain": 3.5}, None),  # a number is read as its text
    ({"query": "q", "positive": "p", "domain": ["a"]}, "d.jsonl:2: field 'domain' is list; expected a string"),
])
def test_bad_records_name_line_and_field(tokenizer, tmp_path, record, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"query": "q", "positive": "p"}, record])
    if message is None:
        with pytest.raises(PairDataError, match="d.jsonl:1: field 'domain' is missing"):
            load(tokenizer, path)
        return
    with pytest.raises(PairDataError) as e:
        load(tokenizer, path)
    assert isinstance(e.value, DataError) and str(e.value).startswith(str(tmp_path / message.split(":")[0]))
    assert message.split(": ", 1)[1] in str(e.value) and "\n" not in str(e.value)


def test_validation_domains_are_numbered_with_training(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"query": "q", "positive": "p", "domain": "a"}])
    val = write_jsonl(tmp_path / "v.jsonl", [{"query": "q", "positive": "p", "domain": "b"}])
    splits = load_contrastive(DataConfig(train=train, validation=val), tokenizer, max_length=16, report=False)
    assert splits.domains == ["a", "b"]  # both files' domains are numbered together
    assert [it["domain"] for it in splits.val] == [1]


def test_cli_reports_a_bad_record_in_one_line(capsys, tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [{"query": "q", "positive": "p"}, {"query": "q", "positive": None}])
    code = main(["train", "recipes/contrastive.yaml", f"model.name={tiny_model_dir}", f"data.train={path}",
                 f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "d.jsonl:2: field 'positive' is null" in err and "Traceback" not in err


def test_the_built_in_retrieval_task(tokenizer):
    from tunesmith.data.tasks import get_task

    task = get_task("retrieval")
    splits = load_contrastive(DataConfig(train="task:retrieval/train", limit=40), tokenizer, max_length=64,
                              report=False)
    records = task.records("train")[:40]
    assert len(splits.train) == 40
    assert splits.domains == sorted({r["domain"] for r in task.records("train")[:40]})
    first = splits.train[0]
    assert first["query"] == ids_of(tokenizer, records[0]["query"])
    assert len(first["negatives"]) == len(records[0]["negatives"]) > 0
    assert splits.domains[first["domain"]] == records[0]["domain"]


def test_data_inspect_shows_items_as_the_model_reads_them(capsys, tmp_path, tiny_model_dir):
    rows = [{"query": "where is it", "positive": "over there", "negatives": ["nowhere", "here"], "domain": "maps"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    code = main(["data", "inspect", "recipes/contrastive.yaml", f"model.name={tiny_model_dir}", f"data.train={path}",
                 "objective.contrastive.query_prefix='query: '"])
    out = capsys.readouterr().out
    assert code == 0
    assert "item 1 of 1: 2 hard negatives · domain maps" in out and "'query: where is it'" in out
    assert "negative 2: 'here'" in out and "domains: 0 maps" in out
