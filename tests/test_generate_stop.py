"""Stop rules: stop strings and a task's `answer_end` end a reply where it says, the text up to there
is what generation without them gives (batched, greedy or sampled), rows that have ended stop growing
and a batch whose rows have all ended stops decoding; the built-in tasks' rules never change a
verdict; the eval runner keeps records in example order whatever the batching.

The tiny model's layer weights are scaled up (conftest.lively_model) so completions differ by prompt."""
import importlib
import json
import random

import pytest

from conftest import PROMPTS, lively_model
from tunesmith.data.tasks import get_task
from tunesmith.data.tasks._common import first_line_end
from tunesmith.data.tasks.extract import json_answer_end
from tunesmith.data.tasks.intent import label_answer_end
from tunesmith.data.tasks.sql import sql_answer_end
from tunesmith.data.tasks.base import Example, Verdict
from tunesmith.eval.runner import evaluate

gen = importlib.import_module("tunesmith.infer.generate")  # the module (not the function of the same name)
N = 24


@pytest.fixture(scope="module")
def model(tokenizer):
    return lively_model(tokenizer)


@pytest.fixture(scope="module")
def full(model, tokenizer):
    """Greedy completions without any stop rule, batched as the tests below batch them."""
    return gen.generate(model, tokenizer, PROMPTS, max_new_tokens=N, batch_size=4)


def mid_stop(texts: list[str]) -> str:
    """A two-character string that occurs inside several completions (not at their start)."""
    counts: dict[str, int] = {}
    for t in texts:
        for s in {t[i:i + 2] for i in range(2, len(t) - 1)}:
            counts[s] = counts.get(s, 0) + 1
    return max(counts, key=lambda s: (counts[s], s))


def cut_before(text: str, stops: list[str]) -> str:
    ends = [text.find(s) for s in stops if s in text]
    return text[:min(ends)] if ends else text


class CountForwards:
    """Counts the model's forward calls (one prefill + one per decoding step) and the rows each saw."""

    def __init__(self, model):
        self.calls, self.rows = 0, []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls += 1
        self.rows.append((kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[0])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("batch_size", [2, 8])
def test_stop_strings_cut_the_unstopped_text(model, tokenizer, full, batch_size):
    stop = [mid_stop(full), "\n"]
    out = gen.generate(model, tokenizer, PROMPTS, max_new_tokens=N, batch_size=batch_size, stop=stop)
    assert out == [cut_before(t, stop) for t in full]
    assert sum(o != t for o, t in zip(out, full)) >= 2, "the stop string should end several replies early"


def test_answer_end_cuts_where_it_says_and_sees_growing_text(model, tokenizer, full):
    seen: list[str] = []

    def answer_end(text):
        seen.append(text)
        return 5 if len(text) >= 9 else None

    out = gen.generate(model, tokenizer, PROMPTS, max_new_tokens=N, batch_size=4, answer_end=answer_end)
    assert out == [t[:5] if len(t) >= 9 else t for t in full]
    assert any(len(a) < len(b) and b.startswith(a) for a, b in zip(seen, seen[1:])), "checked as the text grows"


def test_sampled_text_is_the_same_up_to_the_stop(model, tokenizer):
    kw = dict(max_new_tokens=N, temperature=1.0, top_p=0.95, seed=3, batch_size=4)
    sampled = gen.generate(model, tokenizer, PROMPTS, **kw)
    stop = [mid_stop(sampled)]
    assert gen.generate(model, tokenizer, PROMPTS, stop=stop, **kw) == [cut_before(t, stop) for t in sampled]


def test_a_batch_stops_decoding_when_every_row_has_ended(model, tokenizer, full):
    with CountForwards(model) as long:
        gen.generate(model, tokenizer, PROMPTS[:4], max_new_tokens=N, batch_size=4)
    with CountForwards(model) as short:
        out = gen.generate(model, tokenizer, PROMPTS[:4], max_new_tokens=N, batch_size=4,
                           answer_end=lambda text: len(text) if len(text) >= 3 else None)
    assert all(len(o) >= 3 for o in out)
    assert short.calls < long.calls, (short.calls, long.calls)


def test_an_ended_row_stops_growing_while_the_others_run_on(model, tokenizer, full, monkeypatch):
    texts = full[:4]
    j, piece = next((j, t[2:4]) for j, t in enumerate(texts) if len(t) > 8 and sum(t[2:4] in u for u in texts) == 1)
    outs = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: outs.append(real(**kw)) or outs[-1])
    got = gen.generate(model, tokenizer, PROMPTS[:4], max_new_tokens=N, batch_size=4, stop=[piece])
    assert got == [cut_before(t, [piece]) for t in texts] and got[j] != texts[j]
    # in the batch's tokens the stopped row is padded from where it ended, while another row ran on
    width = max(len(gen._encode(tokenizer, p, None)) for p in PROMPTS[:4])
    new = outs[0][:, width:].tolist()
    pad = tokenizer.pad_token_id
    row = next(r for r in new if tokenizer.decode(r, skip_special_tokens=True).startswith(got[j] + piece))
    ended = next(k for k in range(len(row)) if piece in tokenizer.decode(row[:k + 1], skip_special_tokens=True))
    assert all(t == pad for t in row[ended + 1:]) and len(row) > ended + 1


