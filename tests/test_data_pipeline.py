"""`tunesmith data prepare`: each cleaning step on records built to trip it (and records built not
to), the shards against the in-memory path, workers against one process, and the errors users see."""
import json
import random

import numpy as np
import pytest

from tunesmith.config import DataConfig
from tunesmith.data import DataError, load_data
from tunesmith.data.pipeline import PrepareConfig, prepare
from tunesmith.data.pipeline.clean import exact_key, normalise_text, scrub_pii
from tunesmith.data.pipeline.dedup import ExactDedup, NearDedup, Signer, shingles
from tunesmith.data.pipeline.filters import LanguageFilter, dup_line_ratio, dup_ngram_ratio, symbol_ratio, top_ngram_ratio
from tunesmith.data.shards import open_shards

VOCAB = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "su", "ta", "vo", "ri") for b in ("bel", "dor", "fin", "gas",
                                                                                      "hut", "jen", "kor", "lum")]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n)) + "."


def chat(question: str, answer: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], **extra}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run(tmp_path, rows, tokenizer=None, name="out", **prepare_values):
    """prepare() over `rows` written to a JSONL; returns (report, folder)."""
    src = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    values = {"inputs": [src], "output": str(tmp_path / name), "tokenize": tokenizer is not None, **prepare_values}
    result = prepare(PrepareConfig(**values), DataConfig(max_length=512), tokenizer)
    return result.report, result.folder


def step(report, name) -> dict:
    return next(s for s in report["steps"] if s["step"] == name)


def kept_jsonl(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "cleaned.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------------
# the measures, by hand


def test_symbol_ratio_counts_symbols_over_visible_characters():
    assert symbol_ratio("ab cd") == 0.0
    assert symbol_ratio("a#b$ c") == pytest.approx(2 / 5)  # visible: a # b $ c
    assert symbol_ratio("{}[]") == 1.0
    assert symbol_ratio("   ") == 0.0


def test_dup_line_ratio():
    assert dup_line_ratio("a\nb\na\na") == pytest.approx(2 / 4)
    assert dup_line_ratio("a\na") == 0.0  # under 3 lines: not judged
    assert dup_line_ratio("a\n\nb\n  \nc") == 0.0  # blank lines are not lines


def test_top_ngram_ratio():
    words = "the cat sat on the cat mat".split() * 8
    # "the cat" 16 times: 16 * (3 + 3) characters of 8 * (3+3+3+2+3+3+3) = 160
    assert top_ngram_ratio(words) == pytest.approx(96 / 160)
    assert top_ngram_ratio([f"w{i}" for i in range(60)]) == 0.0  # no 2-gram repeats
    assert top_ngram_ratio("the cat sat on the cat mat".split()) == 0.0  # too short to judge


def test_dup_ngram_ratio_marks_words_of_repeated_5grams():
    fresh = [f"w{i:02d}" for i in range(42)]  # 42 three-character words, no 5-gram twice
    words = "a b c d e x a b c d e".split() + fresh
    # the second "a b c d e" repeats: 5 characters of 11 + 42 * 3
    assert dup_ngram_ratio(words) == pytest.approx(5 / 137)
    assert dup_ngram_ratio([f"w{i}" for i in range(60)]) == 0.0


def test_normalise_and_exact_key():
    assert normalise_text("  Cafe\u0301\r\nok\x07 ", "nfc") == "Caf\u00e9\nok"
    assert normalise_text("\ufb01", "nfkc") == "fi"
    assert exact_key("Hello, World!") == exact_key("hello   world")
    assert exact_key("Hello, World!") != exact_key("Hello, Word!")


def test_exact_dedup_table_agrees_with_a_set_through_growth():
    rng = np.random.default_rng(0)
    keys = rng.integers(1, 2**63, 5000, dtype=np.uint64).tolist()
    stream = keys + keys[:2000] + rng.integers(1, 2**63, 1000, dtype=np.uint64).tolist()
    table, seen = ExactDedup(capacity=16), set()
    for key in stream:
        assert table.add(key) == (key not in seen)
        seen.add(key)
    assert table.size == len(seen) and len(table.table) >= 2 * len(seen)


def test_pii_scrub_replaces_emails_phones_keys_and_leaves_numbers():
    counts = {}
    text = ("Write to jane.doe+x@mail.example.org or call (415) 555-0134 or +44 20 7946 0958. "
            "key AKIAIOSFODNN7EXAMPLE and api_key=s3cr3tv4lue; token ghp_" + "a" * 36 +
            " In 2024 it cost 1,299 dollars, order 12345.")
    out = scrub_pii(text, True, True, True, counts)
    assert "jane.doe" not in out and "<EMAIL>" in out
    assert "555-0134" not in out and "7946" not in out and out.count("<PHONE>") == 2
    assert "AKIA" not in out and "s3cr3t" not in out and "ghp_" not in out
    assert "In 2024 it cost 1,299 dollars, order 12345." in out
    assert counts == {"emails": 1, "phones": 2, "keys": 3}
    counts = {}
    assert scrub_pii(text, False, False, False, counts) == text


def test_language_filter_keeps_the_asked_languages():
    keep_en = LanguageFilter(["en"], 0.5)
    assert not keep_en("The weather is lovely today and we are going to the park.", [])
    assert keep_en("Le temps est magnifique aujourd'hui et nous allons au parc.", [])
    assert keep_en("Das Wetter ist heute herrlich und wir gehen in den Park.", [])


def test_language_scores_equal_langid_classify():
    texts = ["The weather is lovely today.", "Le temps est magnifique aujourd'hui.", "Das Wetter ist heute herrlich.",
             "El tiempo es estupendo hoy.", "Il tempo è bellissimo oggi.", "x", "12345 !!!", "SELECT name FROM users;",
             "Погода сегодня прекрасная.", "今日はいい天気です。", sentence(random.Random(11), 50)]
    ident = LanguageFilter.identifier()
    for text in texts:
        lang, prob = ident.classify(text)
        ours = LanguageFilter(["en"], 0.5).language(text)
        assert ours[0] == lang and ours[1] == pytest.approx(prob, rel=1e-6, abs=1e-9)


def test_language_filter_without_langid_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "langid.langid", None)
    monkeypatch.setattr(LanguageFilter, "_identifier", None)
    with pytest.raises(DataError, match=r"needs the langid package.*tunesmith\[data\]"):
        LanguageFilter(["en"], 0.5)("some text here", [])


