"""Knowledge preference (instruction > context > parametric): the hierarchy labels on hand-built
conflicts, the generated conditions, disjoint and deterministic splits, the scorer on hand-built
outputs, the per-group summary of the eval runner, and the `synth knowledge` data."""
import json
import math
import random

import pytest

from tests.conftest import make_tiny_model
from tunesmith.data.tasks import get_task
from tunesmith.data.tasks import knowledge_data as kd
from tunesmith.data.tasks.base import Example
from tunesmith.data.tasks.knowledge import (GROUPS, MIX, Builder, KnowledgeError, KnowledgeTask, answer_line, follow,
                                            mentions, real_splits, render, schedule, worlds)
from tunesmith.eval.runner import evaluate, format_summary

REAL = [("capital", "France", "Paris"), ("capital", "Japan", "Tokyo"), ("capital", "Italy", "Rome"),
        ("capital", "Germany", "Berlin"), ("capital", "Spain", "Madrid"),
        ("city_country", "Paris", "France"), ("city_country", "Tokyo", "Japan"), ("city_country", "Rome", "Italy"),
        ("city_country", "London", "the United Kingdom"), ("city_country", "Madrid", "Spain")]


def hand_world() -> kd.World:
    names = {"country": ["Veloria", "Darnesh"], "town": ["Ambermere", "Coldholt", "Fernvale", "Duskport"],
             "person": ["Ilsa Morrow", "Tam Vesk", "Oren Pike"], "company": ["Quill Works"],
             "invention": ["Harrow lamp"]}
    world = kd.build_world(names, random.Random(0))
    world.facts.update({("born_in", "Ilsa Morrow"): "Ambermere", ("born_in", "Tam Vesk"): "Fernvale",
                        ("born_in", "Oren Pike"): "Coldholt", ("founded_by", "Quill Works"): "Ilsa Morrow"})
    return world


def task(**kw) -> KnowledgeTask:
    return KnowledgeTask(real_facts=REAL, n_train=120, n_validation=24, n_test=48, **kw)


# ----------------------------------------------------------------------------- hierarchy labels

@pytest.mark.parametrize("sources, gold", [
    ({"parametric": "Paris"}, "Paris"),                                              # parametric only
    ({"context": "Lyon", "parametric": "Paris"}, "Lyon"),                            # context beats parametric
    ({"instruction": "Nice", "context": "Lyon", "parametric": "Paris"}, "Nice"),     # instruction beats both
    ({"instruction": "Nice", "parametric": "Paris"}, "Nice"),                        # no context
    ({"instruction": "Nice", "context": "Lyon"}, "Nice"),                            # synthetic: nothing known
    ({"context": "Lyon", "noise": ["Nice", "Brest"]}, "Lyon"),                       # noise is never an answer
    ({"instruction": "Nice", "noise": ["Lyon"], "parametric": "Paris"}, "Nice"),     # instruction + noise
])
def test_hierarchy_on_hand_built_conflicts(sources, gold):
    assert follow(sources) == gold


def test_hierarchy_without_any_source_is_an_error():
    with pytest.raises(KnowledgeError, match="no knowledge source"):
        follow({"noise": ["Lyon"]})


def test_hand_built_world_conflicts_become_the_right_prompts():
    b = Builder(hand_world(), REAL, random.Random(3))
    for _ in range(20):
        prompt, meta = b.context_conflict()
        s, r, o = meta["fact"]
        assert meta["sources"]["parametric"] == o and meta["sources"]["context"] != o
        assert f"[1] {kd.RELATIONS[r].state(s, meta['sources']['context'])}" in prompt
        assert not mentions(prompt, o)  # the true answer is nowhere in the prompt
        prompt, meta = b.multihop_context()
        inst, ctx = meta["sources"]["instruction"], meta["sources"]["context"]
        assert inst != ctx and "Instruction: Assume that" in prompt and ctx in prompt and inst in prompt
    # the chain, checked by hand: Quill Works -> (assumed founder) -> their birthplace
    for _ in range(50):
        prompt, meta = b.multihop_context()
        if meta["fact"][0] == "Quill Works" and meta["chain"] == ["founded_by", "born_in"]:
            assumed = {"Tam Vesk": "Fernvale", "Oren Pike": "Coldholt"}
            name = next(p for p in assumed if f"founded by {p}" in prompt.split("\n\n")[0])
            assert meta["sources"] == {"instruction": assumed[name], "context": "Ambermere"}
            assert follow(meta["sources"]) == assumed[name]
            break
    else:
        pytest.fail("no founder chain drawn")