def test_generate_file_takes_stop(model, tokenizer, full, tmp_path):
    src = tmp_path / "in.jsonl"
    recs = [{"prompt": p} if isinstance(p, str) else {"messages": p} for p in PROMPTS]
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    stop = [mid_stop(full)]
    gen.generate_file(model, tokenizer, src, tmp_path / "out.jsonl", max_new_tokens=N, batch_size=4, stop=stop)
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [g["completion"] for g in got] == [cut_before(t, stop) for t in full]


@pytest.mark.parametrize("bad", [[""], [3], "ok\x00".split("\x00")])
def test_bad_stop_strings_are_clear(model, tokenizer, bad):
    with pytest.raises(gen.InferError, match="stop strings"):
        gen.generate(model, tokenizer, ["hi"], max_new_tokens=2, stop=bad)


def test_stop_rule_searches_only_new_text_but_finds_a_string_across_the_boundary():
    rule = gen.StopRule(["END"])
    assert rule.cut("abcEN", 0) is None
    assert rule.cut("abcEND", 5) == 3
    assert rule.cut("END and later", 10) is None  # searched already: found at the step it appeared
    assert not gen.StopRule(None) and gen.StopRule(["x"]) and gen.StopRule(answer_end=len)


# ---------------------------------------------------------------- the built-in tasks' rules


def continuations(rng: random.Random) -> list[str]:
    """Text a model might write after its answer (more lines, another block, another object, labels)."""
    bits = ["\n", "\n\n", " ", "x", "```sql\nSELECT 1\n```", "```", "{\"a\": 1}", "}", "Question: ", "music",
            "ical", " list", ";", "'", "\r", "\u2028", "SELECT name FROM employees", "é", "\n```\n"]
    return ["".join(rng.choice(bits) for _ in range(rng.randint(0, 6))) for _ in range(25)]


