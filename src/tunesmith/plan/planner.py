"""The plan from start to end: candidates, what fits, pilots, prediction, ranking, the winner.

Everything the plan learns is kept in `<out>/plan.json`, written whole (aside, then renamed) after
every step that costs time, so the same command run again continues: the candidates and their
estimates are read back, pilots that finished are not rerun. The settings the plan was made with
are kept there too; another command over the same folder is an error rather than a mixed plan.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .candidates import (Candidate, PlanError, as_override, available_memory, enumerate_candidates,
                         estimate_fit, faster_precision, read_candidates, steps_for)
from .pilots import choose_pilot_steps, pilot_cost, rung_ends, successive_halving
from .predict import predict_final

VERSION = 1


@dataclass
class PlanSettings:
    recipe: str
    time_s: float
    overrides: list[str] = field(default_factory=list)
    memory_bytes: float | None = None  # None: this machine's available memory
    out: str | None = None  # None: plans/<recipe stem>
    methods: list[str] | None = None
    lrs: list[float] | str | None = None  # None: the grid; "default": the usual rate only
    ranks: list[int] | None = None
    batch_tokens: list[int] | None = None
    grad_accum: list[int] | None = None
    precision: str = "auto"
    pilot_steps: int | None = None
    pilot_time_s: float = 300.0
    pilots: bool = True
    candidates_file: str | None = None

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("plans") / Path(self.recipe).stem

    def fingerprint(self) -> dict:
        """What must match for a rerun to continue this plan (the folder itself is not part of it)."""
        return {k: v for k, v in asdict(self).items() if k != "out"}


def _loader(settings: PlanSettings):
    """load(overrides dict, extra list) -> the recipe with the user's and the candidate's overrides."""
    from ..recipe import load_recipe

    def load(over: dict, extra: list[str] = ()):
        return load_recipe(settings.recipe, [*settings.overrides, *(as_override(k, v) for k, v in over.items()),
                                             *extra])
    return load


def _read_state(path: Path, settings: PlanSettings) -> dict | None:
    import json

    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except ValueError:
        raise PlanError(f"{path}: not valid JSON; delete it to plan again") from None
    if state.get("version") != VERSION or state.get("settings") != settings.fingerprint():
        raise PlanError(f"{path} holds a plan made with other settings; give another --out, or delete it to "
                        "plan again")
    return state


def make_plan(settings: PlanSettings, say=print) -> dict:
    """Plan (or continue planning) and write plan.json, plan.md and winner.yaml into the out folder;
    returns the state. Raises PlanInterrupted (state saved) when a pilot is interrupted."""
    from ..jsonl import write_json
    from .report import write_outputs

    out = settings.out_dir
    load = _loader(settings)
    recipe = load({})
    if recipe.stages:
        raise PlanError(f"{settings.recipe}: tunesmith plan covers one-stage recipes; plan each stage's recipe")
    path = out / "plan.json"
    state = _read_state(path, settings) or {"version": VERSION, "settings": settings.fingerprint()}
    cands = [Candidate.from_json(c) for c in state.get("candidates", [])]

    def save() -> None:
        state["candidates"] = [c.to_json() for c in cands]
        write_json(path, state)

    if not cands:
        cands = _candidates(settings, recipe, load, state, say)
        save()
    else:
        say(f"[plan] continuing {path}: {sum(bool(c.fits) for c in cands)} of {len(cands)} candidates fit")
    fitting = [c for c in cands if c.fits]
    if not fitting:
        raise PlanError("no candidate fits: " + "; ".join(f"{c.label}: {c.note}" for c in cands[:4]))
    if settings.pilots:
        _pilots(settings, state, fitting, load, out, save, say)
    finish(cands, settings, state)
    save()
    write_outputs(out, state, cands, settings, load)
    return state


def _candidates(settings: PlanSettings, recipe, load, state: dict, say) -> list[Candidate]:
    """Enumerate (or read) the candidates and estimate each: memory, step time, steps in budget."""
    memory = settings.memory_bytes or available_memory(recipe.train.device)
    state["memory_gb"] = memory / 1e9
    if settings.candidates_file:
        cands = read_candidates(settings.candidates_file)
    else:
        cands = enumerate_candidates(recipe, settings.methods, settings.lrs, settings.ranks,
                                     settings.batch_tokens, settings.grad_accum)
        precision = faster_precision(recipe) if settings.precision == "auto" else settings.precision
        state["precision"] = precision
        for c in cands:
            c.overrides["train.precision"] = precision
            if precision == "fp32" and recipe.model.frozen_dtype != "same":
                # low-precision frozen weights pay off under autocast in that precision; in fp32 they
                # would be cast on every matmul (and methods that train base weights refuse them)
                c.overrides["model.frozen_dtype"] = "same"
    say(f"[plan] {len(cands)} candidates; memory budget {memory / 1e9:.2f} GB; final run {settings.time_s / 60:.1f} min")
    cache: dict = {}
    for i, c in enumerate(cands):
        estimate_fit(c, load, memory, cache, add_checkpointing=not settings.candidates_file)
        c.steps_in_budget = steps_for(settings.time_s, (c.estimate or {}).get("step_s"))
        c.step_s_source = "estimate" if c.steps_in_budget else None
        e = c.estimate or {}
        peak = f"{e['peak_gb']:.2f} GB" if e else "—"
        step = f"{e['step_s']:.2f} s/step" if e.get("step_s") else "no step time"
        say(f"[plan] estimate {i + 1}/{len(cands)} {c.label}: {peak}, {step} — "
            f"{'fits' if c.fits else 'dropped: ' + c.note}")
    return cands


def _pilots(settings: PlanSettings, state: dict, fitting: list[Candidate], load, out: Path, save, say) -> None:
    if "rungs" not in state:
        steps = settings.pilot_steps or choose_pilot_steps(
            settings.pilot_time_s, [c.estimate["step_s"] for c in fitting if c.estimate.get("step_s")])
        state["rungs"] = rung_ends(steps, len(fitting))
        save()
    ends = state["rungs"]
    cut = "; the worse half stops after each rung but the last" if len(ends) > 1 else ""
    say(f"[plan] pilots: {len(fitting)} candidates, rungs ending at steps {ends} "
        f"({pilot_cost(ends, len(fitting))} pilot steps in all{cut})")
    successive_halving(fitting, load, out / "pilots", ends, settings.time_s, save, say)
    state["pilot_wall_s"] = sum(c.pilot.get("wall_s", 0.0) for c in fitting)


def finish(cands: list[Candidate], settings: PlanSettings, state: dict) -> None:
    """Steps in budget (the pilot's measured step time where there is one), predictions, ranks, winner.
    Ranked: pilots that ran to the end by predicted loss; then those stopped early, later rungs first;
    without pilots, by tokens trained in the budget (no loss to compare)."""
    for c in cands:
        measured = c.pilot.get("step_s")
        if measured:
            c.steps_in_budget, c.step_s_source = steps_for(settings.time_s, measured), "pilot"
        if c.pilot.get("losses"):
            c.prediction = predict_final(c.pilot["losses"], [tuple(v) for v in c.pilot.get("val", [])],
                                         c.steps_in_budget)
            c.predicted_final_loss = c.prediction.get("predicted")
        c.rank = None

    def key(c: Candidate):
        loss = c.predicted_final_loss if c.predicted_final_loss is not None else math.inf
        if not settings.pilots:
            return (0, -(c.steps_in_budget or 0) * (c.estimate or {}).get("tokens_per_step", 1), 0.0)
        return (1 if c.pilot.get("stopped_early") else 0, -c.pilot.get("rung", -1), loss)

    ranked = sorted((c for c in cands if c.fits), key=key)
    for i, c in enumerate(ranked):
        c.rank = i + 1
    state["winner"] = ranked[0].label if ranked else None
