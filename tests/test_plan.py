"""`tunesmith plan`: the curve fit recovers a known power law, candidates enumerate and drop what
does not fit, successive halving stops the worse half, a plan interrupted after a pilot continues
without rerunning it and ends where an uninterrupted plan ends, and the winner's recipe trains."""
import json
import math
import random

import pytest
import yaml

from tests.conftest import write_chats
from tunesmith.plan import candidates as cand_mod
from tunesmith.plan import pilots, predict
from tunesmith.plan.candidates import Candidate, PlanError, enumerate_candidates, estimate_fit
from tunesmith.recipe import load_recipe

# ------------------------------------------------------------------------------------------------
# the prediction


@pytest.mark.parametrize("a,b,c", [(1.5, 2.0, 0.5), (0.8, 1.2, 0.25), (2.2, 0.6, 1.1)])
def test_fit_recovers_power_law(a, b, c):
    rng = random.Random(0)
    t = list(range(1, 41))
    y = [a + b * ti ** -c + rng.gauss(0, 0.002) for ti in t]
    fit = predict.fit_power_law(t, y)
    assert fit["a"] == pytest.approx(a, abs=0.05)
    assert fit["b"] == pytest.approx(b, rel=0.05)
    assert fit["c"] == pytest.approx(c, rel=0.08)
    truth = a + b * 1000 ** -c
    assert predict.power_law(fit, 1000) == pytest.approx(truth, abs=0.05)


def test_prediction_reads_the_curve_at_the_budget_plus_the_validation_gap():
    a, b, c = 1.0, 2.0, 0.5
    losses = [a + b * t ** -c for t in range(1, 13)]
    val_at_12 = losses[11] + 0.25  # validation sits 0.25 above the training curve
    out = predict.predict_final(losses, [(12, val_at_12)], steps=400)
    assert out["gap"] == pytest.approx(0.25, abs=1e-3)
    assert out["predicted"] == pytest.approx(a + b * 400 ** -c + 0.25, abs=2e-3)
    # too few steps for a curve: the last validation loss stands
    assert predict.predict_final(losses[:3], [(3, 2.5)], steps=400)["predicted"] == 2.5


def test_a_rising_curve_is_flat_at_its_mean():
    t = list(range(1, 11))
    fit = predict.fit_power_law(t, [1.0 + 0.1 * x for x in t])
    assert fit["b"] == 0.0 and fit["a"] == pytest.approx(1.55)


def test_stop_reasons():
    falling = [3.0 - 0.1 * i for i in range(12)]
    assert predict.stop_reason(falling, [0.01 * 2 ** i for i in range(12)]) is None  # LoRA: norm grows, loss falls
    rising = [2.0 + 0.1 * i for i in range(12)]
    assert "loss rose" in predict.stop_reason(rising, [1.0] * 12)
    stalled = [2.0 + 0.01 * (i % 2) for i in range(12)]
    assert "gradient norm climbed" in predict.stop_reason(stalled, [1.0] * 4 + [2.0] * 4 + [5.0] * 4)
    assert "not finite" in predict.stop_reason([2.0, math.nan, 1.0], [1.0] * 3)


def test_halve_keeps_the_lowest():
    kept, cut = predict.halve({"a": 2.0, "b": 1.0, "c": 3.0, "d": None, "e": 1.5}, keep=2)
    assert kept == ["b", "e"] and sorted(cut) == ["a", "c", "d"]


def test_rungs_and_their_cost():
    assert pilots.rung_ends(8, 6) == [4, 8]  # three rungs would start at 2 steps: two
    assert pilots.rung_ends(12, 6) == [3, 6, 12]
    assert pilots.rung_ends(13, 6) == [4, 8, 16]  # rounded up to whole rungs
    assert pilots.rung_ends(10, 1) == [10]
    assert pilots.pilot_cost([4, 8, 16], 6) == 6 * 4 + 3 * 4 + 2 * 8

    def seconds(steps):  # 10 s a step, 5 s a pilot run
        ends = pilots.rung_ends(steps, 6)
        return pilots.pilot_cost(ends, 6) * 10 + 5 * sum(math.ceil(6 / 2 ** i) for i in range(len(ends)))

    steps = pilots.choose_pilot_steps(600, [10.0] * 6)
    assert seconds(steps) <= 600 and all(seconds(s) > 600 for s in range(steps + 1, 41))
    assert pilots.choose_pilot_steps(10, [10.0] * 6) == 6  # nothing fits: the shortest useful pilot


