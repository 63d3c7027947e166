"""train.speed=auto: the choices follow the measured peaks and the memory estimate (both injected
here: a fake estimate whose memory is a known linear function of the micro-batch), explicit keys
win, `off` changes nothing, a resumed run keeps its first choices."""
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from tunesmith.recipe import load_recipe
from tunesmith.train.speed import CHUNK, choose_speed, explicit

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
LAYERS, VOCAB = 10, 1000


@dataclass
class FakeEstimate:
    parts: dict
    info: dict
    peak_bytes: float


def fake_estimate(recipe) -> FakeEstimate:
    """Memory as estimate.py counts it, in made-up but linear parts: per micro-batch token 500 B
    outside the layers, 1000 B per plain layer, 100 B per checkpointed one (+ one layer recomputed),
    a whole-logits loss saving 4·V B and a transient of 16·V B per loss-chunk position."""
    cfg = recipe.train
    tokens = cfg.batch_tokens if recipe.data.packing else cfg.batch_size * recipe.data.max_length
    per_layer = 1000 * tokens
    checkpointed = math.ceil(LAYERS / cfg.checkpoint_every) if cfg.activation_checkpointing else 0
    activations = (500 * tokens + (LAYERS - checkpointed) * per_layer + checkpointed * 100 * tokens
                   + (per_layer if checkpointed else 0) + (4 * tokens * VOCAB if cfg.loss_chunk <= 0 else 0))
    head = min(cfg.loss_chunk or tokens, tokens)
    parts = {"runtime": 1e6, "weights": 3e6, "gradients": 1e5, "optimizer": 2e6, "activations": activations,
             "backward transient": 16 * head * VOCAB, "allocator held": 0.2 * 1000 * tokens * LAYERS}
    peak = parts["runtime"] + parts["weights"] + parts["optimizer"] + max(
        activations + parts["backward transient"] + parts["allocator held"], parts["gradients"])
    return FakeEstimate(parts, {"tokens_per_micro_batch": tokens, "layers": LAYERS,
                                "activations_per_layer": per_layer}, peak)


class Peaks:
    def __init__(self, bf16: float, fp32: float):
        self.values, self.calls = {"bf16": bf16, "fp32": fp32}, []

    def __call__(self, device, dtype, threads, size=None, seconds=None):
        self.calls.append(dtype)
        return self.values[dtype]


def choose(recipe, bf16=0.1, fp32=0.2, budget=1e12, calls=None):
    def estimate(r):
        if calls is not None:
            calls.append(r)
        return fake_estimate(r)

    return choose_speed(recipe, CPU, peak=Peaks(bf16, fp32), estimate=estimate,
                        free_bytes=lambda device: (budget, "injected"))


def bare_recipe(*overrides):
    """The defaults (LoRA, nothing set) with these overrides."""
    return load_recipe(None, ["method.name=lora", *overrides])


def test_faster_bf16_is_chosen_with_bf16_frozen_weights():
    choice = choose(bare_recipe(), bf16=0.9, fp32=0.1)
    assert choice.recipe.train.precision == "bf16" and choice.recipe.model.frozen_dtype == "bf16"
    assert choice.lines[0].startswith("speed=auto: precision bf16 (bf16 0.9 vs fp32 0.1 TFLOP/s measured)")


def test_slower_bf16_gives_fp32_and_full_precision_frozen_weights():
    choice = choose(bare_recipe("train.speed=auto"), bf16=0.14, fp32=0.26)
    assert choice.recipe.train.precision == "fp32" and choice.recipe.model.frozen_dtype == "same"
    assert choice.changes["train.precision"] == "fp32"


def test_plentiful_memory_takes_whole_logits_no_checkpointing_and_the_largest_micro_batch():
    recipe = bare_recipe("train.batch_tokens=1024", "train.grad_accum=4")
    recipe.train.__pydantic_fields_set__ -= {"batch_tokens", "grad_accum"}  # as if the defaults were these
    choice = choose(recipe)
    cfg = choice.recipe.train
    assert cfg.loss_chunk == 0 and not cfg.activation_checkpointing
    assert cfg.batch_tokens == 4096 and cfg.grad_accum == 1  # the same tokens per optimizer step
    assert any("within" in line for line in choice.lines)


