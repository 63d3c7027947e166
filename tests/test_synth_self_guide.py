"""SELF-GUIDE pipeline: TASK.yaml errors (file:line:field), prompt shapes, output judging and class
balancing on hand-built samples, and end-to-end runs on a tiny random model (provenance, stats
that add up, resume without regenerating, kill-and-resume equality)."""
import json
import shutil

import pytest
import yaml

from tunesmith.synth.self_guide import input_prompt, judge_outputs, output_prompt, round_jobs, select, self_guide, train_records
from tunesmith.synth.task_spec import SelfGuideError, TaskSpec, check_prompt_shape, load_task, template_pattern

JSON_TASK = {
    "instruction": "Extract the order as JSON with keys city, day, item, name, quantity.",
    "template": "{instruction}\nText: {input}",
    "system_prompt": "Answer with one JSON object.",
    "eval_task": "json",
    "demonstrations": [
        {"input": "Ben ordered 3 units of desk lamp, to be delivered to Oslo on Monday.",
         "output": '{"city": "Oslo", "day": "Monday", "item": "desk lamp", "name": "Ben", "quantity": 3}'},
        {"input": "Ship 2 x stapler to Anna, Rome, on Friday.",
         "output": '{"city": "Rome", "day": "Friday", "item": "stapler", "name": "Anna", "quantity": 2}'},
    ],
}
LABELS = ["positive", "negative"]
SENTIMENT = {
    "instruction": "Is the review positive or negative?", "type": "classification", "labels": LABELS,
    "demonstrations": [{"input": "Loved it.", "output": "positive"}, {"input": "Awful.", "output": "negative"}],
}


def write_task(tmp_path, data, name="task.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---- TASK.yaml


def test_load_task_defaults_are_the_papers(tmp_path):
    spec = load_task(write_task(tmp_path, JSON_TASK))
    s = spec.synth
    assert (s.rounds, s.inputs_per_round, s.input_temperature, s.input_top_k) == (40, 10, 0.7, 40)
    assert (s.samples, s.output_temperature, s.output_top_k, s.consistency, s.sigmas) == (10, 0.2, 10, 0.2, 2.0)
    assert load_task(write_task(tmp_path, JSON_TASK), ["synth.rounds=3"]).synth.rounds == 3


@pytest.mark.parametrize("edit,key,says", [
    (lambda d: d["synth"].update(roundz=3), "roundz", "unknown key `synth.roundz`; did you mean `rounds`?"),
    (lambda d: d["synth"].update(consistency=1.5), "consistency", "synth.consistency: must be in [0, 1]"),
    (lambda d: d.update(type="regression"), "type", "type: 'regression' is not allowed"),
    (lambda d: d["demonstrations"][1].update(output="meh"), "demonstrations",
     "demonstrations: demonstration 1: output 'meh' is not one of the labels"),
    (lambda d: d.update(template="Review:"), "template", "template: must contain `{input}`"),
])
def test_task_errors_name_file_line_and_field(tmp_path, edit, key, says):
    data = {**SENTIMENT, "synth": {"rounds": 2}}
    data["demonstrations"] = [dict(d) for d in data["demonstrations"]]
    edit(data)
    path = write_task(tmp_path, data)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.strip().startswith(f"{key}:"))
    with pytest.raises(SelfGuideError) as e:
        load_task(path)
    assert str(e.value).startswith(f"{path}:{line}: ") and says in str(e.value)


def test_task_error_from_an_override_names_the_file_only(tmp_path):
    path = write_task(tmp_path, SENTIMENT)
    with pytest.raises(SelfGuideError, match=rf"^{path}: synth.samples: must be > 0"):
        load_task(path, ["synth.samples=0"])


def test_template_must_reproduce_the_eval_tasks_prompts(tmp_path):
    load_task(write_task(tmp_path, JSON_TASK))  # the json task's own shape
    wrong = {**JSON_TASK, "template": "{instruction}\nOrder: {input}"}
    path = write_task(tmp_path, wrong)
    with pytest.raises(SelfGuideError, match=r"task.yaml:2: template: does not produce task json's prompts"):
        load_task(path)
    with pytest.raises(SelfGuideError, match=r"system_prompt: must be task json's own"):
        load_task(write_task(tmp_path, {**JSON_TASK, "system_prompt": "Be brief."}))
    with pytest.raises(SelfGuideError, match=r"eval_task: unknown task `nope`"):
        load_task(write_task(tmp_path, {**JSON_TASK, "eval_task": "nope"}))


def test_shipped_examples_load_and_match_their_tasks():
    for name in ("json", "intent"):
        spec = load_task(f"examples/synth/{name}.yaml")
        check_prompt_shape(spec)


# ---- prompts


