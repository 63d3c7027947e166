"""Reliability cases, group "data": bad data files, bad recipe values and broken model files, each
replayed through the real command line (`tunesmith data inspect` or `tunesmith train` on a tiny model).

Every error must be one line naming the file (and line or row where there is one), exit non-zero,
with no traceback; records left out of training must be counted and reported with the first one's
location (else the case flags a silent drop).
"""
from __future__ import annotations

import json
from pathlib import Path

from common import ROOT, Case, Outcome, cli, expect_error, has_traceback, last_line, tiny_model

SFT = str(ROOT / "recipes" / "lora-sft.yaml")
DPO = str(ROOT / "recipes" / "dpo.yaml")
ANSWERED = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
UNANSWERED = [{"role": "user", "content": "Hello?"}]
def jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def inspect(tmp: Path, data: Path | str, *overrides: str, recipe: str = SFT):
    return cli(["data", "inspect", recipe, f"model.name={tiny_model()}", f"data.train={data}", *overrides], cwd=tmp)


def train(tmp: Path, data: Path | str, *overrides: str, model: Path | str | None = None):
    return cli(["train", SFT, f"model.name={model or tiny_model()}", f"data.train={data}", "data.val_fraction=0",
                "train.steps=1", "train.precision=fp32", f"output_dir={tmp / 'runs'}", *overrides], cwd=tmp)


def expect_reported(proc, *needles: str, stream: str = "stdout") -> Outcome:
    """A command that must succeed and report skipped records: a line holding every needle."""
    text = proc.stdout if stream == "stdout" else proc.stderr
    lines = [ln for ln in text.splitlines() if all(n in ln for n in needles)]
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return Outcome(got=f"rc={proc.returncode}: {last_line(proc.stderr)}"[:160], ok=False,
                       traceback=has_traceback(out))
    return Outcome(got=(lines[0] if lines else "no report of the skipped records")[:160], ok=len(lines) == 1,
                   traceback=has_traceback(out), silent_drop=not lines)


# --------------------------------------------------------------------------------------------------
# files


def not_utf8(suffix: str, head: bytes, bad: bytes):
    def run(tmp: Path) -> Outcome:
        path = tmp / f"d{suffix}"
        path.write_bytes(head + bad)
        line = head.count(b"\n") + 1
        return expect_error(inspect(tmp, path), f"d{suffix}:{line}: not valid UTF-8")
    return run


def bad_json_line(tmp: Path) -> Outcome:
    path = tmp / "d.jsonl"
    path.write_text(json.dumps({"messages": ANSWERED}) + "\n{\"messages\": [oops\n")
    return expect_error(inspect(tmp, path), "d.jsonl:2: not valid JSON")


def empty_file(tmp: Path) -> Outcome:
    (tmp / "d.jsonl").write_text("")
    return expect_error(inspect(tmp, tmp / "d.jsonl"), "d.jsonl: no records")


def missing_file(tmp: Path) -> Outcome:
    return expect_error(inspect(tmp, tmp / "absent.jsonl"), "data file not found", "absent.jsonl")


def csv_row_after_blank_line(tmp: Path) -> Outcome:
    path = tmp / "d.csv"
    path.write_text('messages\n"[{""role"": ""user"", ""content"": ""hi""}, {""role"": ""assistant"", '
                    '""content"": ""yo""}]"\n\n[not json\n')
    return expect_error(inspect(tmp, path, "data.format=chat"), "d.csv:4:", "not valid JSON")


def csv_extra_cells(tmp: Path) -> Outcome:
    path = tmp / "d.csv"
    path.write_text("instruction,output\nAdd 2 and 2,4\nSay hi, politely,hi\n")
    return expect_error(inspect(tmp, path), "d.csv:3:", "3 cells but the header names 2 columns")


def parquet_row(tmp: Path) -> Outcome:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "one"}, {"text": "two"}, {"text": None}]), path)
    return expect_error(inspect(tmp, path, "data.format=text"), "d.parquet row 3: field 'text' is null")


# --------------------------------------------------------------------------------------------------
# records


def unknown_fields(tmp: Path) -> Outcome:
    path = jsonl(tmp / "d.jsonl", [{"question": "q", "answer": "a"}] * 3)
    return expect_error(inspect(tmp, path, "data.val_fraction=0"), "d.jsonl:1: cannot tell the data format", "question")


