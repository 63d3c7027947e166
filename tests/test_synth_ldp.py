"""LDP (synth/ldp.py) and the English-rooted constructed languages it runs on: the new languages are
deterministic and parallel, the old ones say exactly what they said, LDP prompts mix >= 2
high-resource languages and never show the target, the filters on hand-built pairs, and a tiny
random model runs the whole pipeline (synthesis with provenance, resume, LoRA, stats.json)."""
import hashlib
import json
import random

import pytest

from tunesmith.data.tasks import get_task, task_records
from tunesmith.data.tasks.translation import PROMPT, clauses, task_names
from tunesmith.data.tasks.translation_data import (LANGUAGES, Clause, Phrase, describe_language, draw_clause, lexicon,
                                                   realize)
from tunesmith.synth.ldp import (FILTERS, HIGH, TARGET, FilterConfig, LdpConfig, LdpError, Pair, ShotsTask,
                                 as_examples, check_languages, high_resource_pairs, pick_diverse, run_ldp,
                                 unlabelled_pool, verdict, x2en_jobs)

NEW = ("ob", "ir", "el", "um", "lu")

# What the languages said before the English-rooted family was added: sha256 (16 hex) of 300
# sentences, and three sentences in full.
GOLDEN = {"en": "60639884daf2e886", "ci": "cb4133c2b30201df", "va": "8715f4a2163cea54", "vo": "eb2e61552363339b",
          "ka": "10c15241f4412ac4"}
GOLDEN_TEXT = {
    "ci": ["Cjd zlc xix yec eody cjd uceyd qbidcsk.", "Cjd aiywu viss zlss uemd plhmdhu iy cjd aiczjdy.",
           "Cjd zsdrdh cdlzjdh viss vlczj cjd jdlrk zjisxhdy."],
    "va": ["Ma densavi val nunbenta ma pontal pintal.", "Ma bolsalsoi vilvavore lun dalroi lol ma lasen.",
           "Ma sile minal santore ma fifanboi tanpu."],
    "vo": ["Deinshovimo bondolmom volnynbeindo bindol.", "Bolsholshoirmo lyn dolroirm vilvovoro lol losheinmo.",
           "Shileimo minol fifonboirmom donby shondoro."],
    "ka": ["Timzuk humruek tum gumtikhaak khakkurhaaku.",
           "Khartamhaak khi sharkhaarish gukkharakhaak kak tumkaaaku.",
           "Kurgaakrumish kakhimkaa gaamhimtirhaak turramka gukhikakhaaku."],
}
TRANSLATE_ALL = "d8ae68cb9b2cd50e"  # translate-all (n_train=120, n_validation=20, n_test=40): train + test records


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the languages

def test_existing_languages_and_translate_all_are_unchanged():
    for code, expected in GOLDEN.items():
        text = "\n".join(realize(draw_clause(random.Random(f"golden/{i}")), code) for i in range(300))
        assert digest(text) == expected, code
    for code, sentences in GOLDEN_TEXT.items():
        assert [realize(draw_clause(random.Random(s)), code) for s in range(3)] == sentences
    task = get_task("translate-all", n_train=120, n_validation=20, n_test=40)
    assert digest(json.dumps(task_records(task, "train") + task_records(task, "test"))) == TRANSLATE_ALL
    assert not {src for pair in task.pairs for src in pair} & set(NEW)


def test_new_languages_are_english_rooted_deterministic_and_parallel():
    c = Clause(Phrase("farmer", plural=True, adjective="old"), "watch", Phrase("cat", definite=False), tense="past",
               negated=True, place=("near", Phrase("river")))
    assert realize(c, "en") == "The old farmers did not watch a cat near the river."
    assert realize(c, "lu") == "Farmererne old catm navatchti riverne near."  # SOV, suffixes, w -> v, postposition
    assert realize(c, "ob") == "De old farmeren cat watchde nit near de river."  # SOV, negation after
    assert realize(c, "ir") == "Riverta near ni vatkhek farmerita old kato."  # VSO, place first, respelled
    assert realize(c, "el") == "Le farmeres old pas watchai cat near le river."
    assert realize(c, "um") == "Near river catn old farmera unwatchte."  # OSV, no articles, negation prefix
    for code in NEW:
        assert realize(c, code) == realize(c, code)
        words = lexicon(code)
        assert len(set(words.values())) == len(words), code  # injective: every sentence decodes
        assert "English roots" in describe_language(code) and f"translate-{code}-en" in task_names()
    assert LANGUAGES["lu"].n_train == 200 and all(not LANGUAGES[c].mixed for c in NEW)
    small = dict(n_train=30, n_validation=5, n_test=20)
    lu, ob = get_task("translate-lu-en", **small), get_task("translate-ob-en", **small)
    assert [e.reference for e in lu.examples("test")] == [e.reference for e in ob.examples("test")]
    assert [e.meta["source_text"] for e in lu.examples("test")] != [e.meta["source_text"] for e in ob.examples("test")]