def test_signatures_estimate_jaccard():
    rng = random.Random(1)
    a = sentence(rng, 80)
    words = a.split()
    b = " ".join(words[:60] + [rng.choice(VOCAB) for _ in range(20)])
    sa, sb = set(shingles(a, 3)), set(shingles(b, 3))
    true = len(sa & sb) / len(sa | sb)
    from tunesmith.data.pipeline.config import NearDedupConfig

    sign = Signer(NearDedupConfig(num_perm=256))
    estimate = float(np.mean(sign(a) == sign(b)))
    assert abs(estimate - true) < 0.08
    assert shingles("one two", 3) == [b"one two"] and shingles("...", 3) == []


def test_near_dedup_index_finds_the_kept_twin():
    from tunesmith.data.pipeline.config import NearDedupConfig

    rng = random.Random(2)
    cfg = NearDedupConfig()
    sign, near = Signer(cfg), NearDedup(cfg)
    texts = [sentence(rng, 60) for _ in range(50)]
    assert all(near.check(sign(t)) is None for t in texts)  # distinct: all kept, numbered 0..49
    twin = texts[17].split()
    twin[30] = "changed"
    hit = near.check(sign(" ".join(twin)))
    assert hit is not None and hit[0] == 17 and hit[1] >= near.accept
    assert near.accept == pytest.approx(0.8 - 2 * (0.8 * 0.2 / 128) ** 0.5)


