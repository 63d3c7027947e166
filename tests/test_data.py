"""The data pipeline: readers, formats, loss masks rendered with the real chat template, length
handling, splits, batch planning and collation."""
import csv
import json
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tunesmith.data import DataError, Renderer, collate, format_inspection, load_data, plan_batches, read_records
from tests.conftest import trained_runs
from tunesmith.recipe import DataConfig

END = "<|im_end|>"


def untrained_text(sample, tokenizer) -> str:
    return tokenizer.decode([t for t, w in zip(sample["input_ids"], sample["weights"]) if not w])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


CHAT = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, of course."},
]


# --------------------------------------------------------------------------------------------------
# masking


def test_single_turn_trains_answer_and_end_of_turn_only(tokenizer):
    sample = Renderer(tokenizer)(CHAT[:3])
    assert trained_runs(sample, tokenizer) == ["Paris." + END]
    assert sample["weights"][0] == 0
    prompt = untrained_text(sample, tokenizer)
    for text in ("You answer in one word.", "Capital of France?", "<|im_start|>assistant\n"):
        assert text in prompt
    # The template's newline after the final <|im_end|> is not trained.
    assert sample["input_ids"][-2] == tokenizer.convert_tokens_to_ids(END)
    assert sample["weights"][-2:] == [1.0, 0.0]
    # Ids are the template's own rendering, tokenized once.
    full = tokenizer.apply_chat_template(CHAT[:3], tokenize=False)
    assert sample["input_ids"] == tokenizer(full, add_special_tokens=False)["input_ids"]


def test_multi_turn_masks_every_answer(tokenizer):
    sample = Renderer(tokenizer)(CHAT)
    assert trained_runs(sample, tokenizer) == ["Paris." + END, "Rome, of course." + END]
    assert "And of Italy?" in untrained_text(sample, tokenizer)


def test_assistant_turns_last(tokenizer):
    sample = Renderer(tokenizer, assistant_turns="last")(CHAT)
    assert trained_runs(sample, tokenizer) == ["Rome, of course." + END]


def test_train_on_prompt_trains_all_but_first(tokenizer):
    sample = Renderer(tokenizer, train_on_prompt=True)(CHAT)
    assert sample["weights"][0] == 0
    assert all(w == 1 for w in sample["weights"][1:])


def test_answer_whitespace_is_trained(tokenizer):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " lead\n\ntrail  "}]
    assert trained_runs(Renderer(tokenizer)(chat), tokenizer) == [" lead\n\ntrail  " + END]


def test_no_template_falls_back_to_chatml(tokenizer, monkeypatch):
    import copy

    import tunesmith.data.render as render

    monkeypatch.setattr(render, "_warned_no_template", False)  # the warning is once per process
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.warns(UserWarning, match="no chat template"):
        renderer = Renderer(bare)
    sample = renderer(CHAT[1:3])
    assert trained_runs(sample, bare) == ["Paris." + END]
    assert "SmolLM" not in bare.decode(sample["input_ids"])  # ChatML fallback has no default system prompt


def test_text_format_trains_everything_and_eos(tokenizer, tmp_path):
    text = "The quick brown fox jumps over the lazy dog."
    splits = load_data(DataConfig(train=str(write_jsonl(tmp_path / "t.jsonl", [{"text": text}]))), tokenizer)
    (sample,) = splits.train
    assert splits.format == "text"
    assert sample["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(sample["input_ids"]) == text + tokenizer.eos_token
    assert sample["weights"] == [0.0] + [1.0] * (len(sample["input_ids"]) - 1)


def test_instruction_format_renders_through_template(tokenizer, tmp_path):
    records = [
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Say hi.", "input": "", "output": "hi", "system": "Own system."},
    ]
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "i.jsonl", records)), system_prompt="Be terse.")
    splits = load_data(cfg, tokenizer)
    assert splits.format == "instruction"
    first, second = (tokenizer.decode(s["input_ids"]) for s in splits.train)
    assert "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nTranslate to French.\n\ncat<|im_end|>" in first
    assert "SmolLM" not in first  # our system prompt replaces the template's default one
    assert "<|im_start|>system\nOwn system.<|im_end|>\n<|im_start|>user\nSay hi.<|im_end|>" in second
    assert [trained_runs(s, tokenizer) for s in splits.train] == [["chat" + END], ["hi" + END]]


