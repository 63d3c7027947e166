"""The divergence guard, self-verifying checkpoints and the run folder's first-step guard."""
import errno
import json
import math
import pickle
import re

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.train import checkpoint as ckpt
from tunesmith.train.loop import TrainError, stopping_after, train
from tunesmith.train.safety import Diverged, DivergenceGuard

from tests.conftest import tiny_recipe

VOCAB = 49152


# ---- the guard on fixed sequences


def feed(guard, losses, norms=None):
    for step, loss in enumerate(losses, 1):
        guard.observe(loss, 1.0 if norms is None else norms[step - 1], step)


def test_nonfinite_values_stop_at_once():
    guard = DivergenceGuard(vocab_size=VOCAB, token_loss=True)
    with pytest.raises(Diverged, match="loss is nan") as e:
        guard.check_loss(float("nan"), 7)
    assert e.value.first_bad == 7  # the weights of step 6 produced it
    with pytest.raises(Diverged, match="gradient norm is inf"):
        guard.check_grad(float("inf"), 7)
    w = torch.nn.Parameter(torch.ones(3))
    guard.check_weights([w], 7)
    w.data[1] = float("nan")
    with pytest.raises(Diverged, match="non-finite") as e:
        guard.check_weights([w], 7)
    assert e.value.first_bad == 8  # step 7's update never reaches a checkpoint; step 6's is fine


def test_zero_gradient_for_patience_steps_is_a_collapse():
    guard = DivergenceGuard(vocab_size=VOCAB, token_loss=True, patience=3)
    feed(guard, [5.0, 4.0], [1.0, 0.0])  # one zero: a warning, not a stop
    assert not guard.healthy
    guard.observe(4.0, 1.0, 3)
    assert guard.healthy
    with pytest.raises(Diverged, match="gradient norm has been 0 for 3 steps") as e:
        feed(guard, [4.0, 4.0, 4.0, 4.0, 4.0], [1.0, 1.0, 0.0, 0.0, 0.0])
    assert e.value.first_bad == 3 and e.value.step == 5


def test_loss_at_ln_vocab_only_counts_after_the_model_knew_better():
    uniform = math.log(VOCAB)
    guard = DivergenceGuard(vocab_size=VOCAB, token_loss=True, patience=3)
    feed(guard, [uniform] * 6)  # a random model starts there: no stop
    with pytest.raises(Diverged, match="ln\\(vocab\\)"):
        feed(guard, [uniform, 6.0, 5.0, uniform + 0.01, uniform, uniform])
    # not a token loss (GRPO, preference): the rule does not apply
    feed(DivergenceGuard(vocab_size=VOCAB, token_loss=False, spikes=False), [6.0, uniform, uniform, uniform, uniform])


def test_unrecovered_spike_stops_and_a_brief_one_does_not():
    guard = DivergenceGuard(vocab_size=VOCAB, token_loss=True, patience=3)
    feed(guard, [2.0, 1.5, 1.0, 1.2, 4.0, 1.0, 1.1, 0.9])  # one bad batch, then back
    with pytest.raises(Diverged, match="far above its running minimum"):
        for step, loss in enumerate([9.0, 12.0, 15.0, 15.0, 15.0], 9):
            guard.observe(loss, 1.0, step)
    off = DivergenceGuard(vocab_size=VOCAB, token_loss=True, patience=0)
    feed(off, [1.0] + [15.0] * 10, [1.0] + [0.0] * 10)  # patience 0: only NaN/Inf stop


# ---- end to end on a tiny model


def finite_checkpoint(path):
    return all(torch.isfinite(t).all() for t in load_file(path / "trainable.safetensors").values())


