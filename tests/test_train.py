"""The loop's invariants on a tiny model: packing isolation, exact gradient accumulation, frozen
parameters untouched, resume == uninterrupted, NaN stops cleanly, an end-to-end run."""
import math

import pytest
import torch

from tests.conftest import grads, make_tiny_model, tiny_recipe, train_losses
from tunesmith.data import collate
from tunesmith.recipe import load_recipe
from tunesmith.objectives.sft import causal_lm_loss, forward_hidden
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.loop import TrainError, stopping_after, train
from tunesmith.train.step import LossModule, backward_window
from tunesmith.train.metrics import read_metrics


@pytest.mark.parametrize("attention", ["packed", "sdpa", "eager"])
def test_packed_equals_one_by_one(tokenizer, samples, attention):
    from tunesmith.models.attention import use_attention, use_packed_attention

    model = make_tiny_model(tokenizer)
    use_packed_attention(model) if attention == "packed" else use_attention(model, attention)
    packed = collate(samples, packing=True, pad_id=tokenizer.pad_token_id)
    assert packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        h = forward_hidden(model, packed)
        logits = model.lm_head(h)[0]
        loss_packed, n_packed, _ = causal_lm_loss(model, packed)
        start, loss_alone, n_alone = 0, 0.0, 0
        for s in samples:
            one = collate([s], packing=True, pad_id=tokenizer.pad_token_id)
            alone = model.lm_head(forward_hidden(model, one))[0]
            seg = logits[start:start + len(s["input_ids"])]
            torch.testing.assert_close(seg, alone, atol=1e-5, rtol=1e-5)
            l, n, _ = causal_lm_loss(model, one)
            loss_alone, n_alone = loss_alone + float(l), n_alone + n
            start += len(s["input_ids"])
        # without the block mask the second sample would see the first: make sure that would differ
        use_attention(model, "sdpa")
        leaky = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        s0 = len(samples[0]["input_ids"])
        assert (leaky[s0:s0 + 5] - logits[s0:s0 + 5]).abs().max() > 1e-3
    assert n_packed == n_alone == sum(int(sum(w > 0 for w in s["weights"])) for s in samples)
    assert math.isclose(float(loss_packed), loss_alone, rel_tol=1e-5)


@pytest.mark.parametrize("attention", ["packed", "sdpa"])
def test_padded_equals_packed_loss(tokenizer, samples, attention):
    from tunesmith.models.attention import use_attention, use_packed_attention

    model = make_tiny_model(tokenizer)
    use_packed_attention(model) if attention == "packed" else use_attention(model, attention)
    with torch.no_grad():
        a = causal_lm_loss(model, collate(samples, packing=True, pad_id=tokenizer.pad_token_id))
        b = causal_lm_loss(model, collate(samples, packing=False, pad_id=tokenizer.pad_token_id))
    assert a[1] == b[1]
    assert math.isclose(float(a[0]), float(b[0]), rel_tol=1e-5)


def test_grad_accumulation_equals_big_batch(tokenizer, samples):
    dev = torch.device("cpu")
    m1 = make_tiny_model(tokenizer)
    micro = [collate([s], packing=False, pad_id=tokenizer.pad_token_id) for s in samples]
    loss1, tok1, _, _ = backward_window(LossModule(m1), micro, dev, "fp32")
    m2 = make_tiny_model(tokenizer)
    loss2, tok2, _, _ = backward_window(LossModule(m2), [collate(samples, packing=False, pad_id=tokenizer.pad_token_id)], dev, "fp32")
    assert tok1 == tok2
    assert math.isclose(loss1, loss2, rel_tol=1e-5)
    g1, g2 = grads(m1), grads(m2)
    assert g1.keys() == g2.keys() and g1
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-6, rtol=1e-4)
    # the naive mean of per-batch means gives a different gradient (lengths are unequal)
    m3 = make_tiny_model(tokenizer)
    for b in micro:
        l, n, _ = causal_lm_loss(m3, b)
        (l / n / len(micro)).backward()
    assert max((grads(m3)[n] - g1[n]).abs().max() for n in g1) > 1e-6


