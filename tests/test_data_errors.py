"""Bad data reaches the user as one line naming file and line; skipped records are counted and
reported with the first one's location; broken GGUF files and impossible LoRA ranks are clear errors."""
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import make_tiny_model
from tunesmith.cli import main
from tunesmith.data import DataError, load_data, read_records
from tunesmith.data.preference import load_pairs
from tunesmith.data.sources import first_bad_utf8_line
from tunesmith.recipe import DataConfig

ANSWERED = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
UNANSWERED = [{"role": "user", "content": "Hello?"}]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --------------------------------------------------------------------------------------------------
# encodings


@pytest.mark.parametrize("name, good, bad", [
    ("d.jsonl", '{"text": "fine"}\n' * 4, b'{"text": "caf\xe9"}\n'),
    ("d.csv", "text\n" + "fine\n" * 3, b"caf\xe9\n"),
    ("d.json", '[\n' + '{"text": "fine"},\n' * 3, b'{"text": "caf\xe9"}\n]\n'),
], ids=["jsonl", "csv", "json"])
def test_non_utf8_byte_names_its_line(tmp_path, name, good, bad):
    path = tmp_path / name
    path.write_bytes(good.encode() + bad + b'{"text": "later"}\n')
    line = good.count("\n") + 1
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{line}: not valid UTF-8"):
        list(read_records(path))


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 1 << 20])
def test_bad_byte_line_across_chunk_boundaries(tmp_path, chunk_size):
    # Two-byte characters straddle every small chunk boundary; only the lone 0xc3 at the end is bad.
    path = tmp_path / "t.txt"
    path.write_bytes("é".encode() * 7 + b"\n" + "✓".encode() * 5 + b"\n\n" + b"ok \xc3")
    assert first_bad_utf8_line(path, chunk_size) == 4
    path.write_bytes("é\n✓\n".encode() * 9)
    assert first_bad_utf8_line(path, chunk_size) == 0


# --------------------------------------------------------------------------------------------------
# locations


def test_csv_rows_name_their_line_after_blank_lines(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,n\n"one",1\n\n"two\nlines",2\n\nthree,3\n')
    assert [r.where for r in read_records(path)] == [f"{path}:{n}" for n in (2, 4, 7)]
    assert [r.fields["text"] for r in read_records(path)] == ["one", "two\nlines", "three"]


def test_csv_cells_beyond_the_header_are_an_error_not_lost(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,n\nfine,1,\nan unquoted, comma,2\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: 3 cells but the header names 2 columns"):
        list(read_records(path))


def test_json_records_name_the_line_they_start_on(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"meta": {"data": 0},\n "data": [\n  {"text": "a"},\n\n  {"text":\n   "b"}\n]}\n')
    assert [r.where for r in read_records(path)] == [f"{path}:3", f"{path}:5"]
    assert [r.fields["text"] for r in read_records(path)] == ["a", "b"]


def test_parquet_errors_name_the_row_from_1(tokenizer, tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "a", "x": None}, {"text": None, "x": "b"}]), path)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} row 2: field 'text' is null"):
        load_data(DataConfig(train=str(path), format="text"), tokenizer)


def test_truncated_parquet_is_one_error(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "a" * 100}] * 50), path)
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: not a readable parquet file"):
        list(read_records(path))


# --------------------------------------------------------------------------------------------------
# skipped records are counted and reported


def test_every_skip_reason_is_counted_with_its_first_record(tokenizer, tmp_path, capsys):
    records = [{"messages": ANSWERED}, {"messages": UNANSWERED}, {"messages": ANSWERED},
               {"messages": UNANSWERED}, {"messages": UNANSWERED[:1] + [{"role": "assistant", "content": " "}]},
               {"messages": [{"role": "user", "content": "blah " * 200}, ANSWERED[1]]}]
    path = jsonl(tmp_path / "d.jsonl", records)
    splits = load_data(DataConfig(train=str(path), max_length=64), tokenizer)
    skipped = splits.stats["train"]["skipped"]
    assert skipped == {"no_assistant": {"count": 2, "first": f"{path}:2"},
                       "empty_answer": {"count": 1, "first": f"{path}:5"},
                       "cut_off": {"count": 1, "first": f"{path}:6"}}
    assert len(splits.train) == 2 and splits.stats["train"]["no_trained_token"] == 4
    err = capsys.readouterr().err
    assert f"skipped in train: 2 records have no assistant turn (nothing to train), first at {path}:2" in err
    assert f"1 record loses every trained token when truncated to data.max_length=64, first at {path}:6" in err
    assert err.count("[tunesmith]") == 3  # one line per reason, not one per record