def test_chat_without_system_gets_system_prompt(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT[1:3]}])
    (sample,) = load_data(DataConfig(train=str(path), system_prompt="Custom."), tokenizer).train
    assert tokenizer.decode(sample["input_ids"]).startswith("<|im_start|>system\nCustom.<|im_end|>")
    (sample,) = load_data(DataConfig(train=str(path)), tokenizer).train
    assert "SmolLM" in tokenizer.decode(sample["input_ids"])  # the template's own default


# --------------------------------------------------------------------------------------------------
# readers


RECORDS = [
    {"instruction": "Add 2 and 2.", "input": "", "output": "4"},
    {"instruction": "Reverse it.", "input": "line one\nline two, \"quoted\"", "output": "owt enil"},
    {"instruction": "Ünïcode ✓", "input": "x", "output": "y"},
]


def write_all_formats(folder, records):
    write_jsonl(folder / "d.jsonl", records)
    (folder / "d.json").write_text(json.dumps(records))
    (folder / "wrapped.json").write_text(json.dumps({"data": records}))
    with open(folder / "d.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    table = pa.Table.from_pylist(records)
    pq.write_table(table, folder / "d.parquet")
    # An HF save_to_disk folder: Arrow IPC *stream* shards listed in state.json.
    arrow = folder / "saved"
    arrow.mkdir()
    names = ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    for name, part in zip(names, (table.slice(0, 2), table.slice(2))):
        with pa.ipc.new_stream(str(arrow / name), table.schema) as writer:
            writer.write_table(part)
    (arrow / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    return ["d.jsonl", "d.json", "wrapped.json", "d.csv", "d.parquet", "saved"]


def test_every_reader_gives_the_same_records(tmp_path):
    for name in write_all_formats(tmp_path, RECORDS):
        got = [r.fields for r in read_records(tmp_path / name)]
        assert got == RECORDS, name


def test_locations(tmp_path):
    write_all_formats(tmp_path, RECORDS)
    assert [r.where for r in read_records(tmp_path / "d.jsonl")][-1] == f"{tmp_path / 'd.jsonl'}:3"
    # The second record's input spans two lines, so the third record starts on line 5.
    assert [r.where for r in read_records(tmp_path / "d.csv")] == [f"{tmp_path / 'd.csv'}:{n}" for n in (2, 3, 5)]
    # Rows of parquet files and save_to_disk folders count from 1, across the folder's shards.
    assert [r.where for r in read_records(tmp_path / "saved")] == [f"{tmp_path / 'saved'} row {n}" for n in (1, 2, 3)]
    assert [r.where for r in read_records(tmp_path / "d.parquet")][1] == f"{tmp_path / 'd.parquet'} row 2"
    # A minified .json holds every record on line 1: the column tells them apart.
    text = (tmp_path / "d.json").read_text()
    columns = [i + 1 for i in range(len(text)) if text.startswith('{"instruction"', i)]
    assert [r.where for r in read_records(tmp_path / "d.json")] == [f"{tmp_path / 'd.json'}:1:{c}" for c in columns]


def test_column_mapping(tokenizer, tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nWhat is 2+2?,Four\n")
    cfg = DataConfig(train=str(path), columns={"instruction": "question", "output": "answer"})
    (sample,) = load_data(cfg, tokenizer).train
    assert trained_runs(sample, tokenizer) == ["Four" + END]
    assert "What is 2+2?" in tokenizer.decode(sample["input_ids"])

    path = write_jsonl(tmp_path / "conv.jsonl", [{"conversation": CHAT}])
    splits = load_data(DataConfig(train=str(path), columns={"messages": "conversation"}), tokenizer)
    assert splits.format == "chat"
    assert trained_runs(splits.train[0], tokenizer) == ["Paris." + END, "Rome, of course." + END]


# --------------------------------------------------------------------------------------------------
# errors


def load(tokenizer, path, **kw):
    return load_data(DataConfig(train=str(path), **kw), tokenizer)


def test_malformed_jsonl_names_line(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: not valid JSON"):
        load(tokenizer, path)


def test_missing_field_names_field_and_mapping(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": CHAT}, {"conversation": CHAT}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: record has no field 'messages' \(format chat; .*data\.columns\.messages=NAME"):
        load(tokenizer, path)
    path = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "x", "response": "y"}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: record has no field 'output'.*data\.columns\.output=NAME"):
        load(tokenizer, path)


def test_bad_role(tokenizer, tmp_path):
    bad = CHAT[:2] + [{"role": "bot", "content": "hi"}]
    path = write_jsonl(tmp_path / "r.jsonl", [{"messages": CHAT}, {"messages": bad}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: messages\[2\]\.role is 'bot'; expected system, user or assistant"):
        load(tokenizer, path)


def test_empty_after_filtering(tokenizer, tmp_path):
    long_chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 50}]
    no_answer = CHAT[:2]
    path = write_jsonl(tmp_path / "e.jsonl", [{"messages": m} for m in [long_chat] * 3 + [no_answer] * 2])
    with pytest.raises(DataError, match=rf"no usable samples in {re.escape(str(path))} after filtering: 3 records are "
                                        rf"longer than data.max_length=40 tokens .*first at {re.escape(str(path))}:1; "
                                        rf"2 records have no assistant turn .*first at {re.escape(str(path))}:4$"):
        load(tokenizer, path, max_length=40, overflow="drop")


def test_missing_file_and_bad_extension(tokenizer, tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        load(tokenizer, tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match=r"d\.txt: unsupported file type '\.txt'"):
        load(tokenizer, tmp_path / "d.txt")


def test_undetectable_format(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: cannot tell the data format"):
        load(tokenizer, path)


# --------------------------------------------------------------------------------------------------
# lengths and splits


def test_truncate_and_drop(tokenizer, tmp_path):
    rng = random.Random(0)
    records = [{"text": " ".join(["token"] * rng.randint(1, 60))} for _ in range(30)]
    path = write_jsonl(tmp_path / "l.jsonl", records)
    full = load(tokenizer, path, max_length=10_000).train
    max_length = 32
    n_long = sum(len(s["input_ids"]) > max_length for s in full)
    assert 0 < n_long < len(records)

    cut = load(tokenizer, path, max_length=max_length, overflow="truncate")
    assert cut.stats["train"]["truncated"] == n_long
    assert cut.stats["train"]["samples"] == len(records)
    assert max(len(s["input_ids"]) for s in cut.train) == max_length == cut.stats["train"]["length_max"]
    # A truncated sample keeps its beginning.
    long_i = next(i for i, s in enumerate(full) if len(s["input_ids"]) > max_length)
    assert cut.train[long_i]["input_ids"] == full[long_i]["input_ids"][:max_length]

    dropped = load(tokenizer, path, max_length=max_length, overflow="drop")
    assert dropped.stats["train"]["dropped_too_long"] == n_long
    assert dropped.stats["train"]["samples"] == len(records) - n_long
    assert dropped.stats["train"]["truncated"] == 0


def test_truncation_that_cuts_the_answer_is_dropped(tokenizer, tmp_path):
    long_prompt = [{"role": "user", "content": "blah " * 100}, {"role": "assistant", "content": "ok"}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": long_prompt}, {"messages": CHAT}])
    splits = load(tokenizer, path, max_length=80)
    assert splits.stats["train"]["no_trained_token"] == 1
    assert splits.stats["train"]["samples"] == 1
    assert trained_runs(splits.train[0], tokenizer) == ["Paris." + END, "Rome, of course." + END]


def decoded_texts(samples, tokenizer):
    return [tokenizer.decode(s["input_ids"][:-1]) for s in samples]  # without the eos


def test_val_fraction_split(tokenizer, tmp_path):
    texts = [f"record number {i}" for i in range(20)]
    path = write_jsonl(tmp_path / "v.jsonl", [{"text": t} for t in texts])

    def split(seed):
        s = load_data(DataConfig(train=str(path), val_fraction=0.25), tokenizer, seed=seed)
        return decoded_texts(s.train, tokenizer), decoded_texts(s.val, tokenizer), s.stats

    train, val, stats = split(0)
    assert len(val) == 5 and len(train) == 15
    assert stats["val"]["records"] == 5 and stats["train"]["records"] == 15
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(texts)
    assert train == [t for t in texts if t in set(train)]  # file order is kept
    assert split(0)[:2] == (train, val)
    assert split(1)[1] != val


def test_validation_file_and_limit(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"train {i}"} for i in range(10)])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": f"val {i}"} for i in range(4)])
    splits = load_data(DataConfig(train=str(train), validation=str(val), val_fraction=0.5, limit=6), tokenizer)
    assert decoded_texts(splits.val, tokenizer) == [f"val {i}" for i in range(4)]
    assert decoded_texts(splits.train, tokenizer) == [f"train {i}" for i in range(6)]
    assert splits.stats["train"]["records"] == 6
    assert load_data(DataConfig(train=str(train)), tokenizer).val is None


# --------------------------------------------------------------------------------------------------
# batches


_rng = random.Random(1)
LENGTHS = [_rng.randint(5, 400) for _ in range(300)]


def test_plan_packed():
    budget = 1024
    lengths = LENGTHS + [1500]  # longer than the budget: gets its own row
    plan = plan_batches(lengths, packing=True, batch_tokens=budget, batch_size=8, seed=0, epoch=0)
    assert sorted(i for row in plan for i in row) == list(range(len(lengths)))
    for row in plan:
        assert sum(lengths[i] for i in row) <= budget or row == [len(lengths) - 1]
    fill = sum(LENGTHS) / (budget * (len(plan) - 1))
    assert fill > 0.9, fill
    assert plan == plan_batches(lengths, packing=True, batch_tokens=budget, batch_size=8, seed=0, epoch=0)
    # Another epoch or seed packs different samples together, not just the same rows reordered.
    rows = {frozenset(row) for row in plan}
    for seed, epoch in ((0, 1), (1, 0)):
        other = plan_batches(lengths, packing=True, batch_tokens=budget, batch_size=8, seed=seed, epoch=epoch)
        assert rows != {frozenset(row) for row in other}


def test_plan_padded():
    plan = plan_batches(LENGTHS, packing=False, batch_tokens=1024, batch_size=8, seed=0, epoch=0)
    assert sorted(i for b in plan for i in b) == list(range(len(LENGTHS)))
    assert sorted(len(b) for b in plan)[1:] == [8] * (len(plan) - 1)  # only one may be short
    assert plan == plan_batches(LENGTHS, packing=False, batch_tokens=1024, batch_size=8, seed=0, epoch=0)
    other = plan_batches(LENGTHS, packing=False, batch_tokens=1024, batch_size=8, seed=0, epoch=1)
    assert {frozenset(b) for b in plan} != {frozenset(b) for b in other}
    # Length-sorting within windows: a batch's samples are closer in length than random groups would be.
    spread = sum(max(LENGTHS[i] for i in b) - min(LENGTHS[i] for i in b) for b in plan)
    unsorted = [list(range(k, min(k + 8, len(LENGTHS)))) for k in range(0, len(LENGTHS), 8)]
    assert spread < 0.5 * sum(max(LENGTHS[i] for i in b) - min(LENGTHS[i] for i in b) for b in unsorted)
    ordered = plan_batches(LENGTHS, packing=False, batch_tokens=1024, batch_size=8, seed=0, epoch=0, shuffle=False)
    assert [i for b in ordered for i in b] == list(range(len(LENGTHS)))


def fake(ids, weights):
    return {"input_ids": ids, "weights": weights}


def test_collate_packed():
    a, b = fake([5, 6, 7], [0, 1, 1]), fake([8, 9], [0, 1])
    batch = collate([a, b], packing=True, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 2, 2]]
    assert batch["weights"].tolist() == [[0, 1, 1, 0, 1]]
    assert batch["input_ids"].dtype == torch.int64 and batch["weights"].dtype == torch.float32


def test_collate_padded():
    a, b = fake([5, 6, 7], [0, 1, 1]), fake([8, 9], [0, 1])
    batch = collate([a, b], packing=False, pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 2]]
    assert batch["weights"].tolist() == [[0, 1, 1], [0, 1, 0]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["position_ids"][:, :2].tolist() == [[0, 1], [0, 1]]
    assert {k: v.dtype for k, v in batch.items()} == {
        "input_ids": torch.int64, "weights": torch.float32, "position_ids": torch.int64, "segment_ids": torch.int64}


def test_format_inspection(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}] * 4)
    splits = load(tokenizer, path)
    text = format_inspection(splits.train, tokenizer, splits.stats, n=2, color=False)
    assert text.count("⟦Paris." + END + "⟧") == 2
    assert "⟦Rome, of course." + END + "⟧" in text
    assert "Capital of France?" in text and "⟦Capital" not in text
    assert "trained %" in text and "train" in text
    colored = format_inspection(splits.train, tokenizer, splits.stats, n=1, color=True)
    assert "\033[32mParis." + END + "\033[0m" in colored
