"""Logit distillation: the formula on fixed inputs, packed == one by one, and a run through the harness."""
import copy

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import make_tiny_model, tiny_recipe
from tunesmith.data import collate
from tunesmith.objectives.distill import Distill, distill_loss


def samples(tokenizer, n=3):
    out = []
    for i in range(n):
        ids = tokenizer(f"Question {i}: what is {i} + {i}? Answer: {2 * i}, of course.")["input_ids"]
        cut = len(ids) // 2
        out.append({"input_ids": ids, "weights": [0.0] * cut + [1.0] * (len(ids) - cut)})
    return out


def reference_loss(student, teacher, sample, temperature, ce_weight=0.0):
    """Hinton et al.: τ² · KL(softmax(z_T/τ) ‖ softmax(z_S/τ)) per trained position, from full logits."""
    ids = torch.tensor([sample["input_ids"]])
    w = torch.tensor(sample["weights"])[1:]
    zs = student(input_ids=ids).logits[0, :-1].float()
    with torch.no_grad():
        zt = teacher(input_ids=ids).logits[0, :-1].float()
    pt = F.softmax(zt / temperature, -1)
    kl = (pt * (F.log_softmax(zt / temperature, -1) - F.log_softmax(zs / temperature, -1))).sum(-1) * temperature ** 2
    ce = F.cross_entropy(zs, ids[0, 1:], reduction="none")
    return ((kl + ce_weight * ce) * w).sum()


@pytest.mark.parametrize("temperature,ce_weight,chunk", [(1.0, 0.0, 1024), (2.0, 0.0, 3), (4.0, 0.5, 5)])
def test_matches_the_formula_and_packing_changes_nothing(tokenizer, temperature, ce_weight, chunk):
    student, teacher = make_tiny_model(tokenizer, seed=0), make_tiny_model(tokenizer, seed=1)
    data = samples(tokenizer)
    packed = collate(data, packing=True, pad_id=tokenizer.pad_token_id)
    loss, n, _ = distill_loss(student, teacher, packed, temperature, ce_weight, chunk)
    expected = sum(reference_loss(student, teacher, s, temperature, ce_weight) for s in data)
    assert n == sum(int(sum(w > 0 for w in s["weights"][1:])) for s in data)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert float(loss) > 0
    one_by_one = sum(distill_loss(student, teacher, collate([s], packing=True, pad_id=0), temperature, ce_weight,
                                  chunk)[0] for s in data)
    torch.testing.assert_close(loss, one_by_one, rtol=1e-5, atol=1e-5)
    # the gradient reaches the student only
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_a_student_equal_to_its_teacher_has_zero_loss_and_gradient(tokenizer):
    student = make_tiny_model(tokenizer, seed=0)
    teacher = copy.deepcopy(student)
    batch = collate(samples(tokenizer), packing=True, pad_id=tokenizer.pad_token_id)
    loss, _, _ = distill_loss(student, teacher, batch, temperature=2.0)
    loss.backward()
    assert abs(float(loss)) < 1e-5
    assert max(float(p.grad.abs().max()) for p in student.parameters() if p.grad is not None) < 1e-5


def test_distillation_through_the_harness_moves_the_student_to_the_teacher(tmp_path, tokenizer, tiny_model_dir):
    from tunesmith.train.loop import train
    from tunesmith.train.metrics import read_metrics

    teacher = make_tiny_model(tokenizer, seed=7)
    recipe = tiny_recipe(tmp_path, tiny_model_dir, "method.name=full", "train.lr=3e-3", "train.steps=8",
                         "data.val_fraction=0", "train.save_every=0")
    result = train(recipe, objective=Distill(teacher.requires_grad_(False), temperature=2.0))
    rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert result.status == "completed" and len(rows) == 8
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"], [r["loss"] for r in rows]
    assert "trained_tokens" in rows[0]


def test_distill_from_the_recipe_with_a_teacher_folder(tmp_path, tokenizer, tiny_model_dir):
    """objective.name=distill with objective.distill.teacher = a model folder: the registry line and
    the options block beside the objective are all the recipe needs."""
    from tunesmith.recipe import to_yaml
    from tunesmith.train.loop import train
    from tunesmith.train.metrics import read_metrics

    teacher_dir = tmp_path / "teacher"
    make_tiny_model(tokenizer, seed=3).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    recipe = tiny_recipe(tmp_path, tiny_model_dir, "objective.name=distill", f"objective.distill.teacher={teacher_dir}",
                         "objective.distill.temperature=1.5", "method.name=full", "train.lr=3e-3", "train.steps=6",
                         "data.val_fraction=0")
    assert "distill:" in to_yaml(recipe) and "preference:" not in to_yaml(recipe)
    result = train(recipe)
    losses = [r["loss"] for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert result.status == "completed" and losses[-1] < losses[0]


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path, tokenizer, tiny_model_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.objectives import ObjectiveError
    from tunesmith.recipe import load_recipe

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    recipe = load_recipe(None, ["objective.name=distill", f"objective.distill.teacher={other}"])
    with pytest.raises(ObjectiveError, match="vocabulary of 500 tokens"):
        Distill.build(recipe, make_tiny_model(tokenizer))
    with pytest.raises(Exception, match="temperature"):
        load_recipe(None, ["objective.name=distill", "objective.distill.temperature=0"])