def test_training_chats_have_the_evaluation_shape():
    from tunesmith.data.tasks import get_task
    from tunesmith.eval.runner import build_prompt

    spec = TaskSpec.build(JSON_TASK)
    task = get_task("json")
    ex = task.examples("test")[0]
    text = template_pattern(spec).fullmatch(ex.prompt).group(1)
    assert spec.chat(text) == build_prompt(task, ex, [])  # what the evaluation shows the model
    rec = train_records(spec, [{"id": "x", "input": text, "vote": {"answer": ex.reference}}])[0]
    assert rec["messages"][:-1] == build_prompt(task, ex, []) and rec["messages"][-1]["content"] == ex.reference
    # the output prompt: the same chat with the demonstrations as earlier turns
    out = output_prompt(spec, text)
    assert out[0] == {"role": "system", "content": spec.system_prompt} and out[-1] == spec.chat(text)[-1]
    assert [m["role"] for m in out[1:-1]] == ["user", "assistant"] * 2


def test_input_prompt_shows_gold_earlier_and_target_label():
    spec = TaskSpec.build(SENTIMENT)
    p = input_prompt(spec, ["Loved it.", "Awful."], ["Meh film."], "negative")
    assert p.startswith(spec.instruction + "\n")
    assert p.index('- "Loved it."') < p.index('- "Awful."') < p.index("written earlier") < p.index('- "Meh film."')
    assert p.endswith('whose correct output is "negative":\n- "')
    plain = input_prompt(spec, ["Loved it."], [], None)
    assert "earlier" not in plain and plain.endswith('different from all of the above:\n- "')


def test_round_jobs_are_reproducible_and_draw_low_quality_inputs():
    spec = TaskSpec.build({**SENTIMENT, "synth": {"inputs_per_round": 6, "low_quality": 2}})
    a = round_jobs(spec, 1, ["one", "two", "three"])
    assert [j.prompt for j in a] == [j.prompt for j in round_jobs(spec, 1, ["one", "two", "three"])]
    assert len({j.id for j in a}) == 6 and all(j.prompt.endswith('- "') for j in a)
    assert {j.meta["target_label"] for j in a} <= set(LABELS)
    for j in a:  # 1..2 earlier inputs shown, the target label asked for
        assert 1 <= sum(f'- "{t}"' in j.prompt for t in ("one", "two", "three")) <= 2
        assert f'output is "{j.meta["target_label"]}"' in j.prompt
    assert not any("earlier" in j.prompt for j in round_jobs(spec, 0, []))


# ---- judging outputs, balancing


def _inputs(n):
    return [{"id": f"i{k}", "text": f"review {k}", "target_label": LABELS[k % 2], "kept": True} for k in range(n)]


def _samples(texts):
    return [{"sample": i, "text": t} for i, t in enumerate(texts)]


def test_classification_outputs_are_mapped_voted_and_balanced():
    spec = TaskSpec.build(SENTIMENT)
    samples = {
        "i0": _samples(["Positive.", "positive", "negative", "It is positive", "dunno"]),  # 3/4 positive
        "i1": _samples(["negative"] * 2 + ["hmm"] * 8),  # unmapped ones do not count: 2/2
        "i2": _samples(["input: positive"] * 5),  # noise: nothing survives
        "i3": _samples(["Negative!"]),
        "i4": _samples(["positive", "positive"]),
    }
    out = judge_outputs(spec, _inputs(5), samples)
    assert [r["vote"]["answer"] for r in out] == ["positive", "negative", None, "negative", "positive"]
    s0 = out[0]["samples"]
    assert [s["key"] for s in s0] == ["positive", "positive", "negative", "positive", None]
    assert s0[4]["dropped_by"] == "label" and out[2]["samples"][0]["dropped_by"] == "noise"
    assert out[0]["vote"]["share"] == 0.75 and out[2]["dropped_by"] == "consistency"
    chosen, dropped = select(spec, out)
    assert len(chosen) == 4 and dropped == []  # 2 positive, 2 negative
    out[3]["kept"] = False
    chosen, dropped = select(spec, out)
    assert sorted(r["vote"]["answer"] for r in chosen) == ["negative", "positive"] and len(dropped) == 1


def test_generation_outputs_vote_on_normalised_text_with_length_filter():
    spec = TaskSpec.build({**JSON_TASK, "eval_task": None, "synth": {"sigmas": 10}})  # 2σ of two demos: ±1 char
    good = '{"city": "Oslo", "day": "Monday", "item": "lamp", "name": "Ben", "quantity": 3}'
    samples = {"i0": _samples([good, good.replace(", ", ",  "), "{}", '{"city": "Rome"}', good + " " * 3]),
               "i1": _samples(["x" * 300, "y" * 300])}
    out = judge_outputs(spec, _inputs(2), samples)
    assert out[0]["vote"]["answer"] == good and out[0]["vote"]["count"] == 3 and out[0]["vote"]["counted"] == 3
    assert [s["dropped_by"] for s in out[0]["samples"]] == [None, None, "length", "length", None]
    assert out[1]["dropped_by"] == "consistency" and out[1]["vote"]["counted"] == 0