def test_lora_run_end_to_end_frozen_untouched(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from tunesmith.export.peft_format import load_adapter
    from tunesmith.models.attention import use_attention
    from tunesmith.models.load import load_model
    from tunesmith.train.prepare import prepare_model

    recipe = tiny_recipe(tmp_path, tiny_model_dir)
    model, tok = load_model(str(tiny_model_dir))  # trained in place: the very weights the run started from
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(recipe, model=model, tokenizer=tok)
    assert result.status == "completed" and result.step == 6
    losses = train_losses(result.run_dir)
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert (result.run_dir / "adapter" / "adapter_config.json").is_file()
    assert (result.run_dir / "report.md").is_file() and (result.run_dir / "loss.png").is_file()
    assert (result.run_dir / "recipe.yaml").is_file()
    assert [c.name for c in ckpt.list_checkpoints(result.run_dir)] == ["step-2", "step-4", "step-6"]
    # the trained model's frozen base weights are bit-identical to the ones it started from
    after = model.state_dict()
    assert set(start) <= set(after), "base checkpoint keys must be unchanged"
    changed = [k for k in start if not torch.equal(after[k], start[k])]
    assert not changed, f"frozen base weights changed: {changed[:5]}"
    # the last checkpoint holds exactly the trained LoRA tensors, and every one moved from its init
    trained = load_file(result.run_dir / "checkpoints" / "step-6" / "trainable.safetensors")
    assert set(trained) == {k for k, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in k for k in trained)
    init = dict(prepare_model(recipe)[0].named_parameters())  # the same seeded initialisation
    assert all(torch.equal(trained[k], after[k]) for k in trained)
    assert all(not torch.equal(trained[k], init[k]) for k in trained), "a LoRA tensor did not move"
    # the saved adapter on a fresh base reproduces the trained model
    model.eval()
    use_attention(model, "sdpa")
    fresh, _ = load_model(str(tiny_model_dir))
    load_adapter(fresh, result.run_dir / "adapter")
    ids = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-4)


def test_resume_reproduces_uninterrupted_curve(tmp_path, tiny_model_dir):
    full = train(tiny_recipe(tmp_path / "a", tiny_model_dir))
    with stopping_after(3):
        first = train(tiny_recipe(tmp_path / "b", tiny_model_dir))
    assert first.status == "interrupted" and first.step == 3
    assert ckpt.latest_checkpoint(first.run_dir).name == "step-3"
    with pytest.raises(TrainError, match="resume=true"):
        train(tiny_recipe(tmp_path / "b", tiny_model_dir))
    resumed = train(tiny_recipe(tmp_path / "b", tiny_model_dir, "resume=true"))
    assert resumed.status == "completed"
    a, b = train_losses(full.run_dir), train_losses(resumed.run_dir)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-6, (a, b)


