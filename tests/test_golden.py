"""Golden loss curves: the first steps of an SFT (LoRA), a DPO and a GRPO run on the tiny model
(tests/conftest.py `make_tiny_model`, seed 0), fixed data and a fixed seed, through the public
`tunesmith.train.loop.train(recipe)`, must reproduce tests/golden/losses.json step by step to
rel 1e-4 (plus abs 1e-6, for values that sit at zero: DPO's first margin, GRPO's loss, whose
policy-gradient part is zero on average by construction).

A change to the loop, the data pipeline, an objective, a method's initialisation or the optimizer
that moves any of these numbers fails here, even when every other invariant still holds. When the
change is intended, regenerate the file on purpose and commit it with the change that explains it:

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py

Runs are pinned to the CPU, fp32 and one thread (train.threads=1), so the numbers do not depend on
the machine's core count; `test_thread_count_does_not_move_the_curve` checks that."""
import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny_model
from tunesmith.recipe import load_recipe
from tunesmith.train.loop import train
from tunesmith.train.metrics import read_metrics

ROOT = Path(__file__).parent.parent
GOLDEN = Path(__file__).parent / "golden" / "losses.json"
REL, ABS = 1e-4, 1e-6
STEPS = 5
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
# what each run records per step: the loss, plus the metrics that say the run is live
KEYS = {"sft": ("loss", "grad_norm"), "dpo": ("loss", "grad_norm", "rewards/margins"),
        "grpo": ("loss", "grad_norm", "reward_mean", "kl", "ratio")}
GRPO_PROMPTS = ["Name a fruit.", "Say a colour.", "Pick an animal.", "Give a number.", "Name a city.",
                "Say a day of the week."]

COMMON = ["train.device=cpu", "train.precision=fp32", "train.seed=0", f"train.steps={STEPS}", "train.warmup=0",
          "train.schedule=constant", "train.eval_every=0", "train.save_every=0", "train.log_every=1",
          "model.frozen_dtype=same", "method.name=lora", "method.lora.rank=4", "method.lora.alpha=8",
          "method.lora.dropout=0"]


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """The runs set torch's thread count (train.threads); later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def recipe_for(kind, tmp_path, model_dir, threads):
    common = [*COMMON, f"model.name={model_dir}", f"output_dir={tmp_path}", f"name={kind}", f"train.threads={threads}"]
    if kind == "sft":
        return load_recipe(None, [*common, f"data.train={ROOT / 'examples' / 'chat.jsonl'}", "data.limit=24",
                                  "data.val_fraction=0", "data.max_length=256", "train.batch_tokens=512",
                                  "train.lr=1e-2"])
    if kind == "dpo":
        return load_recipe(None, [*common, "objective.name=dpo", f"data.train={ROOT / 'examples' / 'preference.jsonl'}",
                                  "data.limit=16", "data.val_fraction=0", "data.max_length=256",
                                  "train.batch_tokens=512", "train.lr=1e-2"])
    tmp_path.mkdir(parents=True, exist_ok=True)
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": p, "reference": "-"}) + "\n" for p in GRPO_PROMPTS))
    reward = Path(__file__).parent / "golden" / "reward.py"
    return load_recipe(None, [*common, "objective.name=grpo", f"objective.grpo.task={task}",
                              f"objective.grpo.reward=[{reward}:vowel_share]", "objective.grpo.samples=4",
                              "objective.grpo.prompts_per_step=2", "objective.grpo.max_new_tokens=6",
                              "objective.grpo.kl_beta=0.05", "objective.grpo.iterations=2", "train.lr=1e-2"])


def run_curve(kind, tmp_path, model_dir, tokenizer, threads=1):
    """Per-step metrics of one golden run: {key: [value at step 1, 2, ...]}."""
    result = train(recipe_for(kind, tmp_path, model_dir, threads), model=make_tiny_model(tokenizer, seed=0),
                   tokenizer=tokenizer)
    assert result.status == "completed" and result.step == STEPS
    rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return {key: [float(r[key]) for r in rows] for key in KEYS[kind]}


def off_by(got, want):
    """Step-by-step differences beyond the tolerance, as readable lines."""
    if len(got) != len(want):
        return [f"{len(got)} steps, golden {len(want)}"]
    return [f"step {i + 1}: got {g!r}, golden {w!r}" for i, (g, w) in enumerate(zip(got, want))
            if abs(g - w) > REL * abs(w) + ABS]


@pytest.mark.parametrize("kind", list(KEYS))
def test_first_steps_match_the_golden_curve(kind, tmp_path, tiny_model_dir, tokenizer):
    curve = run_curve(kind, tmp_path, tiny_model_dir, tokenizer)
    live = "reward_mean" if kind == "grpo" else "loss"
    assert len(set(curve[live])) > 1 and all(g > 0 for g in curve["grad_norm"]), f"{kind}: not training: {curve}"
    if UPDATE:
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
        golden[kind] = curve
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    assert GOLDEN.is_file(), f"{GOLDEN} is missing: create it with UPDATE_GOLDEN=1 .venv/bin/python -m pytest {__file__}"
    golden = json.loads(GOLDEN.read_text())
    assert kind in golden, f"{GOLDEN} has no `{kind}` run: regenerate it with UPDATE_GOLDEN=1"
    for key in KEYS[kind]:
        bad = off_by(curve[key], golden[kind].get(key, []))
        assert not bad, (
            f"{kind} `{key}` left the golden curve (rel {REL} + abs {ABS}):\n  " + "\n  ".join(bad) +
            "\nIf this change is intended, regenerate the file on purpose and commit it with the change:\n"
            "  UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py")


def test_thread_count_does_not_move_the_curve(tmp_path, tiny_model_dir, tokenizer):
    one = run_curve("sft", tmp_path / "one", tiny_model_dir, tokenizer, threads=1)
    three = run_curve("sft", tmp_path / "three", tiny_model_dir, tokenizer, threads=3)
    for key in KEYS["sft"]:
        assert not off_by(three[key], one[key]), (key, one[key], three[key])