# ----------------------------------------------------------------------------- prompts

def test_ldp_prompts_mix_high_resource_languages_and_never_show_the_target():
    cfg = LdpConfig(pool=12, shots=4, per_language=10)
    pool = unlabelled_pool(cfg.target, cfg.pool)
    exemplars = high_resource_pairs(cfg.high, cfg.per_language, skip=cfg.pool)
    pool_english = {realize(c, "en") for c in clauses("train", cfg.pool)}
    names = {code: LANGUAGES[code].name for code in LANGUAGES}
    for job in x2en_jobs(pool, cfg, exemplars):
        msgs = job.prompt
        assert msgs[0]["role"] == "system" and len(msgs) == 2 + 2 * cfg.shots
        asked = [m["content"] for m in msgs[1:-1:2]]
        shown = {code for code, name in names.items() for q in asked if q.startswith(f"Translate from {name} ")}
        assert len(shown) >= 2 and shown <= set(HIGH) and TARGET not in shown
        assert set(job.meta["exemplar_languages"]) == shown
        assert msgs[-1]["content"] == PROMPT.format(src="Lunish", tgt="English", text=job.meta["source"])
        answers = {m["content"] for m in msgs[2:-1:2]}
        assert not answers & pool_english  # exemplars come from other meanings: no answer leaks
        assert not any(p in m["content"] for p in pool if p != job.meta["source"] for m in msgs)
    # pick_diverse takes the languages in turn
    picked = pick_diverse(exemplars, 8, random.Random(0))
    assert all(sum(p.language == code for p in picked) == 2 for code in HIGH) and len(set(picked)) == 8


def test_language_checks_and_intra_lingual_rounds():
    with pytest.raises(LdpError, match="at least 2"):
        check_languages("lu", ("ob",))
    with pytest.raises(LdpError, match="cannot also"):
        check_languages("lu", ("ob", "lu"))
    with pytest.raises(LdpError, match="unknown language `zz`"):
        check_languages("zz", ("ob", "ir"))
    synthetic = [Pair("lu", f"Lunish {i}.", f"English {i}.") for i in range(6)]
    cfg = LdpConfig(shots=3)
    jobs = x2en_jobs(["Lunish 0.", "Lunish 5."], cfg, {"lu": synthetic}, round_=1)
    for job in jobs:
        assert job.meta["exemplar_languages"] == ["lu"] * 3
        shots = [m["content"] for m in job.prompt[1:-1:2]]
        assert all(s.startswith("Translate from Lunish to English.") for s in shots)
        assert not any(job.meta["source"] in s for s in shots)  # never its own synthetic pair


def test_shots_task_puts_the_given_exemplars_before_each_question(tokenizer, monkeypatch):
    import tunesmith.infer.generate as gen
    from tunesmith.eval.runner import evaluate

    task = get_task("translate-lu-en", n_train=10, n_validation=5, n_test=4)
    shots = as_examples([Pair("ob", "De cat seede.", "The cat saw."), Pair("ir", "Seeek kat.", "The cat saw.")])
    seen = []

    def fake(model, tok, prompts, **kw):
        seen.extend(prompts)
        return ["English: " + p[-1]["content"] for p in prompts]

    monkeypatch.setattr(gen, "generate", fake)
    evaluate(None, tokenizer, ShotsTask(task, shots), shots=2, limit=4)
    assert len(seen) == 4 and seen[0][1]["content"].startswith("Translate from Obrish to English.")
    assert seen[0][4]["content"] == "The cat saw." and seen[0][-1]["content"] == task.examples("test")[0].prompt
    back = as_examples([Pair("lu", "Catne sieti.", "The cat saw.")], to_english=False)[0]
    assert back.prompt.startswith("Translate from English to Lunish.") and back.reference == "Catne sieti."


# ----------------------------------------------------------------------------- filters

@pytest.mark.parametrize("source,english,finish,expected", [
    ("Catne sieti.", "The cat saw.", "stop", "kept"),
    ("Catne sieti.", "   ", "stop", "empty"),
    ("Catne sieti.", "", "stop", "empty"),
    ("Catne sieti.", "The cat saw the", "length", "truncated"),
    ("Catne sieti.", "catne sieti", "stop", "copy"),  # case and punctuation do not hide a copy
    ("Farmererne old catm navatchti.", "Farmererne old catm navatchi.", "stop", "copy"),  # near-copy
    ("Catne sieti.", "Cat.", "stop", "length_ratio"),  # 4 / 12 chars, under the 0.5 bound
    ("Catne sieti.", "The cat saw the dog near the river and then it ran away.", "stop", "length_ratio"),
])
def test_filters_on_hand_built_pairs(source, english, finish, expected):
    assert verdict(source, english, finish) == expected


