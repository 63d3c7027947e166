"""The evaluation harness: metrics against their definitions, the runner on a tiny model, k-shot
prompts, task files and their errors."""
import json
import math

import pytest

from tests.conftest import make_tiny_model
from tunesmith.eval.files import FileTask, FileTaskError
from tunesmith.eval.metrics import bleu, chrf, exact_match, normalize_answer, pass_at_k
from tunesmith.eval.runner import EvalError, build_prompt, evaluate, format_summary, save_result
from tunesmith.data.tasks.base import Example, Verdict


def test_pass_at_k_matches_closed_form():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 1), (5, 5, 2), (200, 13, 10), (7, 6, 2)]:
        expected = 1.0 - (math.comb(n - c, k) / math.comb(n, k))
        assert math.isclose(pass_at_k(n, c, k), expected, rel_tol=1e-12, abs_tol=1e-12)
    assert pass_at_k(4, 3, 2) == 1.0  # n - c < k: every draw of k holds a pass
    assert math.isclose(pass_at_k(10, 3, 1), 0.3)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)


def test_bleu_chrf_equal_sacrebleu():
    import sacrebleu

    hyps = ["the cat sat on the mat", "a quick brown fox", "hello there world"]
    refs = ["the cat is on the mat", "the quick brown fox", "hello world"]
    assert bleu(hyps, refs) == sacrebleu.corpus_bleu(hyps, [refs]).score
    assert chrf(hyps, refs) == sacrebleu.corpus_chrf(hyps, [refs]).score
    assert 0 < bleu(hyps, refs) < 100


def test_exact_match_normalisation():
    assert normalize_answer("  The  Answer, is: 42! ") == "answer is 42"
    assert exact_match("The Eiffel Tower.", "eiffel tower")
    assert not exact_match("Eiffel Towers", "eiffel tower")


class EchoTask:
    """A task whose reference is the prompt's last word: easy to reason about in tests."""
    name, metric, system_prompt = "echo", "accuracy", "Answer in one word."

    def __init__(self, n=6):
        self._ex = [Example(str(i), f"Say the word w{i}", f"w{i}") for i in range(n)]

    def examples(self, split):
        return self._ex

    def score(self, prediction, example):
        ok = prediction.strip() == example.reference
        return Verdict(ok, float(ok), None if ok else "wrong word", prediction.strip())


def test_build_prompt_puts_k_shots_as_earlier_turns():
    task = EchoTask()
    shots = task.examples("train")[:2]
    msgs = build_prompt(task, task.examples("test")[3], shots)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[2]["content"] == "w0" and msgs[-1]["content"] == "Say the word w3"


def test_runner_scores_and_writes_records(tokenizer, tmp_path, monkeypatch):
    import tunesmith.infer.generate as gen

    # a scripted "model": the runner's bookkeeping is what is under test here
    answers = {"Say the word w0": "w0", "Say the word w1": "nope", "Say the word w2": "w2"}
    monkeypatch.setattr(gen, "generate", lambda m, t, prompts, **kw: [answers.get(p[-1]["content"], "") for p in prompts])
    result = evaluate(None, tokenizer, EchoTask(3), limit=3)
    assert result.summary["examples"] == 3
    assert math.isclose(result.summary["accuracy"], 2 / 3)
    assert [r["correct"] for r in result.records] == [True, False, True]
    assert result.records[1]["error"] == "wrong word"
    path = save_result(result, tmp_path / "out.json", model="m")
    payload = json.loads(path.read_text())
    assert payload["summary"]["accuracy"] == result.summary["accuracy"] and len(payload["records"]) == 3
    assert "accuracy" in format_summary(result) and "66.7%" in format_summary(result)


def test_runner_pass_at_k_from_samples(tokenizer, monkeypatch):
    import tunesmith.infer.generate as gen

    # example i is answered right in exactly i of 4 samples
    def fake(m, t, prompts, **kw):
        out = []
        for j, p in enumerate(prompts):
            i, s = int(p[-1]["content"][-1]), j % 4
            out.append(f"w{i}" if s < i else "x")
        return out

    monkeypatch.setattr(gen, "generate", fake)
    result = evaluate(None, tokenizer, EchoTask(4), samples=4, temperature=0.8, ks=(1, 2))
    expected = sum(pass_at_k(4, c, 2) for c in range(4)) / 4
    assert math.isclose(result.summary["pass@2"], expected)
    assert math.isclose(result.summary["pass@1"], sum(c / 4 for c in range(4)) / 4)
    with pytest.raises(EvalError, match="temperature"):
        evaluate(None, tokenizer, EchoTask(2), samples=3)


def test_runner_with_a_real_tiny_model(tokenizer):
    model = make_tiny_model(tokenizer)
    result = evaluate(model, tokenizer, EchoTask(4), max_new_tokens=4, batch_size=2)
    assert len(result.records) == 4 and all(isinstance(r["prediction"], str) for r in result.records)


def test_task_file_and_its_errors(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "reference": "4"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(FileTaskError, match=r"t\.jsonl:2: needs a string field `reference`"):
        FileTask(path)
    path.write_text("{bad\n")
    with pytest.raises(FileTaskError, match=r"t\.jsonl:1: not valid JSON"):
        FileTask(path)
    path.write_text(json.dumps({"prompt": "2+2?", "reference": "Four"}) + "\n")
    task = FileTask(path)
    assert task.score("four.", task.examples()[0]).correct
    with pytest.raises(FileTaskError, match="metric `rouge` is unknown"):
        FileTask(path, "rouge")
    with pytest.raises(FileTaskError, match="needs a string field `tests`"):
        FileTask(path, "python")


def test_task_file_chrf_plus_plus_scores_each_example_with_word_bigrams(tmp_path):
    import sacrebleu

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "p", "reference": "the old dog sleeps in the garden"}) + "\n")
    ex = FileTask(path, "chrf++").examples()[0]
    pred = "the dog old sleeps in garden the"
    pp, plain = FileTask(path, "chrf++").score(pred, ex), FileTask(path, "chrf").score(pred, ex)
    assert pp.score == sacrebleu.corpus_chrf([pred], [[ex.reference]], word_order=2).score / 100
    assert plain.score == sacrebleu.corpus_chrf([pred], [[ex.reference]]).score / 100 != pp.score


def test_perplexity_equals_hf_loss(tokenizer, tmp_path):
    import torch

    from tunesmith.objectives.sft import perplexity

    texts = ["The quick brown fox jumps over the lazy dog.", "Tuning small models on a CPU.", "SELECT 1"]
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    model = make_tiny_model(tokenizer)
    got = perplexity(model, tokenizer, str(path))
    total, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
            x = torch.tensor([ids])
            n = len(ids) - 1
            total += float(model(x, labels=x).loss) * n
            count += n
    assert got["tokens"] == count
    assert math.isclose(got["loss"], total / count, rel_tol=1e-5)
    assert math.isclose(got["perplexity"], math.exp(total / count), rel_tol=1e-5)
