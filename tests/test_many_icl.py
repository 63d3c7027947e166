"""Many-shot learning: evaluation at several shot counts (`eval --shots 0,1,4,max`) and the ManyICL
objective (every answer of a many-shot sequence trains; instruction and inputs are masked)."""
import json

import pytest

from tests.conftest import lively_model
from tunesmith.cli import main
from tunesmith.eval.runner import EvalError, evaluate, get_eval_task
from tunesmith.eval.shots import (evaluate_shots, format_shot_table, load_shots, max_shots, parse_shots,
                                  plot_shot_curves, prompt_tokens, save_shots)


# ----------------------------------------------------------------------------- evaluation by shot count

def test_parse_shots_reads_counts_and_max():
    assert parse_shots("0,1,4,16,64,max") == [0, 1, 4, 16, 64, "max"]
    assert parse_shots(" 4 , MAX,4") == [4, "max"]  # repeats dropped, case and spaces ignored
    assert parse_shots(8) == [8]
    for bad in ("1,x", "-1", "1.5", "", "1,,2"):
        with pytest.raises(EvalError, match="--shots"):
            parse_shots(bad)


def test_max_shots_is_the_largest_count_that_fits(tokenizer):
    task = get_eval_task("sql")
    examples, pool = task.examples("test")[:5], task.examples("train")[:40]
    longest = [max(prompt_tokens(tokenizer, task, examples, pool, k)) for k in range(len(pool) + 1)]
    assert longest == sorted(longest) and longest[0] < longest[10]  # each demonstration adds tokens
    for k in (0, 3, 17):
        context = longest[k] + 32  # exactly k shots fit with 32 new tokens, k + 1 do not
        assert max_shots(tokenizer, task, examples, pool, context=context, max_new_tokens=32) == k
        if k:
            assert max_shots(tokenizer, task, examples, pool, context=context - 1, max_new_tokens=32) == k - 1
    assert max_shots(tokenizer, task, examples, pool, context=10**6, max_new_tokens=32) == len(pool)  # pool caps it
    with pytest.raises(EvalError, match="without any shots"):
        max_shots(tokenizer, task, examples, pool, context=longest[0] + 31, max_new_tokens=32)


def test_each_point_of_the_curve_equals_a_single_evaluation(tokenizer, tmp_path):
    model, task = lively_model(tokenizer), get_eval_task("sql")
    context = max(prompt_tokens(tokenizer, task, task.examples("test")[:3], task.examples("train"), 3)) + 6
    curve = evaluate_shots(model, tokenizer, task, "2,max,0", limit=3, max_new_tokens=6, context=context,
                           progress=False)
    assert curve.max_shots == 3 and [r.summary["shots"] for r in curve.results] == [0, 2, 3]
    predictions = {}
    for result in curve.results:
        k = result.summary["shots"]
        single = evaluate(model, tokenizer, task, limit=3, shots=k, max_new_tokens=6, progress=False)
        assert [r["prediction"] for r in result.records] == [r["prediction"] for r in single.records]
        predictions[k] = [r["prediction"] for r in result.records]
    assert predictions[0] != predictions[3]  # the demonstrations reach the model
    tokens = [r.summary["prompt_tokens"] for r in curve.results]
    assert tokens == sorted(tokens) and tokens[0] < tokens[1] < tokens[2]
    table = format_shot_table(curve)
    assert "| max=3 | 3 |" in table and table.count("\n") == 4
    saved = load_shots(save_shots(curve, tmp_path / "c.json"))
    assert saved.points() == curve.points() and saved.max_shots == 3
    assert plot_shot_curves({"a": curve, "b": saved}, tmp_path / "c.png") and (tmp_path / "c.png").stat().st_size > 0