def missing_messages(tmp: Path) -> Outcome:
    path = jsonl(tmp / "d.jsonl", [{"messages": ANSWERED}, {"conversation": ANSWERED}])
    return expect_error(inspect(tmp, path, "data.format=chat"), "d.jsonl:2: record has no field 'messages'",
                        "data.columns.messages")


def wrong_role(tmp: Path) -> Outcome:
    path = jsonl(tmp / "d.jsonl", [{"messages": ANSWERED}, {"messages": [ANSWERED[0], {"role": "bot", "content": "x"}]}])
    return expect_error(inspect(tmp, path), "d.jsonl:2: messages[1].role is 'bot'")


def no_assistant_inspect(tmp: Path) -> Outcome:
    path = jsonl(tmp / "d.jsonl", [{"messages": ANSWERED}] * 2 + [{"messages": UNANSWERED}] * 3)
    return expect_reported(inspect(tmp, path, "data.val_fraction=0"),
                           "3 records have no assistant turn (nothing to train)", "first at", "d.jsonl:3")


def no_assistant_train(tmp: Path) -> Outcome:
    path = jsonl(tmp / "d.jsonl", [{"messages": ANSWERED}] * 4 + [{"messages": UNANSWERED}] * 2)
    proc = train(tmp, path)
    outcome = expect_reported(proc, "2 records have no assistant turn", "first at", "d.jsonl:5", stream="stderr")
    if outcome.ok and (proc.stdout + proc.stderr).count("no assistant turn") != 1:
        outcome.ok, outcome.got = False, "reported more than once: " + outcome.got
    return outcome


def too_long_dropped(tmp: Path) -> Outcome:
    path = jsonl(tmp / "d.jsonl", [{"text": "short"}, {"text": "word " * 300}, {"text": "word " * 300}])
    return expect_reported(inspect(tmp, path, "data.max_length=32", "data.overflow=drop", "data.val_fraction=0"),
                           "2 records are longer than data.max_length=32", "d.jsonl:2")


def empty_text(tmp: Path) -> Outcome:
    path = jsonl(tmp / "d.jsonl", [{"text": "fine"}, {"text": "fine"}, {"text": "   "}])
    return expect_reported(inspect(tmp, path, "data.val_fraction=0"), "1 record is empty", "d.jsonl:3")


def preference_inspect(tmp: Path) -> Outcome:
    proc = inspect(tmp, ROOT / "examples" / "preference.jsonl", "data.limit=20", "-n", "1", recipe=DPO)
    out = proc.stdout + proc.stderr
    row = next((ln for ln in proc.stdout.splitlines() if ln.startswith("train ")), "")
    ok = proc.returncode == 0 and "── pair 1 of 18" in proc.stdout and "rejected: …" in proc.stdout \
        and row.split()[1:3] == ["18", "18"]
    got = f"rc={proc.returncode}: {row or last_line(proc.stderr)}"
    return Outcome(got=" ".join(got.split())[:160], ok=ok, traceback=has_traceback(out))


def preference_cut_off(tmp: Path) -> Outcome:
    pair = {"prompt": "Pick one.", "chosen": "This one.", "rejected": "That one."}
    path = jsonl(tmp / "p.jsonl", [pair, {**pair, "prompt": "blah " * 300}, pair])
    return expect_reported(inspect(tmp, path, "data.max_length=64", "data.val_fraction=0", recipe=DPO),
                           "1 record loses every trained token when truncated", "p.jsonl:2")


# --------------------------------------------------------------------------------------------------
# recipe values and model files


def unknown_recipe_key(tmp: Path) -> Outcome:
    return expect_error(inspect(tmp, "x.jsonl", "data.trian=x.jsonl"), "unknown recipe key `data.trian`", "did you mean")


def wrong_type(tmp: Path) -> Outcome:
    return expect_error(inspect(tmp, "x.jsonl", "data.max_length=long"), "data.max_length: expected an integer")


def bad_override(tmp: Path) -> Outcome:
    return expect_error(inspect(tmp, "x.jsonl", "data.max_length"), "override `data.max_length` is not of the form key=value")


