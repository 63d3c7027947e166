"""The built-in translation tasks over constructed languages: determinism, splits that hold apart by
meaning across every direction, each transform (lexicon, word order, morphology, cipher, sister
languages), scoring with chrF++ against sacrebleu, the runner's corpus metrics, the data source,
the CLI and the recipes."""
import json
import re

import pytest
from sacrebleu.metrics import BLEU, CHRF

from tunesmith.data.sources import DataError, read_records
from tunesmith.data.tasks import get_task, task_records
from tunesmith.data.tasks.translation import (TranslationError, TranslationTask, clauses, extract_translation,
                                              split_of, task_names)
from tunesmith.data.tasks.translation_data import (LANGUAGES, LEMMAS, Clause, Phrase, cipher_table, lexicon,
                                                   realize, realize_english)

SMALL = dict(n_train=120, n_validation=20, n_test=40)


def english_of(task, split):
    return [ex.meta["english"] for ex in task.examples(split)]


def test_same_seed_same_examples_other_seed_other_sentences_same_language():
    a, b = get_task("translate-va", seed=0, **SMALL), get_task("translate-va", seed=0, **SMALL)
    assert [(e.prompt, e.reference) for e in a.examples("test")] == [(e.prompt, e.reference) for e in b.examples("test")]
    c = get_task("translate-va", seed=1, **SMALL)
    assert english_of(a, "test") != english_of(c, "test")
    # The language is fixed: a sentence means the same words under any task seed.
    shared = next(ex for ex in c.examples("train"))
    clause = clauses("train", 1, seed=1)[0]
    assert realize(clause, "va") == shared.reference


def test_splits_are_disjoint_across_every_direction():
    tasks = [get_task(n, **SMALL) for n in ("translate-va", "translate-vo", "translate-ka-en", "translate-all")]
    test = {e for t in tasks for e in english_of(t, "test")}
    val = {e for t in tasks for e in english_of(t, "validation")}
    train = {e for t in tasks for e in english_of(t, "train")}
    assert test and val and train
    assert not test & train and not val & train and not test & val
    assert all(split_of(e) == "test" for e in test) and all(split_of(e) == "train" for e in train)
    # within one split, no sentence repeats
    assert len(set(english_of(tasks[0], "train"))) == SMALL["n_train"]


def test_multiway_parallel_and_prefix_property():
    va, vo = get_task("translate-va", **SMALL), get_task("translate-vo", **SMALL)
    assert english_of(va, "test") == english_of(vo, "test")
    assert [e.reference for e in va.examples("test")] != [e.reference for e in vo.examples("test")]
    bigger = get_task("translate-va", n_train=300, n_validation=20, n_test=40)
    assert english_of(bigger, "train")[:120] == english_of(va, "train")
    # the reverse direction swaps prompt text and reference
    back = get_task("translate-va-en", **SMALL)
    for fwd, rev in zip(va.examples("test")[:5], back.examples("test")[:5]):
        assert rev.reference == fwd.meta["english"] and rev.meta["source_text"] == fwd.reference
        assert rev.prompt.startswith("Translate from Valian to English.")


def test_default_sizes_follow_resource_level_and_cover_test_vocabulary():
    vo, va = get_task("translate-vo"), get_task("translate-va")
    assert len(vo.examples("train")) == LANGUAGES["vo"].n_train == 200
    assert len(va.examples("train")) == 2000
    words = lambda exs: {w for e in exs for w in re.findall(r"\w+", e.reference.lower())}
    # every stem of the low-resource test set is seen in its 200 training pairs (at the default seed)
    stems = {lexicon("vo")[lemma] for lemma in LEMMAS}
    train_words, test_words = words(vo.examples("train")), words(vo.examples("test"))
    seen_stems = {s for s in stems if any(w.startswith(s) for w in train_words)}
    test_stems = {s for s in stems if any(w.startswith(s) for w in test_words)}
    assert test_stems <= seen_stems