# ---- end to end on a tiny random model


def _tiny_spec(folder, model_dir):
    data = {**JSON_TASK,
            "synth": {"rounds": 2, "inputs_per_round": 3, "input_temperature": 1.0, "input_length_filter": False,
                      "max_input_tokens": 12, "samples": 3, "output_temperature": 1.0, "output_top_k": 0,
                      "max_output_tokens": 8, "sigmas": 1000.0, "batch_size": 4},
            "train": {"overrides": ["train.steps=2", "train.precision=fp32", "train.batch_tokens=256",
                                    "data.max_length=128", "model.frozen_dtype=same"]},
            "eval": {"limit": 1, "max_new_tokens": 4, "batch_size": 1}}
    return load_task(write_task(folder, data))


@pytest.fixture(scope="module")
def guided(tmp_path_factory, tiny_model_dir):
    """One whole run on the tiny model (synthesis, 2 LoRA steps, 1 test example): (spec, folder, stats)."""
    folder = tmp_path_factory.mktemp("self-guide")
    spec = _tiny_spec(folder, tiny_model_dir)
    stats = self_guide(spec, folder / "sg", model_name=str(tiny_model_dir), progress=False)
    return spec, folder / "sg", stats


def test_end_to_end_files_provenance_and_counts(guided):
    spec, out, stats = guided
    for name in ("inputs.jsonl", "outputs.jsonl", "train.jsonl", "stats.json", "eval.json", "raw/outputs.jsonl",
                 "raw/inputs-r000.jsonl", "raw/inputs-r001.jsonl", "train/adapter", "tuned.json"):
        assert (out / name).exists(), name
    inputs = [json.loads(line) for line in (out / "inputs.jsonl").read_text().splitlines()]
    outputs = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(inputs) == 6 and {r["round"] for r in inputs} == {0, 1}
    for r in inputs:
        assert {v["filter"] for v in r["verdicts"]} == {"empty", "noise", "duplicate"}
        assert r["kept"] == all(v["passed"] for v in r["verdicts"])
    assert [r["id"] for r in outputs] == [r["id"] for r in inputs if r["kept"]]
    for r in outputs:
        assert len(r["samples"]) == 3 and all("verdicts" in s and "key" in s for s in r["samples"])
    assert stats["generated"] == 6
    assert stats["kept"] + sum(stats["dropped"].values()) == stats["generated"]
    assert 0 < stats["kept"] == len(train) == sum(r["kept"] for r in outputs)  # 3 samples: a share is >= 1/3
    assert stats["outputs"]["samples"] == 3 * len(outputs)
    assert stats["outputs"]["self_consistency_rate"] == stats["outputs"]["voted"] / len(outputs)
    assert stats["train_s"] > 0 and stats["train_steps"] == 2 and stats["eval"]["examples"] == 1
    assert json.loads((out / "stats.json").read_text()) == stats
    for rec in train:
        assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
        assert rec["messages"][1]["content"].startswith(spec.instruction + "\nText: ")


def test_a_second_run_redoes_nothing(guided, tiny_model_dir):
    spec, out, stats = guided
    before = {p: (out / p).read_bytes() for p in ("inputs.jsonl", "outputs.jsonl", "train.jsonl", "raw/outputs.jsonl")}
    again = self_guide(spec, out, model_name=str(tiny_model_dir), progress=False)
    assert again == stats and all((out / p).read_bytes() == b for p, b in before.items())


def test_kill_and_resume_equals_an_uninterrupted_run(guided, tiny_model_dir, tmp_path):
    spec, full, _ = guided
    spec = spec.model_copy(deep=True)
    spec.train.enabled = False
    cut = tmp_path / "cut"  # as if killed while answering: round files done, outputs half written
    shutil.copytree(full / "raw", cut / "raw")
    raw = (cut / "raw" / "outputs.jsonl").read_text().splitlines(keepends=True)
    (cut / "raw" / "outputs.jsonl").write_text("".join(raw[:len(raw) // 2]) + raw[len(raw) // 2][:7])
    self_guide(spec, cut, model_name=str(tiny_model_dir), progress=False)
    for name in ("inputs.jsonl", "outputs.jsonl", "train.jsonl"):
        assert (cut / name).read_text() == (full / name).read_text(), name
    assert (cut / "raw" / "outputs.jsonl").read_text().count('"done": true') == len(spec_outputs(full))


def spec_outputs(folder):
    return (folder / "outputs.jsonl").read_text().splitlines()