def test_budgets_parse_and_reject():
    assert cand_mod.parse_time("30m") == 1800 and cand_mod.parse_time("1h30m") == 5400
    assert cand_mod.parse_time("90s") == 90 and cand_mod.parse_time("45") == 45
    assert cand_mod.parse_memory("8GB") == 8e9 and cand_mod.parse_memory("2GiB") == 2 * 2**30
    assert cand_mod.parse_memory("512MB") == 512e6
    for bad in ("soon", "30x", "0m"):
        with pytest.raises(PlanError, match="--time"):
            cand_mod.parse_time(bad)
    with pytest.raises(PlanError, match="--memory"):
        cand_mod.parse_memory("lots")


# ------------------------------------------------------------------------------------------------
# successive halving on synthetic pilots


def test_successive_halving_stops_the_worse_half(monkeypatch, tmp_path):
    """Six candidates whose curves differ by their floor; one diverges. Each rung keeps the better
    half by predicted loss; the diverging one is stopped for its own reason."""
    floors = {"c0": 1.0, "c1": 1.4, "c2": 1.2, "c3": 1.6, "c4": 1.1, "boom": 0.5}

    def fake_rung(cand, load, pilots_dir, ends, rung):
        n = ends[rung]
        if cand.label == "boom":
            losses = [2.0 + 0.2 * t for t in range(n)]
        else:
            losses = [floors[cand.label] + 2.0 * (t + 1) ** -0.5 for t in range(n)]
        cand.pilot.update(steps_run=n, losses=losses, grad_norms=[1.0] * n, step_s=1.0,
                          val=[[n, losses[-1]]], rung=rung)
        reason = predict.stop_reason(losses, [1.0] * n)
        if reason:
            cand.pilot.update(stopped_early=True, reason=reason)

    monkeypatch.setattr(pilots, "run_rung", fake_rung)
    cands = [Candidate(label, {}, fits=True, estimate={"step_s": 1.0}) for label in floors]
    saves = []
    pilots.successive_halving(cands, None, tmp_path, [4, 8, 16], 600.0, lambda: saves.append(1), lambda *_: None)
    by = {c.label: c.pilot for c in cands}
    assert "loss rose" in by["boom"]["reason"]
    survivors = [c.label for c in cands if not c.pilot.get("stopped_early")]
    assert survivors == ["c0", "c4"]  # 5 -> 3 (c0, c4, c2) -> 2 (c0, c4), who run the last rung
    assert by["c0"]["rung"] == by["c4"]["rung"] == 2
    for label in ("c1", "c3"):
        assert by[label]["rung"] == 0 and by[label]["reason"].startswith("halved after rung 1")
    assert by["c2"]["rung"] == 1 and by["c2"]["reason"].startswith("halved after rung 2")
    assert len(saves) == 6 + 1 + 3 + 1 + 2  # after every pilot and every cut


# ------------------------------------------------------------------------------------------------
# the tiny model, end to end