@pytest.mark.parametrize("lr,cause", [("1e6", "gradient norm has been 0"), ("1", "far above its running minimum")])
def test_a_diverging_run_stops_and_keeps_only_healthy_checkpoints(tmp_path, tiny_model_dir, lr, cause):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, "method.name=full", f"train.lr={lr}", "train.steps=20",
                         "train.save_every=1", "train.keep_last=1", "train.warmup=0", "data.val_fraction=0")
    with pytest.raises(TrainError, match=cause) as e:
        train(recipe)
    left = ckpt.list_checkpoints(recipe.run_dir)
    assert all(finite_checkpoint(p) for p in left)
    aside = sorted((recipe.run_dir / "checkpoints").glob("diverged-step-*"))
    assert aside, "the checkpoints written while diverging are set aside, not deleted"
    # every step-N left comes before the first set-aside one, and the message names the newest
    first_aside = min(int(p.name.rsplit("-", 1)[1]) for p in aside)
    assert all(int(p.name.split("-")[1]) < first_aside for p in left)
    if left:
        assert str(left[-1]) in str(e.value)
    else:
        assert "no healthy checkpoint" in str(e.value)
    assert "Traceback" not in str(e.value) and "\n" not in str(e.value)


def test_weights_made_nan_by_the_update_are_never_saved(tmp_path, tiny_model_dir, monkeypatch):
    from tunesmith.methods.base import MethodBase

    real = MethodBase.after_step

    def poison(self, model, step, optimizer):  # the update of step 3 makes a weight NaN
        real(self, model, step, optimizer)
        if step == 3:
            next(p for p in model.parameters() if p.requires_grad).data[0] = float("nan")

    monkeypatch.setattr(MethodBase, "after_step", poison)
    recipe = tiny_recipe(tmp_path, tiny_model_dir, "train.save_every=1", "data.val_fraction=0")
    with pytest.raises(TrainError, match="step 3: the update made weights non-finite.*step-2"):
        train(recipe)
    assert [p.name for p in ckpt.list_checkpoints(recipe.run_dir)] == ["step-1", "step-2"]
    assert not list((recipe.run_dir / "checkpoints").glob("diverged-*"))


def test_save_refuses_nonfinite_weights(tmp_path, tiny_model):
    from tunesmith.methods import attach, build_method
    from tunesmith.recipe import load_recipe

    method = build_method(load_recipe(None, []).method)
    attach(tiny_model, method)
    opt = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt.save_checkpoint(tmp_path, 1, tiny_model, opt, sched, {}, keep_last=2, method=method)
    next(p for p in tiny_model.parameters() if p.requires_grad).data.fill_(float("inf"))
    with pytest.raises(ckpt.CheckpointError, match="not finite.*step-1"):
        ckpt.save_checkpoint(tmp_path, 2, tiny_model, opt, sched, {}, keep_last=2, method=method)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-1"]


# ---- pruning


def fake_checkpoints(run_dir, states: dict[int, dict]):
    for step, state in states.items():
        folder = run_dir / "checkpoints" / f"step-{step}"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps({"step": step, **state}))


def test_prune_keeps_newest_healthy_confirmed_and_best(tmp_path):
    fake_checkpoints(tmp_path, {1: {"healthy": True, "val_loss": 2.0}, 2: {"healthy": True, "val_loss": 1.0},
                                3: {"healthy": True}, 4: {"healthy": True}, 5: {"healthy": False},
                                6: {"healthy": False}})
    ckpt.prune(tmp_path, keep_last=1)
    # newest (6), newest healthy (4), newest confirmed healthy (3: step 4 was healthy too), best val (2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-2", "step-3", "step-4", "step-6"]


def test_keep_last_alone_when_all_healthy(tmp_path):
    fake_checkpoints(tmp_path, {s: {"healthy": True} for s in range(1, 6)})
    ckpt.prune(tmp_path, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-4", "step-5"]


# ---- manifests, damage, full disk


@pytest.fixture
def two_checkpoints(tmp_path, tiny_model_dir):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, "train.save_every=2", "data.val_fraction=0")
    with stopping_after(4):
        train(recipe)
    assert [p.name for p in ckpt.list_checkpoints(recipe.run_dir)] == ["step-2", "step-4"]
    return recipe