def gguf_not_gguf(tmp: Path) -> Outcome:
    fake = tmp / "model.gguf"
    fake.write_text("definitely a text file\n")
    path = jsonl(tmp / "d.jsonl", [{"messages": ANSWERED}])
    return expect_error(train(tmp, path, model=fake), "model.gguf: not a GGUF file (bad magic")


def gguf_truncated(tmp: Path) -> Outcome:
    from tunesmith.models.load import embedded_gguf

    data = embedded_gguf().read_bytes()
    cut = tmp / "cut.gguf"
    cut.write_bytes(data[: len(data) // 3])
    path = jsonl(tmp / "d.jsonl", [{"messages": ANSWERED}])
    proc = cli(["train", SFT, f"model.name={cut}", f"data.train={path}", f"output_dir={tmp / 'runs'}"], cwd=tmp,
               env={"TUNESMITH_CACHE": str(tmp / "cache")})
    return expect_error(proc, "cut.gguf: truncated GGUF file")


def lora_rank_too_large(tmp: Path) -> Outcome:
    path = jsonl(tmp / "d.jsonl", [{"messages": ANSWERED}] * 2)
    return expect_error(train(tmp, path, "method.lora.rank=48"), "lora.rank=48 is too large for",
                        "k_proj (a Linear of 64 in, 32 out)")


def _case(name: str, expected: str, run) -> Case:
    return Case(name=name, group="data", expected=expected, run=run)


ONE_LINE = "one-line error naming "
CASES = [
    _case("non-UTF-8 byte in .jsonl", ONE_LINE + "d.jsonl:3: not valid UTF-8",
          not_utf8(".jsonl", b'{"text": "ok"}\n' * 2, b'{"text": "\xe9"}\n')),
    _case("non-UTF-8 byte in .csv", ONE_LINE + "d.csv:4: not valid UTF-8",
          not_utf8(".csv", "text\nüber\nok\n".encode(), b"caf\xe9\n")),
    _case("non-UTF-8 byte in .json", ONE_LINE + "d.json:3: not valid UTF-8",
          not_utf8(".json", b'[{"text": "ok"},\n{"text": "ok"},\n', b'{"text": "\xff"}]\n')),
    _case("bad JSON line", ONE_LINE + "d.jsonl:2: not valid JSON", bad_json_line),
    _case("empty file", ONE_LINE + "the file: no records", empty_file),
    _case("missing file", ONE_LINE + "the missing file", missing_file),
    _case("CSV error after a blank line", ONE_LINE + "d.csv:4 (header is line 1)", csv_row_after_blank_line),
    _case("CSV row with more cells than the header", ONE_LINE + "d.csv:3, not truncated text", csv_extra_cells),
    _case("parquet null field", ONE_LINE + "d.parquet row 3 (1-based)", parquet_row),
    _case("record with unknown fields", ONE_LINE + "d.jsonl:1 and its fields", unknown_fields),
    _case("chat record without messages", ONE_LINE + "d.jsonl:2 and data.columns.messages", missing_messages),
    _case("wrong role", ONE_LINE + "d.jsonl:2: messages[1].role", wrong_role),
    _case("no assistant turn (inspect)", "counted, first at d.jsonl:3", no_assistant_inspect),
    _case("no assistant turn (train)", "printed once when training, first at d.jsonl:5", no_assistant_train),
    _case("too long with overflow=drop", "counted, first at d.jsonl:2", too_long_dropped),
    _case("empty text record", "counted, first at d.jsonl:3", empty_text),
    _case("data inspect on the DPO recipe", "pairs, chosen/rejected lengths, trained tokens", preference_inspect),
    _case("preference answer cut off by truncation", "counted, first at p.jsonl:2", preference_cut_off),
    _case("unknown recipe key", ONE_LINE + "the key and the nearest valid one", unknown_recipe_key),
    _case("wrong type for a recipe value", ONE_LINE + "data.max_length and the type", wrong_type),
    _case("override without =", ONE_LINE + "the override", bad_override),
    _case("text file named .gguf", ONE_LINE + "the file: not a GGUF file (bad magic)", gguf_not_gguf),
    _case("truncated GGUF", ONE_LINE + "the file: truncated GGUF file", gguf_truncated),
    _case("LoRA rank above min(in, out)", ONE_LINE + "the module and its shape", lora_rank_too_large),
]