def test_lsh_bands_make_a_pair_at_the_threshold_a_candidate():
    from tunesmith.data.pipeline.dedup import lsh_bands

    for threshold, num_perm in ((0.8, 128), (0.7, 256), (0.9, 64)):
        bands, rows = lsh_bands(threshold, num_perm)
        assert bands * rows <= num_perm
        assert 1 - (1 - threshold ** rows) ** bands >= 0.98
        assert 1 - (1 - threshold ** (rows + 1)) ** (num_perm // (rows + 1)) < 0.98  # the fewest bands that do
    assert lsh_bands(0.8, 128) == (18, 7)


# --------------------------------------------------------------------------------------------------
# the pipeline: each step drops what it should and counts it


def test_each_step_drops_its_records_and_counts_them(tmp_path):
    rng = random.Random(3)
    base = [chat(sentence(rng, 12), sentence(rng, 30)) for _ in range(20)]
    near_twin = chat(base[5]["messages"][0]["content"], " ".join(base[5]["messages"][1]["content"].split()[:-1]) + " end.")
    rows = base + [
        chat(base[0]["messages"][0]["content"].upper(), base[0]["messages"][1]["content"].replace(".", "!")),  # exact
        chat("", ""),  # min_words
        chat("{{{ }}} <<<>>> ### $$$", "@@@ %%% ^^^ &&& *** (((", ),  # symbol_ratio
        chat("line one\nline one\nline one", "line one\nline two"),  # dup_line_ratio
        chat("buy now " * 20, "buy now " * 20 + "please"),  # top_ngram_ratio
        near_twin,  # near_dedup
    ]
    report, folder = run(tmp_path, rows, write_jsonl=True)
    dropped = {s["step"]: s["dropped"] for s in report["steps"]}
    assert dropped == {"read": 0, "normalise": 0, "exact_dedup": 1, "min_words": 1, "symbol_ratio": 1, "dup_line_ratio": 1,
                       "top_ngram_ratio": 1, "dup_ngram_ratio": 0, "near_dedup": 1, "write": 0}
    assert step(report, "exact_dedup")["first_dropped"].endswith(":21")
    assert step(report, "near_dedup")["first_dropped"].endswith(":26")
    assert step(report, "min_words")["records_in"] == 25  # after exact dedup took one of 26
    assert report["records_read"] == 26 and report["records_kept"] == 20
    assert kept_jsonl(folder) == base
    pairs = [json.loads(line) for line in (folder / "near_duplicates.jsonl").read_text().splitlines()]
    assert len(pairs) == 1 and pairs[0]["removed"].endswith(":26") and pairs[0]["kept"].endswith(":6")
    assert pairs[0]["similarity"] >= 0.8


def test_steps_switched_off_keep_everything(tmp_path):
    rng = random.Random(4)
    text = sentence(rng, 40)
    rows = [{"text": text}, {"text": text}, {"text": text + " x"}, {"text": "!!! ??? ..."}]
    off = {"min_words": None, "max_symbol_ratio": None, "max_dup_line_ratio": None, "max_top_ngram_ratio": None,
           "max_dup_ngram_ratio": None}
    report, folder = run(tmp_path, rows, write_jsonl=True, exact_dedup=False, filters=off,
                         near_dedup={"enabled": False})
    assert [s["step"] for s in report["steps"]] == ["read", "normalise", "write"]
    assert kept_jsonl(folder) == rows
    report, folder = run(tmp_path, rows, name="on", write_jsonl=True)
    assert [r["text"] for r in kept_jsonl(folder)] == [text]  # exact twin, near twin, symbols gone


def test_language_and_word_count_filters_in_the_pipeline(tmp_path):
    rows = [{"text": "The committee will publish its findings on the new railway next spring."},
            {"text": "La commission publiera ses conclusions sur la nouvelle ligne au printemps prochain."},
            {"text": "short"}]
    report, folder = run(tmp_path, rows, write_jsonl=True, filters={"languages": ["en"], "min_words": 2})
    assert step(report, "min_words")["dropped"] == 1 and step(report, "language")["dropped"] == 1
    assert kept_jsonl(folder) == rows[:1]


def test_pii_step_scrubs_before_dedup_and_tokenizing(tmp_path, tokenizer):
    rows = [chat("Contact bob@example.com about the invoice", "I will email him about the invoice today."),
            chat("Contact alice@example.net about the invoice", "I will email him about the invoice today.")]
    report, folder = run(tmp_path, rows, tokenizer, write_jsonl=True, pii={"enabled": True})
    assert report["pii_replaced"]["emails"] == 2
    assert step(report, "exact_dedup")["dropped"] == 0  # judged before scrubbing: different addresses
    assert step(report, "near_dedup")["dropped"] == 1  # scrubbed, they are the same
    text = tokenizer.decode(open_shards(folder)[0]["input_ids"])
    assert "<EMAIL>" in text and "bob@" not in text


def test_system_prompts_do_not_make_records_near_duplicates(tmp_path):
    rng = random.Random(5)
    system = {"role": "system", "content": sentence(rng, 200)}
    rows = [{"messages": [system] + chat(sentence(rng, 5), sentence(rng, 5))["messages"]} for _ in range(10)]
    report, _ = run(tmp_path, rows)
    assert report["records_kept"] == 10


def test_tool_chats_keep_their_tools_and_calls_tell_records_apart(tmp_path):
    tools = [{"type": "function", "function": {"name": name, "description": f"{name} a value.",
                                               "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}
             for name in ("double", "halve")]

    def called(name: str) -> dict:
        return {"tools": tools, "messages": [
            {"role": "user", "content": "What do you make of the value seven today?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                "name": name, "arguments": {"x": "7"}}}]}]}

    rows = [called("double"), called("halve"), called("double")]
    report, folder = run(tmp_path, rows, write_jsonl=True, near_dedup={"enabled": False}, filters={"min_words": None})
    kept = kept_jsonl(folder)
    assert step(report, "exact_dedup")["dropped"] == 1  # the third repeats the first; the second calls another tool
    assert [r["messages"][1]["tool_calls"][0]["function"]["name"] for r in kept] == ["double", "halve"]
    assert all(r["tools"] == tools for r in kept)


# --------------------------------------------------------------------------------------------------
# shards


def test_shards_hold_what_load_data_builds_from_the_kept_records(tmp_path, tokenizer):
    rng = random.Random(6)
    rows = [chat(sentence(rng, 8), sentence(rng, rng.randint(5, 40))) for _ in range(30)]
    rows += [{"instruction": sentence(rng, 6), "output": sentence(rng, 9)} for _ in range(0)]
    rows.append(rows[3])  # a duplicate
    report, folder = run(tmp_path, rows, tokenizer, write_jsonl=True)
    shards = open_shards(folder, tokenizer)
    memory = load_data(DataConfig(train=str(folder / "cleaned.jsonl"), max_length=512), tokenizer, report=False)
    assert len(shards) == len(memory.train) == 30 == report["samples"]
    for lazy, built in zip(shards, memory.train):
        assert lazy["input_ids"] == built["input_ids"] and list(lazy["weights"]) == list(built["weights"])
    assert report["tokens"] == int(shards.lengths.sum())
    assert shards.manifest["report"]["records_read"] == 31
    assert shards.manifest["meta"]["format"] == "chat"
    through_train = load_data(DataConfig(train=str(folder)), tokenizer, report=False)  # what train reads
    assert len(through_train.train) == 30


def test_domains_and_sources_reach_the_shards(tmp_path, tokenizer):
    rng = random.Random(7)
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": sentence(rng, 20), "domain": "sql"} for _ in range(3)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": sentence(rng, 20), "domain": "json"} for _ in range(2)])
    result = prepare(PrepareConfig(inputs=[a, b], output=str(tmp_path / "out")), DataConfig(), tokenizer)
    shards = open_shards(result.folder)
    assert shards.manifest["meta"]["domains"] == ["sql", "json"]
    assert [s["domain"] for s in shards] == [0, 0, 0, 1, 1]
    assert shards.manifest["sources"] == [a, b] and shards.sources.tolist() == [0, 0, 0, 1, 1]


def test_render_step_counts_records_with_nothing_to_train(tmp_path, tokenizer):
    rows = [chat("a question with words", "an answer with words"), {"messages": [{"role": "user", "content": "no answer here at all"}]}]
    report, _ = run(tmp_path, rows, tokenizer)
    assert step(report, "tokenize")["dropped"] == 1 and step(report, "tokenize")["reasons"] == {"no_assistant": 1}


def test_two_workers_write_the_same_shards_as_one(tmp_path, tokenizer):
    rng = random.Random(8)
    rows = [chat(sentence(rng, 10), sentence(rng, 25)) for _ in range(600)]
    rows += [rows[i] for i in range(0, 600, 7)]  # exact duplicates, spread across chunks
    rows += [chat(r["messages"][0]["content"], r["messages"][1]["content"][:-1] + " extra.") for r in rows[:40]]
    rows[300:300] = [chat("{{ }} ##", "@@ $$ %%")] * 2  # a filtered record's twin is still an exact duplicate
    src = write_jsonl(tmp_path / "rows.jsonl", rows)

    def with_workers(n):
        cfg = PrepareConfig(inputs=[src], output=str(tmp_path / f"w{n}"), workers=n, pii={"enabled": True})
        result = prepare(cfg, DataConfig(max_length=512), tokenizer)
        return result.report, result.folder

    (one, f1), (two, f2) = with_workers(1), with_workers(2)
    counts = lambda r: [(s["step"], s["records_in"], s["dropped"], s["first_dropped"]) for s in r["steps"]]  # noqa: E731
    assert counts(one) == counts(two) and step(one, "exact_dedup")["dropped"] == 87
    assert step(one, "symbol_ratio")["dropped"] == 1
    assert (f1 / "shard-00000.safetensors").read_bytes() == (f2 / "shard-00000.safetensors").read_bytes()
    assert (f1 / "near_duplicates.jsonl").read_text() == (f2 / "near_duplicates.jsonl").read_text()
    assert step(one, "near_dedup")["dropped"] == 40 and two["workers"] == 2


# --------------------------------------------------------------------------------------------------
# inputs and errors


def test_folder_and_glob_inputs_and_txt_documents(tmp_path):
    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    (raw / "b.txt").write_text("A whole document about trains and their timetables.\n")
    (raw / "sub" / "a.jsonl").write_text(json.dumps({"text": "A record about ships and harbours."}) + "\n")
    (raw / "notes.md").write_text("not data")
    for inputs in ([str(raw)], [str(raw / "**" / "*.*")]):
        out = tmp_path / f"out{len(inputs[0])}"
        result = prepare(PrepareConfig(inputs=inputs, output=str(out), tokenize=False, write_jsonl=True), DataConfig())
        assert result.report["inputs"] == [str(raw / "b.txt"), str(raw / "sub" / "a.jsonl")]
        assert [r["text"] for r in kept_jsonl(out)] == ["A whole document about trains and their timetables.",
                                                        "A record about ships and harbours."]


def test_limit_stops_reading(tmp_path):
    rng = random.Random(9)
    rows = [{"text": sentence(rng, 10)} for _ in range(50)]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    result = prepare(PrepareConfig(inputs=[src], output=str(tmp_path / "o"), tokenize=False), DataConfig(limit=7))
    assert result.report["records_read"] == 7


def test_errors_name_the_record_or_the_setting(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"bad\.jsonl:2: record has no field 'messages'"):
        run(tmp_path, [chat("q words", "a words"), {"conversation": []}], name="bad")
    with pytest.raises(DataError, match="preference records"):
        run(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b"}], name="pref")
    with pytest.raises(DataError, match="matches no"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "nothing-*.jsonl")], tokenize=False), DataConfig())
    with pytest.raises(DataError, match="data.train is not set"):
        prepare(PrepareConfig(tokenize=False), DataConfig())
    with pytest.raises(DataError, match="no record was left to tokenize .*min_words dropped 1"):
        run(tmp_path, [{"text": " "}], tokenizer, name="empty")
    run(tmp_path, [{"text": "some words here"}], tokenizer, name="twice")
    with pytest.raises(DataError, match="already holds shards"):
        run(tmp_path, [{"text": "some words here"}], tokenizer, name="twice")


def test_cli_prepare_and_its_one_line_errors(tmp_path, tiny_model_dir, capsys):
    from tunesmith.cli import main

    src = write_jsonl(tmp_path / "c.jsonl", [chat("How do I sort a list?", "Use sorted(items)."),
                                            chat("How do I sort a list?", "Use sorted(items).")])
    out = tmp_path / "shards"
    code = main(["data", "prepare", "recipes/data-prepare.yaml", f"model.name={tiny_model_dir}",
                 f"prepare.inputs={src}", f"prepare.output={out}", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0 and "| exact_dedup | 2 | 1 |" in printed and (out / "manifest.json").is_file()
    code = main(["data", "prepare", "recipes/data-prepare.yaml", f"prepare.inputs={tmp_path / 'missing.jsonl'}",
                 "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "missing.jsonl" in err
    code = main(["data", "prepare", "recipes/data-prepare.yaml", "prepare.near_dedup.threshold=2", "--quiet"])
    assert code == 2 and "prepare.near_dedup.threshold" in capsys.readouterr().err


def test_ascii_fast_paths_equal_the_unicode_rules():
    import string

    rng = random.Random(10)
    chars = string.ascii_letters + string.digits + string.punctuation + " \n\t"
    for _ in range(300):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(0, 60)))
        # a no-break space is whitespace to both rules and makes the text non-ASCII: the regex path
        assert symbol_ratio(text) == pytest.approx(symbol_ratio(text + "\u00a0"))
        assert exact_key(text) == exact_key(text + "\u00a0")


def test_a_bad_record_in_a_worker_is_the_same_one_line_error(tmp_path):
    rows = [{"text": f"record number {i} with words"} for i in range(300)] + [{"text": ["not", "a", "string"]}]
    with pytest.raises(DataError, match=r"w\.jsonl:301: field 'text' is list; expected a string"):
        run(tmp_path, rows, name="w", workers=2)
