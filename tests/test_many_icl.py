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