@pytest.mark.parametrize("share", [2.0, 0.6, 0.3])
def test_the_estimate_handed_on_is_of_the_chosen_settings(share):
    recipe = bare_recipe("data.max_length=4096")
    choice = choose(recipe, budget=share * _need(recipe))
    if choice.estimate is not None:  # the `estimate` verb prints it rather than estimating again
        assert choice.estimate.parts == fake_estimate(choice.recipe).parts
    assert share < 1 or choice.estimate is not None


def _need(recipe) -> float:
    return fake_estimate(recipe).peak_bytes


@pytest.mark.parametrize("share", [0.9, 0.6, 0.35, 0.2])
def test_tight_memory_picks_the_fastest_setting_that_fits(share):
    """Fastest first: whole logits, no checkpointing, large micro-batches; the choice fits the budget
    and every faster setting of the order does not."""
    recipe = bare_recipe("data.max_length=1024")
    budget = share * _need(recipe.model_copy(update={"train": recipe.train.model_copy(update={"loss_chunk": 0})}))
    calls = []
    choice = choose(recipe, budget=budget, calls=calls)
    cfg = choice.recipe.train
    assert _need(choice.recipe) <= budget
    assert cfg.batch_tokens * cfg.grad_accum == recipe.train.batch_tokens * recipe.train.grad_accum
    assert len(calls) <= 3  # one estimate, scaled; one per loss and one with checkpointing at most
    whole = recipe.model_copy(deep=True)
    whole.train.loss_chunk, whole.train.batch_tokens = 0, 1024  # the smallest micro-batch
    if cfg.loss_chunk == CHUNK:  # chunked only when no whole-logits micro-batch fits
        assert _need(whole) > budget
    if cfg.activation_checkpointing:  # checkpointing only when no micro-batch fits without it
        plain = whole.model_copy(deep=True)
        plain.train.loss_chunk = CHUNK
        assert _need(plain) > budget
        for n in (n for n in (8, 4, 3, 2, 1) if n > cfg.checkpoint_every):  # and then the fewest checkpointed
            fewer = plain.model_copy(deep=True)
            fewer.train.activation_checkpointing, fewer.train.checkpoint_every = True, n
            assert _need(fewer) > budget


def test_tighter_memory_moves_to_chunks_then_checkpointing():
    recipe = bare_recipe("data.max_length=4096")  # one micro-batch size: the loss and checkpointing must give
    need = _need(recipe.model_copy(update={"train": recipe.train.model_copy(update={"loss_chunk": 0})}))
    roomy, tight, tighter = (choose(recipe, budget=f * need).recipe.train for f in (1.1, 0.8, 0.3))
    assert roomy.loss_chunk == 0 and not roomy.activation_checkpointing
    assert tight.loss_chunk == CHUNK and not tight.activation_checkpointing
    assert tighter.loss_chunk == CHUNK and tighter.activation_checkpointing


def test_explicit_keys_are_kept_and_listed():
    recipe = bare_recipe("train.precision=bf16", "train.loss_chunk=256", "train.activation_checkpointing=true")
    choice = choose(recipe, bf16=0.1, fp32=0.3, budget=1.0)
    cfg = choice.recipe.train
    assert (cfg.precision, cfg.loss_chunk, cfg.activation_checkpointing) == ("bf16", 256, True)
    assert choice.recipe.model.frozen_dtype == "bf16"  # free: follows the bf16 compute
    kept = choice.lines[-1]
    assert kept.startswith("kept") and "train.precision" in kept and "train.loss_chunk" in kept
    assert not {"train.precision", "train.loss_chunk", "train.activation_checkpointing"} & set(choice.changes)


def test_explicit_bf16_frozen_weights_keep_bf16_compute():
    choice = choose(bare_recipe("model.frozen_dtype=bf16"), bf16=0.1, fp32=0.3)
    assert choice.recipe.train.precision == "bf16" and choice.recipe.model.frozen_dtype == "bf16"