@pytest.fixture(scope="module")
def plan_recipe(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    data = write_chats(root / "chats.jsonl", n=48)
    recipe = {"name": "tiny", "output_dir": str(root / "runs"), "model": {"name": str(tiny_model_dir)},
              "data": {"train": str(data), "val_fraction": 0.2, "max_length": 128},
              "method": {"name": "lora", "lora": {"rank": 4, "alpha": 8}},
              "train": {"batch_tokens": 256, "lr": 1e-2, "precision": "fp32", "epochs": 1}}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_candidates_enumerate_and_filter_by_memory(plan_recipe):
    recipe = load_recipe(plan_recipe)
    cands = enumerate_candidates(recipe, ["lora", "full"], ranks=[2, 4])
    labels = [c.label for c in cands]
    assert labels[:3] == ["lora-r2-lr1.0e-2", "lora-r2-lr3.3e-3", "lora-r2-lr3.0e-2"]  # the recipe's lr ×1, ×⅓, ×3
    assert len(cands) == 2 * 3 + 3 and labels[-1] == "full-lr6.0e-5"  # full takes no rank: usual 2e-5 grid
    assert cands[-1].overrides == {"method.name": "full", "train.lr": 6e-5}

    def load(over, extra=()):
        return load_recipe(plan_recipe, [cand_mod.as_override(k, v) for k, v in over.items()] + list(extra))

    cache = {}
    pair = [Candidate("lora", {"method.name": "lora"}), Candidate("full", {"method.name": "full"})]
    for c in pair:
        estimate_fit(c, load, 1e15, cache)
    lora_gb, full_gb = (c.estimate["peak_gb"] for c in pair)
    assert full_gb > lora_gb and all(c.fits for c in pair)
    between = (lora_gb + 0.2 * (full_gb - lora_gb)) * 1e9  # the same (cached) estimates, a budget between them
    pair = [Candidate("lora", {"method.name": "lora"}), Candidate("full", {"method.name": "full"})]
    for c in pair:
        estimate_fit(c, load, between, cache)
    assert pair[0].fits and not pair[1].fits
    assert pair[1].estimate["peak_gb"] > between / 1e9
    assert f"> memory {between / 1e9:.2f} GB" in pair[1].note


def _fixed_step_time(monkeypatch):
    """Pilots' step times as a fixed 0.5 s: the budget's step count, hence every prediction and cut,
    then depends on the losses alone (on a busy machine measured times vary from run to run)."""
    real = pilots.read_pilot

    def read(run_dir):
        out = real(run_dir)
        return {**out, "step_s": 0.5 if out["step_s"] else None}
    monkeypatch.setattr(pilots, "read_pilot", read)


def _plan(plan_recipe, out, *extra):
    from tunesmith.cli import main

    return main(["plan", str(plan_recipe), "--time", "1m", "--out", str(out), "--methods", "lora,full",
                 "--precision", "fp32", "--pilot-steps", "8", *extra])


def _pilot_curves(out):
    state = json.loads((out / "plan.json").read_text())
    return {c["label"]: (c["pilot"].get("losses"), c["rank"], c["predicted_final_loss"]) for c in state["candidates"]}


@pytest.fixture(scope="module")
def full_plan(plan_recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan-out") / "whole"
    with pytest.MonkeyPatch.context() as mp:
        _fixed_step_time(mp)
        assert _plan(plan_recipe, out) == 0
    return out


def test_plan_end_to_end(full_plan, capsys):
    state = json.loads((full_plan / "plan.json").read_text())
    cands = state["candidates"]
    assert state["rungs"] == [4, 8] and len(cands) == 6 and all(c["fits"] for c in cands)
    for c in cands:
        assert c["estimate"]["peak_gb"] > 0 and c["pilot"]["steps_run"] in (4, 8)
        assert len(c["pilot"]["losses"]) == len(c["pilot"]["grad_norms"]) == c["pilot"]["steps_run"]
        assert c["pilot"]["val"] and c["predicted_final_loss"] is not None
    halved = [c for c in cands if c["pilot"].get("reason", "").startswith("halved")]
    finished = [c for c in cands if c["pilot"]["steps_run"] == 8]
    assert len(finished) + len(halved) + sum(
        1 for c in cands if c["pilot"].get("stopped_early") and not c["pilot"]["reason"].startswith("halved")) == 6
    assert len(finished) <= 3 and finished
    ranks = sorted(c["rank"] for c in cands)
    assert ranks == list(range(1, 7))
    winner = next(c for c in cands if c["rank"] == 1)
    assert state["winner"] == winner["label"] and winner["pilot"]["steps_run"] == 8
    assert winner["steps_in_budget"] == 120 and winner["step_s_source"] == "pilot"  # 1 min at 0.5 s a step
    assert all(winner["predicted_final_loss"] <= c["predicted_final_loss"] for c in finished)
    plan_md = (full_plan / "plan.md").read_text()
    assert f"**Winner: `{winner['label']}`**" in plan_md and "How the prediction is made" in plan_md
    assert not (full_plan / "pilots" / winner["label"] / "checkpoints").exists()  # done pilots keep no weights


def test_winner_recipe_loads_and_trains(full_plan):
    from tunesmith.train.loop import train

    state = json.loads((full_plan / "plan.json").read_text())
    winner = next(c for c in state["candidates"] if c["label"] == state["winner"])
    recipe = load_recipe(full_plan / "winner.yaml")
    assert recipe.train.steps == winner["steps_in_budget"] > 0
    assert recipe.train.lr == winner["overrides"]["train.lr"]
    assert recipe.method.name == winner["overrides"]["method.name"]
    assert recipe.name == f"tiny-{winner['label']}" and recipe.train.schedule == "cosine"  # the recipe's own
    assert recipe.run_dir.parent.name == "runs"  # the recipe's own output_dir
    result = train(load_recipe(full_plan / "winner.yaml", ["train.steps=2", "train.save_every=0"]))
    assert result.status == "completed" and result.step == 2


def test_interrupted_plan_continues_without_rerunning(plan_recipe, full_plan, tmp_path, monkeypatch):
    """Stop the plan inside the second pilot (as Ctrl-C would: the harness checkpoints mid-rung);
    the rerun leaves the first pilot alone, resumes the second, and ends where the plan that was
    never interrupted ended."""
    from tunesmith.train import loop

    real, calls = loop.train, []

    def stop_second(recipe, **kw):
        calls.append(recipe.name)
        if len(calls) == 2:
            with loop.stopping_after(2):
                return real(recipe, **kw)
        return real(recipe, **kw)

    out = tmp_path / "again"
    _fixed_step_time(monkeypatch)
    monkeypatch.setattr(loop, "train", stop_second)
    assert _plan(plan_recipe, out) == 130
    first, second = calls
    state = json.loads((out / "plan.json").read_text())
    assert state["candidates"][0]["pilot"]["steps_run"] == 4 and state["candidates"][1]["pilot"]["steps_run"] == 2

    calls.clear()
    monkeypatch.setattr(loop, "train", lambda recipe, **kw: (calls.append(recipe.name), real(recipe, **kw))[1])
    assert _plan(plan_recipe, out) == 0
    assert calls[0] == second and first not in calls[:5] and len(calls[:5]) == 5  # rung 1: the other five
    again, whole = _pilot_curves(out), _pilot_curves(full_plan)
    assert again.keys() == whole.keys()
    for label, (losses, rank, predicted) in whole.items():
        assert again[label][0] == pytest.approx(losses, rel=1e-5)
        assert again[label][1] == rank
    # and a third run only reads: no pilot trains again
    calls.clear()
    assert _plan(plan_recipe, out) == 0 and calls == []


def test_settings_mismatch_and_bad_candidate_file(plan_recipe, full_plan, tmp_path, capsys):
    assert _plan(plan_recipe, full_plan, "--lrs", "default") == 2
    assert "other settings" in capsys.readouterr().err
    bad = tmp_path / "c.yaml"
    bad.write_text("- {label: a, overrides: {train.lr: 1e-3}, extra: 1}\n")
    assert _plan(plan_recipe, tmp_path / "x", "--candidates", str(bad)) == 2
    assert f"{bad}: item 1" in capsys.readouterr().err


def test_candidate_file_plans_exactly_those(plan_recipe, tmp_path):
    from tunesmith.cli import main

    cfile = tmp_path / "cands.yaml"
    cfile.write_text(yaml.safe_dump([{"label": "mine-a", "overrides": {"train.lr": 3e-3, "method.lora.rank": 2}},
                                     {"label": "mine-b", "overrides": {"method.name": "ia3"}}]))
    out = tmp_path / "cf"
    assert main(["plan", str(plan_recipe), "--time", "30s", "--out", str(out), "--candidates", str(cfile),
                 "--no-pilots"]) == 0
    state = json.loads((out / "plan.json").read_text())
    assert [c["label"] for c in state["candidates"]] == ["mine-a", "mine-b"]
    assert state["candidates"][0]["overrides"] == {"train.lr": 3e-3, "method.lora.rank": 2}
    assert all(c["pilot"] == {} for c in state["candidates"])
    # no pilots, no loss: ranked by the tokens each trains in the budget
    work = {c["label"]: c["steps_in_budget"] * c["estimate"]["tokens_per_step"] for c in state["candidates"]}
    assert state["winner"] == max(work, key=work.get)
    recipe = load_recipe(out / "winner.yaml")
    assert recipe.name.startswith("tiny-mine-")


def test_example_candidate_file_is_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cands = cand_mod.read_candidates(root / "examples/plan/candidates.yaml")
    assert [c.label for c in cands] == ["lora-r8", "lora-r32", "dora-r16", "full-big-batch"]
    for c in cands:  # every override is a recipe key with a valid value
        recipe = load_recipe(root / "recipes/lora-sft.yaml", c.override_list())
        assert recipe.method.name == c.overrides["method.name"]
        assert recipe.train.lr == c.overrides["train.lr"]