def test_empty_text_and_too_long_are_reported(tokenizer, tmp_path, capsys):
    path = jsonl(tmp_path / "t.jsonl", [{"text": "short"}, {"text": "  "}, {"text": "word " * 100}])
    splits = load_data(DataConfig(train=str(path), max_length=32, overflow="drop"), tokenizer)
    assert splits.stats["train"]["skipped"] == {"too_long": {"count": 1, "first": f"{path}:3"},
                                                "empty": {"count": 1, "first": f"{path}:2"}}
    err = capsys.readouterr().err
    assert f"1 record is empty (no text to train), first at {path}:2" in err
    assert "longer than data.max_length=32 tokens (data.overflow=drop)" in err


def test_truncated_records_are_reported_once(tokenizer, tmp_path, capsys):
    path = jsonl(tmp_path / "t.jsonl", [{"text": "short"}, {"text": "word " * 100}, {"text": "word " * 50}])
    splits = load_data(DataConfig(train=str(path), max_length=32), tokenizer)
    assert len(splits.train) == 3 and splits.stats["train"]["truncated"] == 2
    err = capsys.readouterr().err
    assert err.count("[tunesmith]") == 1
    assert (f"truncated in train: 2 records were cut to data.max_length=32 tokens (data.overflow=truncate), "
            f"first at {path}:2") in err


def test_skips_are_quiet_off_the_main_process(tokenizer, tmp_path, capsys, monkeypatch):
    path = jsonl(tmp_path / "d.jsonl", [{"messages": ANSWERED}, {"messages": UNANSWERED}])
    monkeypatch.setenv("RANK", "1")
    splits = load_data(DataConfig(train=str(path)), tokenizer)
    assert splits.stats["train"]["skipped"]["no_assistant"]["count"] == 1
    assert "[tunesmith]" not in capsys.readouterr().err


def test_preference_pairs_cut_by_truncation_are_reported(tokenizer, tmp_path, capsys):
    pair = {"prompt": "Pick one.", "chosen": "This one.", "rejected": "That one."}
    long_prompt = {**pair, "prompt": "blah " * 200}
    path = jsonl(tmp_path / "p.jsonl", [pair, long_prompt, pair])
    pairs = load_pairs(DataConfig(train=str(path), max_length=64), tokenizer)
    assert pairs.stats["train"]["pairs"] == 2
    assert pairs.stats["train"]["skipped"] == {"cut_off": {"count": 1, "first": f"{path}:2"}}
    assert f"first at {path}:2" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# through the command line


def test_data_inspect_on_the_preference_recipe(capsys, tiny_model_dir):
    code, out, err = run(capsys, "data", "inspect", "recipes/dpo.yaml", f"model.name={tiny_model_dir}",
                         "data.limit=20", "-n", "1")
    assert code == 0, err
    assert "── pair 1 of" in out and "chosen:" in out and "rejected: …⟦" in out
    header = next(line for line in out.splitlines() if line.startswith("split"))
    for column in ("pairs", "chosen p50", "rejected p50", "chosen trained", "rejected trained", "trained %"):
        assert column in header
    train_row = next(line for line in out.splitlines() if line.startswith("train "))
    assert train_row.split()[1:3] == ["18", "18"]  # 20 records, 2 held out for validation, all kept


def test_data_inspect_reports_skipped_records(capsys, tmp_path, tiny_model_dir):
    path = jsonl(tmp_path / "d.jsonl", [{"messages": ANSWERED}] * 2 + [{"messages": UNANSWERED}] * 3)
    code, out, err = run(capsys, "data", "inspect", "recipes/lora-sft.yaml", f"model.name={tiny_model_dir}",
                         f"data.train={path}", "data.val_fraction=0")
    assert code == 0, err
    assert f"skipped in train: 3 records have no assistant turn (nothing to train), first at {path}:3" in out
    assert "skipped" not in err  # shown once, in the inspection