def test_off_changes_nothing_and_measures_nothing():
    recipe = bare_recipe("train.speed=off")
    peaks, calls = Peaks(0.9, 0.1), []
    choice = choose_speed(recipe, CPU, peak=peaks, estimate=lambda r: calls.append(r),
                          free_bytes=lambda d: (1.0, "x"))
    assert choice.recipe is recipe and not choice.lines and not choice.changes
    assert not peaks.calls and not calls


def test_explicit_keys_survive_the_file_overrides_and_stages(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "lora-sft.yaml", ["train.loss_chunk=512"])
    given = explicit(recipe)
    assert {"train.loss_chunk", "train.batch_tokens", "train.grad_accum"} <= given
    assert "train.activation_checkpointing" not in given and "train.precision" not in given
    path = tmp_path / "staged.yaml"
    path.write_text(yaml.safe_dump({"method": {"name": "lora"}, "data": {"train": "a.jsonl"},
                                    "stages": [{"name": "one", "train": {"precision": "bf16"}}, {"name": "two"}]}))
    from tunesmith.train.stages import plan_stages

    choice = choose(load_recipe(path), bf16=0.1, fp32=0.3)
    one, two = (s.recipe for s in plan_stages(choice.recipe))
    assert choice.recipe.train.precision == "fp32" == two.train.precision  # the job's choice reaches the stages
    assert one.train.precision == "bf16"  # a stage's own key wins


def test_overrides_reproduce_the_choice():
    recipe = bare_recipe()
    choice = choose(recipe, bf16=0.1, fp32=0.3, budget=0.5 * _need(recipe))
    again = load_recipe(None, ["method.name=lora", *choice.overrides])
    for key in choice.changes:
        section, name = key.split(".")
        assert getattr(getattr(again, section), name) == getattr(getattr(choice.recipe, section), name)
    assert choose(again, bf16=0.9, fp32=0.1).recipe.train.precision == choice.recipe.train.precision


def test_a_resumed_run_keeps_its_first_choices(tmp_path):
    recipe = bare_recipe(f"output_dir={tmp_path}", "name=r", "resume=true")
    (tmp_path / "r").mkdir()
    first = choose(recipe, bf16=0.9, fp32=0.1)
    (tmp_path / "r" / "recipe.yaml").write_text(yaml.safe_dump(first.recipe.model_dump()))
    again = choose(recipe, bf16=0.1, fp32=0.9, budget=1.0)  # other peaks, no memory: the first choices stand
    assert again.recipe.train.precision == "bf16" == first.recipe.train.precision
    assert again.recipe.train.loss_chunk == first.recipe.train.loss_chunk
    assert again.lines[0].startswith("speed=auto: resume")


def test_processes_on_one_cpu_share_the_memory():
    recipe = bare_recipe("data.max_length=4096")
    need = _need(recipe.model_copy(update={"train": recipe.train.model_copy(update={"loss_chunk": 0})}))
    one = choose(recipe, budget=1.2 * need).recipe.train
    two = choose(bare_recipe("data.max_length=4096", "nproc=2"), budget=1.2 * need).recipe.train
    assert one.loss_chunk == 0 and two.loss_chunk == CHUNK


def test_objectives_without_an_estimate_keep_their_memory_keys():
    choice = choose(bare_recipe("objective.name=dpo"), bf16=0.1, fp32=0.3, budget=1.0)
    assert choice.recipe.train.precision == "fp32"
    assert choice.recipe.train.loss_chunk == 1024 and "no memory estimate" in " ".join(choice.lines)


def test_the_estimate_verb_prints_the_choice(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """End to end on a tiny model: the real estimate and a quick (cached) peak measurement."""
    from tunesmith.cli import main

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    assert main(["estimate", str(ROOT / "recipes" / "lora-sft.yaml"), f"model.name={tiny_model_dir}",
                 "train.threads=1", "train.batch_tokens=512", "data.max_length=512"]) == 0
    out = capsys.readouterr().out
    assert "speed=auto: precision" in out and "TFLOP/s measured" in out and "estimated peak" in out
    assert "kept (set in the recipe): train.batch_tokens, train.grad_accum" in out