def test_shared_prefix_generation_equals_plain_generation(tokenizer):
    from tunesmith.eval.prefix import generate_greedy, shared_prefix
    from tunesmith.eval.runner import build_prompt
    from tunesmith.infer.generate import generate

    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 3, 4]]) == 3
    assert shared_prefix([[1, 2], [1, 2, 3]]) == 1  # each row keeps a token to feed after the cache
    model, task = lively_model(tokenizer, seed=3), get_eval_task("sql")
    prompts = [build_prompt(task, ex, task.examples("train")[:2]) for ex in task.examples("test")[:5]]
    plain = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    assert generate_greedy(model, tokenizer, prompts, max_new_tokens=6, batch_size=2) == plain
    assert len(set(plain)) > 1


def test_shot_counts_beyond_the_data_or_the_context_are_refused(tokenizer, tmp_path):
    from tunesmith.eval.files import FileTask

    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "reference": f"a{i}"}) + "\n" for i in range(3)))
    model = lively_model(tokenizer)
    with pytest.raises(EvalError, match="5 shots need as many training examples; task t has 3"):
        evaluate(model, tokenizer, FileTask(path), shots=5, max_new_tokens=2)
    with pytest.raises(EvalError, match="exceed the context of 60"):
        evaluate_shots(model, tokenizer, FileTask(path), "0,3", context=60, max_new_tokens=40, progress=False)


def test_cli_eval_with_a_shot_list_writes_table_curve_and_records(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "sql-shots.json"
    code = main(["eval", "--task", "sql", "--model", str(tiny_model_dir), "--shots", "0,1,max", "--context", "600",
                 "--limit", "2", "--max-new-tokens", "4", "--output", str(out)])
    captured = capsys.readouterr().out
    assert code == 0, captured
    data = json.loads(out.read_text())
    shots = [r["shots"] for r in data["results"]]
    assert shots[:2] == [0, 1] and shots[-1] == data["max_shots"] > 1 and data["context"] == 600
    assert all(len(r["records"]) == 2 for r in data["results"])
    assert out.with_suffix(".png").stat().st_size > 0 and "| shots |" in out.with_suffix(".md").read_text()
    assert f"max = {data['max_shots']} shots" in captured
    # one plain count keeps the single-evaluation output
    single = tmp_path / "one.json"
    assert main(["eval", "--task", "sql", "--model", str(tiny_model_dir), "--shots", "1", "--limit", "2",
                 "--max-new-tokens", "4", "--output", str(single)]) == 0
    assert json.loads(single.read_text())["summary"]["shots"] == 1


def test_cli_eval_bad_shots_is_one_line(capsys, tiny_model_dir):
    for argv in (["--shots", "0,four"], ["--shots", "0,1000"], ["--shots", "0,max", "--context", "50"]):
        code = main(["eval", "--task", "sql", "--model", str(tiny_model_dir), "--limit", "2", *argv])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]  # the model's load progress
        assert code == 2 and len(lines) == 1 and lines[0].startswith("tunesmith: error:"), err


# ----------------------------------------------------------------------------- the ManyICL objective

import math  # noqa: E402
import random  # noqa: E402

import torch  # noqa: E402

from tests.conftest import trained_runs  # noqa: E402
from tunesmith.config import DataConfig  # noqa: E402
from tunesmith.data import collate  # noqa: E402
from tunesmith.data.render import Renderer  # noqa: E402
from tunesmith.data.tasks.base import Example  # noqa: E402
from tunesmith.eval.runner import build_prompt  # noqa: E402
from tunesmith.objectives import ObjectiveError  # noqa: E402
from tunesmith.objectives.many_icl import ManyICL, ManyICLConfig, build_sequences, demos_of, load_many_shot  # noqa: E402


