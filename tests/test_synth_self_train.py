"""LiST-style self-training (synth/self_train.py) and the record-level `weight` it trains with:
weight 2 = the record twice in the loss, weight 0 = nothing, bad weights named by file:line; label
scores against a hand computation, confidences a distribution over the labels, the weighting on
hand-built cases, and a 2-round run through the CLI that writes its files and leaves the base alone."""
import hashlib
import json

import pytest
import torch

from conftest import lively_model
from tunesmith.cli import main
from tunesmith.config import DataConfig
from tunesmith.data import DataError, collate, load_data
from tunesmith.data.render import Renderer
from tunesmith.data.tasks.intent import IntentTask
from tunesmith.objectives.sft import causal_lm_loss
from tunesmith.synth.self_train import chat, confidences, label_logprobs, pseudo_weights

A = {"messages": [{"role": "user", "content": "Play jazz"}, {"role": "assistant", "content": "music"}]}
B = {"messages": [{"role": "user", "content": "Call Anna"}, {"role": "assistant", "content": "call please"}]}


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def samples(tokenizer, path):
    cfg = DataConfig(train=path, shuffle=False, packing=False)
    return load_data(cfg, tokenizer, report=False)


def loss_and_grads(model, tokenizer, items):
    model.zero_grad()
    batch = collate(items, packing=False, pad_id=tokenizer.pad_token_id)
    loss_sum, n, _ = causal_lm_loss(model, batch)
    loss_sum.backward()
    return loss_sum.item(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- record weight


def test_weight_two_is_the_record_twice(tokenizer, tmp_path):
    model = lively_model(tokenizer).train()
    weighted = samples(tokenizer, write(tmp_path / "w.jsonl", [{**A, "weight": 2}, B])).train
    twice = samples(tokenizer, write(tmp_path / "t.jsonl", [A, A, B])).train
    plain = samples(tokenizer, write(tmp_path / "p.jsonl", [A])).train[0]
    assert weighted[0]["input_ids"] == plain["input_ids"]
    assert weighted[0]["weights"] == [2 * w for w in plain["weights"]] and max(weighted[0]["weights"]) == 2.0
    loss_w, _, grads_w = loss_and_grads(model, tokenizer, weighted)
    loss_t, _, grads_t = loss_and_grads(model, tokenizer, twice)
    assert loss_w == pytest.approx(loss_t, rel=1e-5)
    for k in grads_t:
        torch.testing.assert_close(grads_w[k], grads_t[k], atol=1e-4, rtol=1e-3)  # summation order


def test_weight_zero_contributes_nothing(tokenizer, tmp_path):
    splits = samples(tokenizer, write(tmp_path / "z.jsonl", [{**A, "weight": 0}, {**B, "weight": 1.0}]))
    only_b = samples(tokenizer, write(tmp_path / "b.jsonl", [B])).train
    assert splits.train == only_b  # the weight-0 record is skipped: no trained token
    assert splits.stats["train"]["no_trained_token"] == 1


@pytest.mark.parametrize("value, says", [(-1, "is -1; expected a finite number >= 0"),
                                         ("heavy", "is 'heavy'; expected a number >= 0"),
                                         (True, "is bool"), ([2], "is list")])
def test_bad_weight_names_file_line_and_field(tokenizer, tmp_path, value, says):
    path = write(tmp_path / "bad.jsonl", [A, {**B, "weight": value}])
    with pytest.raises(DataError) as e:
        samples(tokenizer, path)
    assert str(e.value).startswith(f"{path}:2: field 'weight' ") and says in str(e.value)
    assert "\n" not in str(e.value)


def test_weight_as_csv_text_and_null(tokenizer, tmp_path):
    rows = [{**A, "weight": "0.5"}, {**B, "weight": None}]
    got = samples(tokenizer, write(tmp_path / "s.jsonl", rows)).train
    assert max(got[0]["weights"]) == 0.5 and max(got[1]["weights"]) == 1.0


# ----------------------------------------------------------------------------- label scores


def hand_logprobs(model, tokenizer, task, questions, labels, demos=()):
    """Every (question, label) chat rendered in full and run alone; the label tokens' log-probs summed."""
    renderer = Renderer(tokenizer, assistant_turns="last")
    out = torch.zeros(len(questions), len(labels))
    with torch.no_grad():
        for i, q in enumerate(questions):
            for j, label in enumerate(labels):
                s = renderer.chat(chat(task, q, label, demos))
                logp = model(torch.tensor([s["input_ids"]])).logits[0].float().log_softmax(-1)
                out[i, j] = sum(logp[t - 1, tok] for t, (tok, w) in enumerate(zip(s["input_ids"], s["weights"])) if w)
    return out


def test_label_logprobs_match_hand_computation(tokenizer):
    model = lively_model(tokenizer)
    task = IntentTask()
    questions = [e.prompt for e in task.examples("test")[:3]]  # different lengths: padding inside a batch
    labels = list(task.labels)
    got = label_logprobs(model, tokenizer, task, questions, labels, batch_size=2, progress=False)
    want = hand_logprobs(model, tokenizer, task, questions, labels)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    conf = confidences(got)
    torch.testing.assert_close(conf.sum(-1), torch.ones(3))
    torch.testing.assert_close(conf, torch.softmax(want.double(), -1).float(), atol=1e-5, rtol=1e-4)
    one = label_logprobs(model, tokenizer, task, questions[:1], labels, progress=False)  # no shared prefix
    torch.testing.assert_close(one, want[:1], atol=1e-4, rtol=1e-5)
    demos = [("Request: Play jazz", "music"), ("Request: Call Anna", "call")]  # in-context examples
    got = label_logprobs(model, tokenizer, task, questions[:2], labels[:3], demos=demos, progress=False)
    torch.testing.assert_close(got, hand_logprobs(model, tokenizer, task, questions[:2], labels[:3], demos),
                               atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- weighting


def test_pseudo_weights_threshold_and_balance():
    conf = [0.9, 0.8, 0.7, 0.4, 0.6]
    pred = ["a", "a", "a", "b", "b"]
    assert pseudo_weights(conf, pred, balance=False) == conf
    assert pseudo_weights(conf, pred, threshold=0.65, balance=False) == [0.9, 0.8, 0.7, 0.0, 0.0]
    # a: total 2.4, b: total 1.0, mean 1.7 -> a scaled by 1.7/2.4, b by 1.7
    got = pseudo_weights(conf, pred)
    assert got == pytest.approx([0.9 * 1.7 / 2.4, 0.8 * 1.7 / 2.4, 0.7 * 1.7 / 2.4, 0.4 * 1.7, 0.6 * 1.7])
    assert sum(got[:3]) == pytest.approx(sum(got[3:]))
    # a lone class is scaled up by at most max_weight
    got = pseudo_weights([1.0, 1.0, 1.0, 1.0, 0.5], ["a", "a", "a", "a", "b"], max_weight=2.0)
    assert got == pytest.approx([2.25 / 4] * 4 + [1.0])
    # after the threshold, only the kept weights count
    got = pseudo_weights([0.9, 0.3, 0.6], ["a", "a", "b"], threshold=0.5)
    assert got == pytest.approx([0.75, 0.0, 0.75])
    assert pseudo_weights([0.2, 0.1], ["a", "b"], threshold=0.5) == [0.0, 0.0]


# ----------------------------------------------------------------------------- end to end


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_two_rounds_through_the_cli(capsys, tmp_path, tiny_model_dir):
    from tunesmith.infer.generate import load_for_inference
    from tunesmith.models.load import load_model

    before = digest(tiny_model_dir)
    out = tmp_path / "st"
    code = main(["synth", "self-train", "--model", str(tiny_model_dir), "--labelled", "8", "--pool", "8",
                 "--rounds", "2", "--teacher-steps", "2", "--student-steps", "2", "--validation", "4",
                 "--threshold", "0.1", "--warm-start", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert "validation accuracy" in capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    for key in ("method", "generated", "kept", "dropped", "generation_s", "samples_per_s", "train_s"):
        assert key in stats
    assert stats["generated"] == 16 and stats["kept"] + stats["dropped"]["below_threshold"] == 16
    assert len(stats["val_accuracy"]) == 3 and [r["round"] for r in stats["rounds"]] == [1, 2]
    assert len((out / "labelled.jsonl").read_text().splitlines()) == 8
    for r in (1, 2):
        pseudo = [json.loads(x) for x in (out / f"round-{r}" / "pseudo.jsonl").read_text().splitlines()]
        assert len(pseudo) == 8 and all(p["round"] == r for p in pseudo)
        assert all(sum(p["probs"].values()) == pytest.approx(1, abs=1e-4) for p in pseudo)
        assert all(p["confidence"] == max(p["probs"].values()) and p["label"] in p["probs"] for p in pseudo)
        assert all((p["weight"] == 0) == (p["confidence"] < 0.1) for p in pseudo)
        teacher = "teacher" if r == 1 else "round-1"
        assert all(p["teacher"].endswith(f"{teacher}/adapter") for p in pseudo)
        trained = [json.loads(x) for x in (out / f"round-{r}" / "train.jsonl").read_text().splitlines()]
        weights = {t["id"]: t["weight"] for t in trained}
        assert len(trained) == 8 + sum(p["weight"] > 0 for p in pseudo)
        assert all(weights[p["id"]] == p["weight"] for p in pseudo if p["weight"] > 0)
    assert stats["student"].endswith("round-2/adapter")
    # --warm-start: a student continues its teacher's adapter
    recipe = (out / "runs" / "round-2" / "recipe.yaml").read_text()
    assert f"adapter: {out / 'runs' / 'round-1' / 'adapter'}" in recipe
    # The base on disk is byte-identical, and so are the base tensors under the final student adapter.
    assert digest(tiny_model_dir) == before
    base, _ = load_model(str(tiny_model_dir))
    tuned, _ = load_for_inference(str(tiny_model_dir), stats["student"], merge=False)
    start, after = base.state_dict(), tuned.state_dict()
    assert set(start) <= set(after) and all(torch.equal(after[k], start[k]) for k in start)
    assert any(".lora_" in k for k in after)
    # The run folder is not reused.
    assert main(["synth", "self-train", "--model", str(tiny_model_dir), "--out", str(out), "--quiet"]) == 2
    assert "already holds a self-training run" in capsys.readouterr().err


def test_refuses_a_task_without_labels(capsys, tmp_path):
    assert main(["synth", "self-train", "--task", "json", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "has no label set" in capsys.readouterr().err