def answers_for(ex: Example) -> list[str]:
    """Plausible answers: the reference bare, fenced, quoted, after a preamble, broken, or blank-led."""
    ref = ex.reference
    return [ref, f"```sql\n{ref};\n```", f"```\n{ref}\n```", f"\n\n{ref}", f"Sure:\n{ref}", ref[: len(ref) // 2],
            f"{{\"x\": {ref[:3]!r}}}", f"The answer: {ref} (I think)", f"  {ref}\nmore", "```json\n" + ref,
            ref.upper(), ""]


def same_verdict(a: Verdict, b: Verdict) -> bool:
    return (a.correct, a.score, a.error, a.extracted) == (b.correct, b.score, b.error, b.extracted)


@pytest.mark.parametrize("name", ["sql", "json", "intent", "knowledge", "translate-va"])
def test_a_task_rule_never_changes_a_verdict(name, tmp_path):
    """Wherever a task's rule ends an answer, that cut text scores as the answer with anything after it
    would: generation may stop there."""
    task = get_task(name, **({"workdir": tmp_path} if name == "sql" else {}))
    rng = random.Random(name)
    stopped = 0
    for ex in task.examples("test")[:6]:
        for answer in answers_for(ex):
            for tail in continuations(rng):
                text = answer + tail
                for k in range(len(answer), len(text) + 1):  # every point generation passes through
                    end = task.answer_end(text[:k])
                    if end is not None:
                        stopped += 1
                        assert same_verdict(task.score(text[:k][:end], ex), task.score(text, ex)), (text[:k], text)
                        break
    assert stopped > 20, "the rule should end many of these answers"


def test_rule_helpers_on_edge_cases():
    assert first_line_end("\n \nabc") is None and first_line_end("\n \nabc\nd") == 6
    assert sql_answer_end("```sql\nSELECT 1\n``` and") == len("```sql\nSELECT 1\n```")
    assert sql_answer_end("```python\nx\n```\nSELECT 1;\n\n") is None  # a later ```sql block would win
    assert json_answer_end('{"a": {"b": 1}') is None  # the outer object may still close
    assert json_answer_end('x {"a": 1} y') == len('x {"a": 1}')
    assert label_answer_end("music") is None and label_answer_end("music." + " " * 20) is not None


# ---------------------------------------------------------------- the eval runner


TEXT_PROMPTS = [i for i, p in enumerate(PROMPTS) if isinstance(p, str)]


class LineTask:
    """A task scored on the first line of the answer (its rule: first_line_end), on the test prompts
    that are plain user messages (a task's prompt is one)."""
    name, metric, system_prompt = "lines", "exact_match", None
    answer_end = staticmethod(first_line_end)

    def __init__(self, refs: list[str]):
        self.refs = refs

    def examples(self, split):
        return [Example(f"e{i}", PROMPTS[i], r) for i, r in zip(TEXT_PROMPTS, self.refs)]

    def score(self, prediction, example):
        line = next((ln.strip() for ln in prediction.splitlines() if ln.strip()), "")
        ok = line[:4] == example.reference[:4]
        return Verdict(ok, float(ok), None, line)


def test_eval_records_keep_order_and_verdicts_with_the_task_rule(model, tokenizer, full):
    task = LineTask([full[i] if k % 2 else full[i][::-1] for k, i in enumerate(TEXT_PROMPTS)])
    kw = dict(split="test", max_new_tokens=N)
    plain = evaluate(model, tokenizer, task, batch_size=2, task_stop=False, **kw)  # other batches, no rule
    fast = evaluate(model, tokenizer, task, batch_size=5, **kw)  # one batch, sorted, with the rule
    assert [r["id"] for r in fast.records] == [f"e{i}" for i in TEXT_PROMPTS]
    keys = ("id", "prompt", "reference", "correct", "score", "error", "extracted")
    assert [{k: r[k] for k in keys} for r in fast.records] == [{k: r[k] for k in keys} for r in plain.records]
    assert [r["prediction"] for r in fast.records] == [
        t if (c := first_line_end(t)) is None else t[:c] for t in (r["prediction"] for r in plain.records)]
    assert 0 < fast.summary["accuracy"] < 1


def test_eval_passes_stop_strings(model, tokenizer, full):
    texts = [full[i] for i in TEXT_PROMPTS]
    task = LineTask(texts)
    stop = [mid_stop(texts)]
    res = evaluate(model, tokenizer, task, split="test", max_new_tokens=N, batch_size=4, stop=stop, task_stop=False)
    assert [r["prediction"] for r in res.records] == [cut_before(t, stop) for t in texts]


def test_no_rule_means_no_stopping_criteria(model, tokenizer, monkeypatch):
    """Without a rule the model's generate gets exactly the arguments it got before (a FusedLM or any
    model with its own generate keeps working unchanged)."""
    seen = {}
    real = model.generate

    def spy(**kw):
        seen.update(kw)
        return real(**kw)

    monkeypatch.setattr(model, "generate", spy)
    gen.generate(model, tokenizer, ["hi"], max_new_tokens=2)
    assert "stopping_criteria" not in seen
    gen.generate(model, tokenizer, ["hi"], max_new_tokens=2, stop=["x"])
    assert "stopping_criteria" in seen