def write_records(path, n, system="Answer with one word.", offset=0, domain=None):
    rng = random.Random(offset)
    rows = []
    for i in range(offset, offset + n):
        words = " ".join(rng.choice(["red", "blue", "tall", "green", "small"]) for _ in range(rng.randint(2, 9)))
        row = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": f"Q{i}: {words}?"},
                            {"role": "assistant", "content": f"answer {i} {words.split()[0]}"}]}
        rows.append({**row, "domain": domain} if domain else row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sequences_of(tokenizer, path, max_length=4096, shots=None, repeats=1, seed=0, **cfg):
    from tunesmith.data.load import read_splits

    config = DataConfig(train=str(path), max_length=max_length, **cfg)
    records, _, _ = read_splits(config, seed)
    renderer = Renderer(tokenizer, assistant_turns=config.assistant_turns)
    return build_sequences(demos_of(records, config), renderer, max_length=max_length, shots=shots,
                           repeats=repeats, seed=seed)


def hand_loss(model, tokenizer, system, demos, only_last=False):
    """-Σ_i Σ_t log p(y_i,t | instr, x_1, y_1, ..., x_i, y_i,<t), each answer scored in its own forward pass
    over the prompt `eval --shots i-1` builds (the answer's <|im_end|> terminator counted, as SFT trains it)."""
    task = type("T", (), {"system_prompt": system})()
    examples = [Example(str(i), d.user, d.answer) for i, d in enumerate(demos)]
    total, n = 0.0, 0
    for i in range(len(examples) - 1 if only_last else 0, len(examples)):
        prompt = tokenizer.apply_chat_template(build_prompt(task, examples[i], examples[:i]), add_generation_prompt=True,
                                               tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(prompt + examples[i].reference + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert ids[:len(prompt_ids)] == prompt_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        total -= sum(float(logp[t - 1, ids[t]]) for t in range(len(prompt_ids), len(ids)))
        n += len(ids) - len(prompt_ids)
    return total, n


@pytest.mark.parametrize("turns", ["all", "last"])
def test_loss_is_the_sum_over_every_answer_computed_by_hand(tokenizer, tmp_path, turns):
    model = lively_model(tokenizer)
    path = write_records(tmp_path / "d.jsonl", 9)
    samples, sequences, _ = sequences_of(tokenizer, path, shots=4, assistant_turns=turns)
    assert [len(s) for s in sequences] == [4, 4, 1]
    batch = collate(samples[:2], packing=True, pad_id=tokenizer.pad_token_id)  # two sequences packed in one row
    with torch.no_grad():
        loss_sum, units, _ = ManyICL(chunk=7)(model, batch)
    expected = [hand_loss(model, tokenizer, "Answer with one word.", seq, only_last=turns == "last")
                for seq in sequences[:2]]
    assert units == sum(n for _, n in expected)
    assert math.isclose(float(loss_sum), sum(t for t, _ in expected), rel_tol=2e-5)
    if turns == "all":  # k supervised examples per sequence: more than the last answer alone
        last = sum(hand_loss(model, tokenizer, "Answer with one word.", seq, only_last=True)[0] for seq in sequences[:2])
        assert float(loss_sum) > last * 1.5


def test_every_answer_trains_and_the_instruction_and_inputs_are_masked(tokenizer, tmp_path):
    path = write_records(tmp_path / "d.jsonl", 12)
    samples, sequences, _ = sequences_of(tokenizer, path, shots=5)
    for sample, seq in zip(samples, sequences):
        assert trained_runs(sample, tokenizer) == [d.answer + "<|im_end|>" for d in seq]
        text = tokenizer.decode(sample["input_ids"])
        assert text.count("Answer with one word.") == 1 and all(d.user in text for d in seq)


def test_sequences_fill_max_length_and_each_example_appears_once_per_pass(tokenizer, tmp_path):
    path = write_records(tmp_path / "d.jsonl", 40)
    renderer = Renderer(tokenizer)
    samples, sequences, too_long = sequences_of(tokenizer, path, max_length=300, repeats=2)
    assert not too_long and all(len(s["input_ids"]) <= 300 for s in samples)
    seen = [d.where for seq in sequences for d in seq]
    assert sorted(seen) == sorted([f"{path}:{i}" for i in range(1, 41)] * 2)
    first_pass = sequences[:next(i for i in range(len(sequences)) if sum(map(len, sequences[:i + 1])) == 40) + 1]
    second_pass = sequences[len(first_pass):]
    assert [d.where for s in first_pass for d in s] != [d.where for s in second_pass for d in s]  # reshuffled
    # greedy: one more demonstration (the next of the pass) would not fit
    for pass_ in (first_pass, second_pass):
        order = [d for s in pass_ for d in s]
        at = 0
        for seq in pass_[:-1]:
            at += len(seq)
            from tunesmith.objectives.many_icl import sequence_messages
            longer = renderer.chat(sequence_messages("Answer with one word.", seq + [order[at]]))
            assert len(longer["input_ids"]) > 300
    assert max(len(s) for s in sequences) > 3
    # deterministic from the seed, different for another seed; `shots` caps a sequence
    again = sequences_of(tokenizer, path, max_length=300, repeats=2)[1]
    assert [[d.where for d in s] for s in again] == [[d.where for d in s] for s in sequences]
    other = sequences_of(tokenizer, path, max_length=300, repeats=2, seed=1)[1]
    assert [[d.where for d in s] for s in other] != [[d.where for d in s] for s in sequences]
    capped = sequences_of(tokenizer, path, max_length=300, shots=2)[1]
    assert max(len(s) for s in capped) == 2 and sum(map(len, capped)) == 40


def test_records_of_other_instructions_or_domains_never_share_a_sequence(tokenizer, tmp_path):
    a = write_records(tmp_path / "a.jsonl", 7, system="Answer with one word.")
    b = write_records(tmp_path / "b.jsonl", 7, system="Answer in French.", offset=100)
    mixed = tmp_path / "ab.jsonl"
    mixed.write_text(a.read_text() + b.read_text())
    _, sequences, _ = sequences_of(tokenizer, mixed, shots=4)
    for seq in sequences:
        assert len({d.user.startswith("Q1") and int(d.user[1:].split(":")[0]) >= 100 for d in seq}) == 1
    assert sum(map(len, sequences)) == 14
    splits = load_many_shot(DataConfig(train=f"{a}+{b}", max_length=4096), ManyICLConfig(shots=3), tokenizer,
                            report=False)
    assert splits.domains and {s["domain"] for s in splits.train} == {0, 1}
    assert splits.stats["train"]["sequences"] == len(splits.train) == 6


def test_records_that_are_not_one_question_and_answer_are_refused(tokenizer, tmp_path):
    path = tmp_path / "multi.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    multi = {"messages": good["messages"] * 2}
    path.write_text(json.dumps(good) + "\n" + json.dumps(multi) + "\n")
    with pytest.raises(ObjectiveError, match=rf"{path}:2: many_icl needs one user question"):
        load_many_shot(DataConfig(train=str(path)), ManyICLConfig(), tokenizer, report=False)
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ObjectiveError, match="text data"):
        load_many_shot(DataConfig(train=str(text)), ManyICLConfig(), tokenizer, report=False)
    with pytest.raises(ObjectiveError, match="train_on_prompt"):
        load_many_shot(DataConfig(train=str(path), train_on_prompt=True), ManyICLConfig(), tokenizer, report=False)


def test_train_many_icl_end_to_end(tmp_path, tiny_model_dir, capsys):
    from tunesmith.train.metrics import read_metrics

    data = write_records(tmp_path / "d.jsonl", 30)
    code = main(["train", "recipes/lora-sft.yaml", f"model.name={tiny_model_dir}", f"data.train={data}",
                 f"output_dir={tmp_path / 'runs'}", "name=micl", "objective.name=many_icl",
                 "objective.many_icl.repeats=2", "data.val_fraction=0.2", "train.steps=3", "train.batch_tokens=1024",
                 "data.max_length=512", "train.precision=fp32", "train.threads=1", "train.warmup=0", "train.lr=1e-3"])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    assert "many_icl train: 24 examples ->" in out.out
    rows = [r for r in read_metrics(tmp_path / "runs" / "micl" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) and 0 < r["loss"] < 12 for r in rows)
    bad = main(["train", "recipes/lora-sft.yaml", f"model.name={tiny_model_dir}", f"data.train={data}",
                "objective.name=many_icl", "objective.many_icl.shots=0"])
    err = capsys.readouterr().err
    assert bad == 2 and "objective.many_icl.shots" in err and "Traceback" not in err, err