@pytest.mark.parametrize("content, needle", [
    (b'{"text": "ok"}\n\xff\xfe\n', "d.jsonl:2: not valid UTF-8"),
    (b"", "d.jsonl: no records"),
], ids=["not-utf8", "empty"])
def test_data_errors_are_one_line(capsys, tmp_path, tiny_model_dir, content, needle):
    (tmp_path / "d.jsonl").write_bytes(content)
    code, out, err = run(capsys, "data", "inspect", "recipes/lora-sft.yaml", f"model.name={tiny_model_dir}",
                         f"data.train={tmp_path / 'd.jsonl'}")
    assert code == 2 and "Traceback" not in out + err
    assert err.strip().count("\n") == 0 and needle in err


# --------------------------------------------------------------------------------------------------
# models


def test_renamed_text_file_is_not_a_gguf(capsys, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("this is not a model\n")
    code, out, err = run(capsys, "train", "recipes/lora-sft.yaml", f"model.name={fake}", f"output_dir={tmp_path}")
    assert code == 2 and "Traceback" not in out + err
    assert f"{fake}: not a GGUF file (bad magic" in err


def test_truncated_gguf_names_the_file(tmp_path, monkeypatch):
    from tunesmith.models.load import ModelError, embedded_gguf, resolve

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    data = embedded_gguf().read_bytes()
    whole_header = tmp_path / "half.gguf"
    whole_header.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=rf"{re.escape(str(whole_header))}: truncated GGUF file: its tensors need "
                                         rf"{len(data):,} bytes, the file has {len(data) // 2:,}"):
        resolve(str(whole_header))
    cut_header = tmp_path / "head.gguf"
    cut_header.write_bytes(data[:100])
    with pytest.raises(ModelError, match=rf"{re.escape(str(cut_header))}: truncated or corrupt GGUF file"):
        resolve(str(cut_header))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("config.json"))


def test_lora_rank_above_a_modules_size_names_it(tokenizer):
    from tunesmith.methods import MethodError, build_method
    from tunesmith.recipe import method_from_dict

    model = make_tiny_model(tokenizer)  # hidden 64; k_proj is 64 -> 32 (2 kv heads of 16)
    method = build_method(method_from_dict("lora", {"rank": 40, "targets": ["q_proj", "k_proj"]}))
    with pytest.raises(MethodError, match=r"lora\.rank=40 is too large for model\.layers\.0\.self_attn\.k_proj "
                                          r"\(a Linear of 64 in, 32 out\): the rank can be at most 32"):
        method.apply(model)
    assert not any("lora" in name for name, _ in model.named_parameters())  # nothing half-applied


def test_jsonl_prompts_not_utf8_name_their_line(tmp_path):
    """Prompt and task files read by generate and eval report a bad byte at its line, not a traceback."""
    from tunesmith.jsonl import read_jsonl

    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "\xe9"}\n')  # BOM; latin-1 e-acute
    rows = read_jsonl(path)
    assert next(rows)[1] == {"prompt": "a"}
    assert next(rows)[1] == {"prompt": "b"}
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: not valid UTF-8 \(byte 0xe9 at column 13"):
        next(rows)


def test_write_jsonl_and_json_round_trip_whole_files(tmp_path):
    from tunesmith.jsonl import read_jsonl, write_json, write_jsonl

    rows = [{"text": "é ü", "n": 1}, {"text": "two\nlines", "n": 2}]
    path = write_jsonl(tmp_path / "sub" / "rows.jsonl", iter(rows))
    assert [row for _, row in read_jsonl(path)] == rows
    write_jsonl(path, rows[:1])  # replaced whole, not appended
    assert [row for _, row in read_jsonl(path)] == rows[:1]
    assert json.loads(write_json(tmp_path / "stats.json", {"kept": 3}).read_text()) == {"kept": 3}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["rows.jsonl", "stats.json", "sub"]  # no temporary left