def test_every_generated_example_follows_the_hierarchy_and_its_prompt():
    for ex in task().examples("test"):
        sources = ex.meta["sources"]
        assert ex.reference == follow(sources)
        has_inst, has_ctx = ex.prompt.startswith("Instruction:"), "Context:\n[1]" in ex.prompt
        assert has_inst == ("instruction" in sources)
        assert has_ctx == ("context" in sources or "noise" in sources)
        if ex.meta["group"] in ("context_conflict", "instruction_conflict") and "parametric" in sources:
            assert len({sources[k] for k in ("context", "parametric")}) == 2
        if "chain" not in ex.meta and has_inst:  # one hop: the assumption states the gold object
            assert mentions(ex.prompt.split("\n\n")[0], ex.reference)
        if ex.meta["group"] == "context_noisy":
            assert ex.prompt.count("\n[") == 4 and ex.reference not in sources["noise"]


def test_conditions_are_balanced_in_test_and_mixed_in_train():
    t = task()
    test_groups = [e.meta["group"] for e in t.examples("test")]
    assert set(test_groups[:len(GROUPS)]) == set(GROUPS)  # any prefix is balanced
    assert all(test_groups.count(g) == 6 for g in GROUPS)
    order = schedule(100, MIX)
    assert {g: order.count(g) for g in GROUPS} == {g: round(100 * MIX[g]) for g in GROUPS}
    with pytest.raises(KnowledgeError, match="unknown condition"):
        KnowledgeTask(mix={"vibes": 1.0})


# ----------------------------------------------------------------------------- splits

def test_splits_are_disjoint_in_entities_and_facts():
    w = worlds(0)
    for kind in kd.SIZES:
        sets = [set(w[s].entities[kind]) for s in ("train", "validation", "test")]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2]), kind
    real = real_splits(0, kd.REAL_FACTS)
    keys = {s: {(r, subj) for r, subj, _ in real[s]} for s in real}
    assert not (keys["train"] & keys["test"] or keys["train"] & keys["validation"] or keys["validation"] & keys["test"])
    assert sum(len(v) for v in real.values()) == len(kd.REAL_FACTS)
    t = task()
    train_text = " ".join(e.prompt for e in t.examples("train"))
    for ex in t.examples("test"):
        subject = ex.meta["fact"][0]
        if subject in w["test"].facts or any(subject in v for v in w["test"].entities.values()):
            assert subject not in train_text


def test_generation_is_deterministic_and_draw_changes_only_the_questions():
    a, b = task(), task()
    assert [(e.prompt, e.reference, e.meta) for e in a.examples("train")] == \
           [(e.prompt, e.reference, e.meta) for e in b.examples("train")]
    c = task(draw=1)
    assert [e.prompt for e in c.examples("train")] != [e.prompt for e in a.examples("train")]
    test_names = {n for names in worlds(0)["test"].entities.values() for n in names}
    assert not any(n in e.prompt for e in c.examples("train") for n in test_names)
    assert [e.prompt for e in KnowledgeTask(seed=1, real_facts=REAL, n_test=16).examples("test")] != \
           [e.prompt for e in task().examples("test")[:16]]


def test_name_pool_has_no_shared_words():
    names = kd.name_pool(0, "person", 120)
    words = [w.lower() for n in names for w in n.split()]
    assert len(names) == 120 and len(words) == len(set(words))


# ----------------------------------------------------------------------------- scorer

def example(sources: dict, group="instruction_conflict") -> Example:
    return Example("x", "q", follow(sources), {"group": group, "sources": sources})


@pytest.mark.parametrize("output, correct, error", [
    ("Nice", True, None),
    ("The answer is nice.\nBecause the instruction says so.", True, None),        # first line, normalised
    ("Lyon", False, "followed context"),
    ("Paris, France", False, "followed parametric"),
    ("Nice or Lyon", False, "mixed: instruction + context"),                      # hedging is wrong
    ("Brest", False, "followed noise"),
    ("Marseille", False, "followed no source"),
    ("\n\n  Nice  ", True, None),
    ("Nicea", False, "followed no source"),                                       # whole words only
    ("", False, "followed no source"),
])
def test_scorer_names_the_source_followed(output, correct, error):
    ex = example({"instruction": "Nice", "context": "Lyon", "parametric": "Paris", "noise": ["Brest"]})
    v = KnowledgeTask().score(output, ex)
    assert (v.correct, v.error) == (correct, error)
    assert v.score == float(correct) and v.extracted == answer_line(output)


def test_scorer_accepts_aliases_and_accents():
    t = KnowledgeTask()
    ex = example({"context": "the United Kingdom", "parametric": "France"}, "context_conflict")
    assert t.score("UK", ex).correct and t.score("United Kingdom.", ex).correct
    assert t.score("The United Kingdom", ex).correct and not t.score("France", ex).correct
    ex = example({"parametric": "Washington, D.C."}, "parametric")
    assert t.score("Washington", ex).correct and t.score("Washington, D.C.", ex).correct
    ex = example({"context": "Bogotá"}, "context_support")
    assert t.score("Bogota", ex).correct
    # restating the subject names no source: Mexico City is not the country Mexico
    ex = Example("x", "q", "Japan", {"group": "context_conflict", "fact": ["Mexico City", "city_country", "Mexico"],
                                     "sources": {"context": "Japan", "parametric": "Mexico"}})
    assert t.score("Mexico City is a city in Japan.", ex).correct
    assert t.score("Mexico City is a city in Mexico.", ex).error == "followed parametric"