def test_lexicons_are_injective_and_sister_language_shares_roots():
    for code in LANGUAGES:
        if LANGUAGES[code].cipher:
            continue
        words = lexicon(code)
        assert set(words) == set(LEMMAS) and len(set(words.values())) == len(words), code
    va, vo, ka = lexicon("va"), lexicon("vo"), lexicon("ka")
    shifted = 0
    for lemma in LEMMAS:
        word = va[lemma]
        for a, b in LANGUAGES["vo"].sound_changes:
            word = word.replace(a, b)
        shifted += vo[lemma] == word
    assert shifted >= 0.9 * len(LEMMAS)  # cognates; the rest were doubled apart after merging
    chrf = CHRF()
    related = chrf.corpus_score([" ".join(vo.values())], [[" ".join(va.values())]]).score
    unrelated = chrf.corpus_score([" ".join(ka.values())], [[" ".join(va.values())]]).score
    assert related > 2 * unrelated


def test_word_order_and_morphology():
    c = Clause(Phrase("farmer"), "see", Phrase("cat"))
    w = {code: lexicon(code) for code in ("va", "vo", "ka")}
    assert realize(c, "en") == "The farmer sees the cat."
    the = w["va"]["the"]
    assert realize(c, "va") == f"{the.capitalize()} {w['va']['farmer']} {w['va']['see']} {the} {w['va']['cat']}."  # SVO
    vo = w["vo"]  # SOV, definite suffix, object case
    assert realize(c, "vo") == f"{(vo['farmer'] + vo['the']).capitalize()} {vo['cat'] + vo['the'] + 'm'} {vo['see']}."
    ka = w["ka"]  # VSO
    assert realize(c, "ka") == f"{ka['see'].capitalize()} {ka['farmer'] + ka['the']} {ka['cat'] + ka['the'] + 'u'}."
    past_plural = Clause(Phrase("farmer", plural=True, adjective="old"), "see", Phrase("cat"), tense="past",
                         negated=True)
    assert realize_english(past_plural) == "The old farmers did not see the cat."
    va = realize(past_plural, "va").split()  # adjective after the noun, plural -i, negation particle, past -ta
    assert va[:5] == [the.capitalize(), w["va"]["farmer"] + "i", w["va"]["old"], w["va"]["not"], w["va"]["see"] + "ta"]
    assert f" {vo['not']}{vo['see']}do." in realize(past_plural, "vo")  # negation prefix, past suffix


def test_cipher_is_a_letter_bijection_of_english():
    table = cipher_table("ci")
    assert len(set(table.values())) == len(table) == 52
    inverse = {b: a for a, b in table.items()}
    for c in clauses("train", 30):
        ci = realize(c, "ci")
        assert ci != realize_english(c)
        assert "".join(inverse.get(ch, ch) for ch in ci) == realize_english(c)


def test_score_exact_partial_and_chrf_pp_parity():
    task = get_task("translate-ka", **SMALL)
    ex = task.examples("test")[0]
    assert task.score(ex.reference, ex).correct and task.score(ex.reference, ex).score == pytest.approx(1.0)
    v = task.score(f"Karun: {ex.reference}\nThat is my answer.", ex)
    assert v.correct and v.extracted == ex.reference
    wrong = ex.reference.rsplit(" ", 1)[0] + " zzz."
    v = task.score(wrong, ex)
    expected = CHRF(word_order=2).sentence_score(wrong, [ex.reference]).score / 100
    assert not v.correct and v.score == pytest.approx(expected) and 0 < v.score < 1
    assert expected != pytest.approx(CHRF().sentence_score(wrong, [ex.reference]).score / 100)
    assert extract_translation('"Pevo nunbenre Leo."', "va") == "Pevo nunbenre Leo."


