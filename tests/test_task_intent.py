"""The built-in `intent` task: determinism per seed, splits disjoint in phrasings and slot values,
class-balanced prefixes, and the label scorer on hand-built answers."""
from collections import Counter

import pytest

from tunesmith.data.tasks import BUILTIN, get_task, task_records
from tunesmith.data.tasks.base import SPLITS, Example
from tunesmith.data.tasks.intent import FAMILIES, LABELS, IntentTask, extract_label


@pytest.fixture(scope="module")
def task():
    return IntentTask(seed=0)


def as_tuples(examples):
    return [(e.id, e.prompt, e.reference, e.meta["template"]) for e in examples]


def test_registered_and_described(task):
    assert BUILTIN["intent"] is IntentTask
    assert get_task("intent").metric == "accuracy"
    assert task.labels == LABELS and len(LABELS) == 8
    assert all(label in task.system_prompt for label in LABELS)
    record = task_records(task, "train")[0]["messages"]
    assert [m["role"] for m in record] == ["system", "user", "assistant"]
    assert record[2]["content"] in LABELS


def test_deterministic_per_seed(task):
    again, other = IntentTask(seed=0), IntentTask(seed=1)
    for split in SPLITS:
        assert as_tuples(again.examples(split)) == as_tuples(task.examples(split))
    assert as_tuples(other.examples("test")) != as_tuples(task.examples("test"))


def test_sizes_and_balanced_prefixes(task):
    sizes = {s: len(task.examples(s)) for s in SPLITS}
    assert sizes == {"train": 1000, "validation": 80, "test": 160}
    for split in SPLITS:
        ex = task.examples(split)
        assert len({e.id for e in ex}) == len(ex) and len({e.prompt for e in ex}) == len(ex)
        for k in (8, 16, 48):  # any prefix that is a multiple of the label count is balanced
            assert Counter(e.reference for e in ex[:k]) == {label: k // 8 for label in LABELS}, (split, k)
    assert [e.reference for e in task.examples("train")[:8]] == list(LABELS)


def test_no_template_or_value_leak_across_splits(task):
    ex = {s: task.examples(s) for s in SPLITS}
    templates = {s: {e.meta["template"] for e in ex[s]} for s in SPLITS}
    assert not templates["train"] & templates["validation"]
    assert not templates["train"] & templates["test"]
    assert not templates["validation"] & templates["test"]
    assert {t.split(".")[0] for t in templates["test"]} == {f.name for f in FAMILIES}  # one per intent
    assert len(templates["test"]) == len(templates["validation"]) == 8 and len(templates["train"]) == 40
    values = {s: {v for e in ex[s] for v in e.meta["values"]} for s in SPLITS}
    assert values["validation"] and values["test"]
    assert not values["train"] & values["test"] and not values["train"] & values["validation"]
    assert not values["validation"] & values["test"]
    # No test utterance appears in the training set, even with different slot values.
    train_text = {e.prompt for e in ex["train"]}
    assert not train_text & {e.prompt for e in ex["test"]}


@pytest.mark.parametrize("answer, label", [
    ("weather", "weather"),
    ("Alarm.", "alarm"),
    ("  MUSIC\n", "music"),
    ("The intent is: timer", "timer"),
    ("It is an alarm, not a timer", "alarm"),          # earliest label word wins
    ("timer (not alarm)", "timer"),
    ("shopping list", "shopping"),
    ("Add to the shopping list", "shopping"),
    ("translation", "translate"),
    ("phone call", "call"),                             # synonym 'phone' comes first, also call
    ("remind", "reminder"),
    ("reminders", None),                                # whole words only
    ("recall", None),
    ("musical", None),
    ("I cannot tell", None),
    ("", None),
])
def test_extract_label(answer, label):
    assert extract_label(answer) == label


def test_score(task):
    ex = Example("x", "Request: Wake me at 7:00 am", "alarm", {})
    v = task.score("Alarm", ex)
    assert v.correct and v.score == 1.0 and v.extracted == "alarm" and v.error is None
    v = task.score("timer, or maybe alarm", ex)
    assert not v.correct and v.score == 0.0 and v.extracted == "timer" and "wrong label" in v.error
    v = task.score("Sure! I can help with that.", ex)
    assert not v.correct and v.extracted is None and v.error == "no label in the answer"
    for e in task.examples("test")[:16]:  # the gold answer scores correct
        assert task.score(e.reference, e).correct
