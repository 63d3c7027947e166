"""`train.effective_batch`: how sizes are read, the grad_accum worked out from the micro-batch and
the processes, and through the loop: a run given an effective batch is the run with that
grad_accum (the same losses), and its steps hold about the batch asked for."""
import pytest

from tests.conftest import tiny_recipe, train_losses
from tunesmith.config import RecipeError, parse_effective_batch
from tunesmith.recipe import load_recipe
from tunesmith.train.effective_batch import plan_accumulation
from tunesmith.train.loop import train
from tunesmith.train.metrics import read_metrics


@pytest.mark.parametrize("text, expected", [
    ("3840", (3840, "samples")), (3840, (3840, "samples")), ("7,680", None), ("4k samples", (4000, "samples")),
    ("2M tokens", (2_000_000, "tokens")), ("2M", (2_000_000, "tokens")), ("1.5k", (1500, "tokens")),
    ("512 tokens", (512, "tokens")), ("1 sample", (1, "samples")), ("0", None), ("0.5", None), ("lots", None),
    ("2 M tokens", (2_000_000, "tokens")), ("-8", None)])
def test_sizes_are_read(text, expected):
    if expected is None:
        with pytest.raises(ValueError):
            parse_effective_batch(text)
    else:
        assert parse_effective_batch(text) == expected


def test_a_bad_size_is_a_recipe_error():
    with pytest.raises(RecipeError, match=r"^train.effective_batch: `lots` is not a batch size"):
        load_recipe(None, ["train.effective_batch=lots"])
    assert load_recipe(None, ["train.effective_batch=3840"]).train.effective_batch == "3840"


def test_accumulation_from_the_micro_batch():
    plan = [[0, 1, 2, 3], [4, 5], [6, 7, 8]]  # 9 samples in 3 micro-batches: 3 a micro-batch
    lengths = [10] * 9  # 90 tokens: 30 a micro-batch
    acc = plan_accumulation("3840", plan, lengths, world=1)
    assert (acc.unit, acc.per_micro, acc.grad_accum, acc.realised) == ("samples", 3.0, 1280, 3840)
    assert plan_accumulation("3840", plan, lengths, world=4).grad_accum == 320  # processes share the batch
    assert plan_accumulation("3000 tokens", plan, lengths, world=2).grad_accum == 50
    assert plan_accumulation("10 samples", plan, lengths, world=1).grad_accum == 3  # nearest: 9, not 12
    assert plan_accumulation("1", plan, lengths, world=8).grad_accum == 1  # never below one micro-batch
    assert "more than one epoch" in plan_accumulation("90", plan, lengths, 1).describe("x")
    assert "more than one epoch" not in plan_accumulation("9", plan, lengths, 1).describe("x")


def test_effective_batch_is_the_run_with_that_grad_accum(tmp_path, tiny_model_dir, capsys):
    common = [f"model.name={tiny_model_dir}", "data.packing=false", "train.batch_size=2", "data.shuffle=false",
              "data.val_fraction=0", "method.lora.dropout=0", "train.steps=3", "train.save_every=0"]
    chosen = train(tiny_recipe(tmp_path / "e", tiny_model_dir, *common, "train.effective_batch=8", "train.grad_accum=3"))
    line = next(l for l in capsys.readouterr().out.splitlines() if "effective batch" in l)
    assert "effective batch 8 samples: grad_accum 4 × 2.0 samples per micro-batch" in line
    assert line.endswith("= 8 samples a step (in place of train.grad_accum=3)")
    same = train(tiny_recipe(tmp_path / "g", tiny_model_dir, *common, "train.grad_accum=4"))
    other = train(tiny_recipe(tmp_path / "o", tiny_model_dir, *common, "train.grad_accum=1"))
    assert train_losses(chosen.run_dir) == train_losses(same.run_dir)
    assert train_losses(chosen.run_dir) != train_losses(other.run_dir)


def test_packed_steps_hold_about_the_tokens_asked_for(tmp_path, tiny_model_dir, capsys):
    run = train(tiny_recipe(tmp_path, tiny_model_dir, "train.effective_batch=1k tokens", "train.batch_tokens=128",
                            "data.val_fraction=0", "train.steps=4", "train.save_every=0"))
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if "effective batch" in l)
    accum = int(line.split("grad_accum ")[1].split()[0])
    assert accum > 1 and "train.batch_tokens=128, packed" in line
    tokens = [r["tokens"] for r in read_metrics(run.run_dir / "metrics.jsonl") if "loss" in r]
    assert len(tokens) == 4
    mean = sum(tokens) / len(tokens)
    assert abs(mean - 1000) <= 128, (mean, tokens)  # within one micro-batch of the target
    assert max(tokens) <= accum * 128