def test_grad_accum_equals_the_bigger_batch_through_the_loop(tmp_path, tiny_model_dir):
    """Full fine-tuning through the real loop, padded and unshuffled so both runs see the same
    samples per step: 2 accumulated micro-batches of 2 samples give the same losses, gradient
    norms and final weights as 1 micro-batch of 4."""
    from safetensors.torch import load_file

    common = ["method.name=full", "train.lr=1e-3", "train.steps=3", "data.packing=false", "data.shuffle=false",
              "data.val_fraction=0", "train.save_every=0"]
    acc = train(tiny_recipe(tmp_path / "acc", tiny_model_dir, *common, "train.batch_size=2", "train.grad_accum=2"))
    big = train(tiny_recipe(tmp_path / "big", tiny_model_dir, *common, "train.batch_size=4", "train.grad_accum=1"))
    assert acc.status == big.status == "completed"
    ra = [r for r in read_metrics(acc.run_dir / "metrics.jsonl") if "loss" in r]
    rb = [r for r in read_metrics(big.run_dir / "metrics.jsonl") if "loss" in r]
    assert len(ra) == len(rb) == 3
    assert [r["trained_tokens"] for r in ra] == [r["trained_tokens"] for r in rb]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in ra] == pytest.approx([r[key] for r in rb], rel=1e-5), key
    wa, wb = load_file(acc.output / "model.safetensors"), load_file(big.output / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    assert wa.keys() == wb.keys() == base.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-4)
    assert max(float((wa[k] - base[k]).abs().max()) for k in wa) > 1e-4  # the compared weights did train


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    import tunesmith.objectives.sft as loop

    real = loop.causal_lm_loss
    calls = {"n": 0}

    def poisoned(model, batch, chunk=1024, kernel="chunked"):
        calls["n"] += 1
        loss, n, m = real(model, batch, chunk, kernel)
        return (loss * float("nan") if calls["n"] > 4 else loss), n, m

    monkeypatch.setattr(loop, "causal_lm_loss", poisoned)
    recipe = tiny_recipe(tmp_path, tiny_model_dir, "data.val_fraction=0")
    with pytest.raises(TrainError, match="step 5: loss is nan.*last healthy checkpoint: .*step-2"):
        train(recipe)
    # step 4's weights gave the NaN loss: that checkpoint is set aside, not resumed from, not deleted
    last = ckpt.latest_checkpoint(recipe.run_dir)
    assert last.name == "step-2"
    assert (recipe.run_dir / "checkpoints" / "diverged-step-4" / "trainable.safetensors").is_file()
    # the healthy checkpoint is intact and the run resumes from it
    monkeypatch.setattr(loop, "causal_lm_loss", real)
    result = train(tiny_recipe(tmp_path, tiny_model_dir, "data.val_fraction=0", "resume=true"))
    assert result.status == "completed" and result.step == 6


def test_sigint_writes_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    import os
    import signal

    import tunesmith.objectives.sft as loop

    real = loop.causal_lm_loss
    calls = {"n": 0}

    def interrupting(model, batch, chunk=1024, kernel="chunked"):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(model, batch, chunk, kernel)

    monkeypatch.setattr(loop, "causal_lm_loss", interrupting)
    result = train(tiny_recipe(tmp_path, tiny_model_dir, "data.val_fraction=0", "train.save_every=0"))
    assert result.status == "interrupted" and result.step == 2
    assert ckpt.latest_checkpoint(result.run_dir).name == "step-2"


@pytest.mark.slow
def test_embedded_model_loss_falls(tmp_path):
    """The real SmolLM2-135M-Instruct, LoRA, bf16 autocast on CPU: a few steps lower the loss."""
    from pathlib import Path

    data = Path(__file__).parent.parent / "examples" / "chat.jsonl"
    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "lora-sft.yaml", [
        f"data.train={data}", "data.limit=48", "data.val_fraction=0", f"output_dir={tmp_path}",
        "train.steps=5", "train.batch_tokens=768", "train.lr=1e-3", "train.warmup=0", "train.eval_every=0",
        "train.save_every=0", "train.schedule=constant"])
    result = train(recipe)
    losses = train_losses(result.run_dir)
    assert result.status == "completed" and len(losses) == 5
    assert losses[-1] < 0.8 * losses[0], losses


def test_continue_from_an_adapter(tmp_path, tiny_model_dir):
    """model.adapter starts a new run from a saved LoRA: its first loss continues the first run's."""
    first = train(tiny_recipe(tmp_path / "a", tiny_model_dir, "data.val_fraction=0", "method.lora.dropout=0"))
    second = train(tiny_recipe(tmp_path / "b", tiny_model_dir, "data.val_fraction=0", "method.lora.dropout=0",
                               f"model.adapter={first.run_dir}", "method.lora.rank=4", "train.steps=2"))
    a, b = train_losses(first.run_dir), train_losses(second.run_dir)
    assert b[0] < a[0] - 0.5, (a, b)  # starts where the first run got to, not from scratch
    from tunesmith.export.peft_format import read_adapter

    assert read_adapter(second.run_dir / "adapter")[0].rank == 16  # the adapter's own rank won