def test_runner_reports_corpus_bleu_chrf_and_chrf_pp(tokenizer, monkeypatch):
    import tunesmith.infer.generate as gen
    from tunesmith.eval.runner import evaluate

    task = get_task("translate-va", **SMALL)
    refs = {e.prompt: e.reference for e in task.examples("test")}
    # a scripted "model": right on even questions, a word short on odd ones, with a label to strip
    def fake(model, tok, prompts, **kw):
        out = []
        for i, p in enumerate(prompts):
            ref = refs[p[-1]["content"]]
            out.append("Valian: " + (ref if i % 2 == 0 else ref.split(" ", 1)[1]))
        return out

    monkeypatch.setattr(gen, "generate", fake)
    result = evaluate(None, tokenizer, task, limit=10)
    assert result.metric == "chrf++"
    preds = [r["extracted"] for r in result.records]
    golds = [r["reference"] for r in result.records]
    assert result.summary["chrf++"] == pytest.approx(CHRF(word_order=2).corpus_score(preds, [golds]).score)
    assert result.summary["bleu"] == pytest.approx(BLEU().corpus_score(preds, [golds]).score)
    assert result.summary["chrf"] == pytest.approx(CHRF().corpus_score(preds, [golds]).score)
    assert result.summary["accuracy"] == pytest.approx(0.5) and result.summary["chrf++"] < 100
    assert result.summary["chrf++"] != pytest.approx(result.summary["chrf"])


def test_task_source_gives_chat_records_and_bad_names_fail_clearly():
    records = list(read_records("task:translate-vo/validation"))
    assert len(records) == 100
    msgs = records[0].fields["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[1]["content"].startswith("Translate from English to Volian.")
    assert task_records(get_task("translate-all", **SMALL), "train")[1]["messages"][1]["content"].startswith(
        "Translate from Cipherish to English.")
    for bad in ("translate-xx", "translate-va-va", "translate-va-vo-ka"):
        with pytest.raises(TranslationError, match="translat"):
            get_task(bad)
    with pytest.raises(DataError, match="task:translate-zz/train: unknown translation task"):
        list(read_records("task:translate-zz/train"))
    with pytest.raises(ValueError, match="n_train"):
        TranslationTask("translate-va", n_train=-1)
    assert "translate-vo-en" in task_names()


def test_eval_cli_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    from tunesmith.cli import main

    out = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(tiny_model_dir), "--task", "translate-vo", "--limit", "2",
               "--max-new-tokens", "4", "--output", str(out)])
    assert rc in (0, None)
    summary = json.loads(out.read_text())["summary"]
    assert {"bleu", "chrf", "chrf++"} <= set(summary) and summary["examples"] == 2


@pytest.mark.parametrize("name", ["translation-lora", "translation-two-stage"])
def test_recipes_load(name):
    from tunesmith.recipe import load_recipe

    recipe = load_recipe(f"recipes/{name}.yaml")
    assert "translate-vo" in json.dumps(recipe.model_dump(), default=str)


def test_a_registered_sister_language_gets_its_own_tasks():
    from tunesmith.data.tasks.translation_data import Language, register_language

    lang = register_language(Language("vu", "Vulian", order="OSV", adjective_after=True, definite="none",
                                      plural="en", parent="va", sound_changes=(("l", "r"), ("o", "u")), n_train=50))
    try:
        task = get_task("translate-vu", n_validation=5, n_test=5)
        assert len(task.examples("train")) == lang.n_train
        c = Clause(Phrase("farmer"), "see", Phrase("cat"))  # OSV, no articles
        vu = lexicon("vu")
        assert realize(c, "vu") == f"{vu['cat'].capitalize()} {vu['farmer']} {vu['see']}."
        assert vu["farmer"] == lexicon("va")["farmer"].replace("l", "r").replace("o", "u")
        with pytest.raises(ValueError, match="taken"):
            register_language(Language("vu", "Again"))
        with pytest.raises(ValueError, match="unknown parent"):
            register_language(Language("qq", "Orphan", parent="zz"))
    finally:
        LANGUAGES.pop("vu")