def test_manifest_is_written_last_and_verifies(two_checkpoints):
    newest = ckpt.latest_checkpoint(two_checkpoints.run_dir)
    listed = json.loads((newest / "manifest.json").read_text())["files"]
    assert set(listed) == {"trainable.safetensors", "train_state.pt", "state.json"}
    assert ckpt.verify(newest) is None


@pytest.mark.parametrize("damage,phrase", [
    ("truncate", "has .* of .* bytes"), ("flip", "does not match its manifest hash"),
    ("no-manifest", "no manifest"), ("missing", "train_state.pt is missing")])
def test_resume_falls_back_from_a_damaged_newest(two_checkpoints, tiny_model_dir, tmp_path, damage, phrase, capsys):
    newest = ckpt.latest_checkpoint(two_checkpoints.run_dir)
    weights, state = newest / "trainable.safetensors", newest / "train_state.pt"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "no-manifest":
        (newest / "manifest.json").unlink()
    else:
        state.unlink()
    assert re.search(phrase, ckpt.verify(newest) or "")
    result = train(tiny_recipe(tmp_path, tiny_model_dir, "train.save_every=2", "data.val_fraction=0", "resume=true"))
    out = capsys.readouterr().out
    assert f"checkpoint {newest} is" in out and "falling back to the previous one" in out
    assert "resumed from" in out and "step-2 (step 2)" in out
    assert result.status == "completed" and result.step == 6


def test_malicious_train_state_is_one_line(two_checkpoints, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = ckpt.latest_checkpoint(two_checkpoints.run_dir) / "train_state.pt"
    path.write_bytes(pickle.dumps({"scheduler": Evil(), "rng": None}, protocol=2))
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.read_train_state(path)
    msg = str(e.value)
    assert str(path) in msg and "refused" in msg and "weights_only" not in msg and "\n" not in msg
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ckpt.CheckpointError, match="not a readable tunesmith train state"):
        ckpt.read_train_state(path)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(two_checkpoints, tiny_model_dir, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    recipe = tiny_recipe(tmp_path, tiny_model_dir, "train.save_every=2", "data.val_fraction=0", "resume=true")
    with pytest.raises(ckpt.CheckpointError, match="no space left.*step-6.*step-4\\) is intact.*resume=true"):
        train(recipe)
    folder = recipe.run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-2", "step-4"]  # no .tmp- left behind
    assert ckpt.verify(folder / "step-4") is None


def test_a_run_that_fails_before_its_first_step_leaves_no_folder(tmp_path, tiny_model_dir):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, "model.name=/nonexistent/model")
    with pytest.raises(Exception):
        train(recipe)
    assert not recipe.run_dir.exists()
    # but a folder that existed before (a resumed run) is never removed
    recipe.run_dir.mkdir(parents=True)
    (recipe.run_dir / "notes.txt").write_text("mine")
    with pytest.raises(Exception):
        train(tiny_recipe(tmp_path, tiny_model_dir, "model.name=/nonexistent/model", "resume=true"))
    assert (recipe.run_dir / "notes.txt").read_text() == "mine"


def test_resume_follows_a_changed_learning_rate(tmp_path, tiny_model_dir):
    from tunesmith.train.metrics import read_metrics

    recipe = tiny_recipe(tmp_path, tiny_model_dir, "train.save_every=2", "data.val_fraction=0",
                         "train.schedule=constant", "train.warmup=0")
    with stopping_after(2):
        train(recipe)
    train(tiny_recipe(tmp_path, tiny_model_dir, "train.save_every=2", "data.val_fraction=0",
                      "train.schedule=constant", "train.warmup=0", "train.lr=1e-4", "resume=true"))
    lrs = [r["lr"] for r in read_metrics(recipe.run_dir / "metrics.jsonl") if "lr" in r]
    assert lrs == pytest.approx([1e-2, 1e-2, 1e-4, 1e-4, 1e-4, 1e-4])