# ----------------------------------------------------------------------------- eval runner, per group

class GroupTask:
    name, metric, system_prompt = "grouped", "accuracy", None

    def examples(self, split):
        return [Example(f"{g}{i}", f"{g} {i}", "yes", {"group": g}) for g in ("a", "b") for i in range(4)]

    def score(self, prediction, example):
        from tunesmith.data.tasks.base import Verdict
        ok = prediction == "yes"
        return Verdict(ok, float(ok))


def test_evaluate_reports_accuracy_by_group(tokenizer, monkeypatch):
    import tunesmith.infer.generate as gen

    # group a: all right; group b: one of four right
    monkeypatch.setattr(gen, "generate", lambda m, t, prompts, **kw: [
        "yes" if p[-1]["content"].startswith("a") or p[-1]["content"] == "b 2" else "no" for p in prompts])
    result = evaluate(None, tokenizer, GroupTask())
    assert result.summary["by_group"] == {"a": {"examples": 4, "accuracy": 1.0}, "b": {"examples": 4, "accuracy": 0.25}}
    assert math.isclose(result.summary["accuracy"], 5 / 8)
    text = format_summary(result)
    assert "by group" in text and "100.0%  (4 examples)" in text and "25.0%  (4 examples)" in text


def test_evaluate_knowledge_with_a_tiny_model(tokenizer):
    t = KnowledgeTask(real_facts=REAL, n_test=16)
    result = evaluate(make_tiny_model(tokenizer), tokenizer, t, limit=8, max_new_tokens=3, batch_size=8,
                      progress=False)
    assert list(result.summary["by_group"]) == list(GROUPS)
    assert all(g["examples"] == 1 for g in result.summary["by_group"].values())
    assert result.summary["accuracy"] == sum(r["correct"] for r in result.records) / 8
    assert all(r["error"] is None or r["error"].startswith(("followed", "mixed")) for r in result.records)
    assert "by_group" not in evaluate(make_tiny_model(tokenizer), tokenizer, GroupTaskless(), max_new_tokens=2,
                                      progress=False).summary


class GroupTaskless(GroupTask):
    def examples(self, split):
        return [Example("0", "hi", "yes")]


# ----------------------------------------------------------------------------- synth knowledge

def test_synth_knowledge_writes_training_data_and_stats(tmp_path, capsys, tokenizer):
    from tunesmith.cli import main
    from tunesmith.config import DataConfig
    from tunesmith.data import load_data

    out = tmp_path / "hp"
    assert main(["synth", "knowledge", "--out", str(out), "--n", "40", "--seed", "2"]) == 0
    assert "40 records" in capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    for key in ("method", "generated", "kept", "dropped", "generation_s", "samples_per_s", "train_s"):
        assert key in stats
    assert stats["generated"] == stats["kept"] == 40 and stats["model_sampling"] is False
    assert stats["by_group"] == {g: schedule(40, MIX).count(g) for g in GROUPS if schedule(40, MIX).count(g)}
    records = [json.loads(line) for line in (out / "train.jsonl").open()]
    raw = [json.loads(line) for line in (out / "raw.jsonl").open()]
    assert len(records) == len(raw) == 40
    for rec, row in zip(records, raw):
        assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
        assert rec["messages"][2]["content"] == row["target"] == follow(row["sources"])
    data = load_data(DataConfig(train=str(out / "train.jsonl"), max_length=512, val_fraction=0), tokenizer, report=False)
    assert len(data.train) == 40
    assert main(["synth", "knowledge", "--out", str(out), "--n", "0"]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err


def test_builtin_registration():
    t = get_task("knowledge", n_test=16)  # the model-checked parametric facts: every condition can be built
    assert t.name == "knowledge" and t.metric == "accuracy" and "instruction" in t.system_prompt
    assert [e.meta["group"] for e in t.examples("test")[:8]] == list(GROUPS)
    known = set(kd.parametric_facts())
    parametric = [e.meta["fact"] for e in t.examples("test") if e.meta["group"] == "parametric"]
    assert parametric and all((r, s, o) in known for s, r, o in parametric)
    assert render("Q?", "Assume X.", ["A.", "B."]) == "Instruction: Assume X.\n\nContext:\n[1] A.\n[2] B.\n\nQuestion: Q?"