def test_filter_bounds_and_options():
    assert verdict("x" * 10, "y" * 5) == "kept" and verdict("x" * 10, "y" * 4) == "length_ratio"
    assert verdict("x" * 10, "y" * 20) == "kept" and verdict("x" * 10, "y" * 21) == "length_ratio"
    assert verdict("Catne sieti.", "The cat saw the", "length", FilterConfig(drop_truncated=False)) == "kept"
    assert verdict("Catne sieti.", "Catne sieti the cat.", cfg=FilterConfig(copy_similarity=0.99)) == "kept"
    assert FILTERS == ("empty", "truncated", "copy", "length_ratio")


# ----------------------------------------------------------------------------- end to end

def test_tiny_model_end_to_end_with_provenance_resume_and_lora(tokenizer, tmp_path):
    from conftest import lively_model

    from tunesmith.infer.generate import load_for_inference

    model_dir = tmp_path / "lively"  # a random model whose greedy answers are not empty
    lively_model(tokenizer, seed=1).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    model, tok = load_for_inference(str(model_dir))
    lenient = FilterConfig(min_ratio=0.0, max_ratio=1e9, copy_similarity=1.01, drop_truncated=False)
    cfg = LdpConfig(pool=5, shots=2, per_language=4, max_new_tokens=6, batch_size=4, filters=lenient,
                    progress=False, overrides=("train.steps=2", "train.precision=fp32", "train.batch_tokens=256",
                                               "data.max_length=256", "train.save_every=0"))
    stats = run_ldp(model, tok, cfg, tmp_path / "ldp", model_name=str(model_dir))
    out = tmp_path / "ldp"
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and [r["index"] for r in rows] == list(range(5))
    for r in rows:
        assert {"job", "source", "source_language", "exemplar_languages", "raw", "english", "finish", "logprob",
                "verdict"} <= set(r)
        assert r["source_language"] == "lu" and len(set(r["exemplar_languages"])) == 2
    engine = [json.loads(line) for line in (out / "x2en.jsonl").read_text().splitlines()]
    assert sum("done" in r for r in engine) == 5 and all(r["meta"]["source"] for r in engine if "text" in r)
    kept = sum(r["verdict"] == "kept" for r in rows)
    assert stats["kept"] == kept > 0 and stats["generated"] == 5 and sum(stats["dropped"].values()) == 5 - kept
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(train) == 2 * kept and train[1]["messages"][1]["content"].startswith("Translate from English to Lunish.")
    saved = json.loads((out / "stats.json").read_text())
    for key in ("method", "generated", "kept", "dropped", "generation_s", "samples_per_s", "train_s"):
        assert key in saved
    assert saved["method"] == "ldp" and saved["train_s"] > 0 and (out / "tuned").is_dir()
    # a second call finds every job done: nothing decoded again, the same pairs
    again = run_ldp(model, tok, LdpConfig(**{**cfg.__dict__, "tune": False}), out, model_name=str(model_dir))
    assert again["kept"] == kept and again["samples_per_s"] is None
    assert (out / "x2en.jsonl").read_text().count('"done": true') == 5


def test_second_round_prompts_with_kept_synthetic_target_pairs(tokenizer, tmp_path):
    from conftest import lively_model

    lenient = FilterConfig(min_ratio=0.0, max_ratio=1e9, copy_similarity=1.01, drop_truncated=False)
    cfg = LdpConfig(pool=4, shots=2, per_language=3, rounds=2, max_new_tokens=4, filters=lenient, tune=False,
                    progress=False)
    stats = run_ldp(lively_model(tokenizer, seed=1), tokenizer, cfg, tmp_path / "r")
    assert [r["round"] for r in stats["rounds"]] == [0, 1] and stats["output"] is None
    second = [json.loads(line) for line in (tmp_path / "r" / "x2en-r1.jsonl").read_text().splitlines()]
    first = {json.loads(line)["meta"]["source"]: json.loads(line)["text"].strip()
             for line in (tmp_path / "r" / "x2en.jsonl").read_text().splitlines() if '"text"' in line}
    for rec in (r for r in second if "text" in r):
        shots = rec["prompt"][1:-1]
        assert rec["meta"]["exemplar_languages"] == ["lu", "lu"]
        for user, answer in zip(shots[::2], shots[1::2]):  # round-0 outputs, now the target's own exemplars
            src = user["content"].split("Lunish: ", 1)[1].split("\n")[0]
            assert src != rec["meta"]["source"] and answer["content"] in first[src]
    rows = [json.loads(line) for line in (tmp_path / "r" / "pairs.jsonl").read_text().splitlines()]
    assert {r["round"] for r in rows} == {1}
    with pytest.raises(LdpError, match="model_name"):
        run_ldp(None, tokenizer, LdpConfig(), tmp_path / "x")


def test_cli_rejects_bad_languages_before_loading(capsys, tmp_path):
    from tunesmith.cli import main

    assert main(["synth", "ldp", "--target", "lu", "--high", "ob,lu", "--out", str(tmp_path / "o")]) == 2
    assert "cannot also be a high-resource language" in capsys.readouterr().err
