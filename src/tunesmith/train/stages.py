"""Recipe stages: several trainings in order, run as one resumable job.

    stages:
      - name: general                  # its run folder: <run>/general
        data: {train: all-pairs.jsonl}
        train: {lr: 2.0e-4, steps: 400}
      - name: target
        data: {train: en-xx.jsonl}
        train: {lr: 1.0e-4, epochs: 2}

Each stage is one `train` run of the recipe with the stage's data/train/eval keys laid over the
recipe's own sections, in `<run>/<stage name>`. The model carries over: a stage starts from the
previous stage's saved output — its adapter (`model.adapter`: the same method keeps training) or,
for a method that trains base weights, its saved model (`model.name`). Each stage has its own
optimizer, schedule and step count, as the phases of a phased (Orca-style) recipe do.

`stage_mode: stacked` runs what the SFT study (methods.md §12) compares phased training with: one
run over all the stages' training sources at once (joined with `+`, a mix), under the recipe's own
train section, with the stages' steps summed when every stage counts steps.

One job: `<run>/stages.json` records each finished stage with a fingerprint of its resolved recipe.
`resume=true` skips finished stages (refusing one whose recipe changed since it ran) and resumes the
interrupted stage from its newest checkpoint. That reproduces the uninterrupted job exactly: the
stage's data position and optimizer state are in its checkpoint, and in both cases the stage starts
from the previous stage's output as saved on disk. `<run>/adapter` (or `<run>/model`) links to the
last stage's output, so `--adapter <run>` works as for a single run; `<run>/report.md` sums it up.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import recipe as rcp
from ..config import RecipeError
from ..plots import plot_curves
from . import checkpoint as ckpt
from .metrics import read_metrics
from .safety import TrainError

STATE_FILE = "stages.json"
# keys that change how or where a stage runs, not what it computes: changing them does not void a
# finished stage (a job folder may move: its stages' outputs are recorded relative to it)
_RUNTIME_KEYS = (("resume",), ("nproc",), ("output_dir",), ("train", "threads"), ("train", "device"),
                 ("train", "log_every"), ("train", "dist_timeout"))


@dataclass
class Stage:
    name: str
    recipe: rcp.Recipe  # the stage's own single-run recipe (no stages), its run folder <job>/<name>

    @property
    def fingerprint(self) -> str:
        values = rcp.to_dict(self.recipe)
        for path in _RUNTIME_KEYS:
            node = values
            for key in path[:-1]:
                node = node.get(key, {})
            node.pop(path[-1], None)
        text = yaml.safe_dump(values, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# the plan: every stage's recipe, built (and so checked) before anything trains


def plan_stages(recipe: rcp.Recipe) -> list[Stage]:
    """The stages of a recipe as single-run recipes: in order (phased), or one over all (stacked)."""
    phased = [Stage(s.name, _stage_recipe(recipe, s)) for s in recipe.stages]
    return [_stacked(recipe, phased)] if recipe.stage_mode == "stacked" else phased


def _base_values(recipe: rcp.Recipe, name: str) -> dict:
    values = rcp.to_dict(recipe)
    values.pop("stages", None)
    values.pop("stage_mode", None)
    values["output_dir"], values["name"] = str(recipe.run_dir), name
    return values


def _build(values: dict, where: str) -> rcp.Recipe:
    try:
        return rcp.recipe_from_dict(values)
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}", e.loc) from None


def _stage_recipe(recipe: rcp.Recipe, stage) -> rcp.Recipe:
    values = _base_values(recipe, stage.name)
    for section in ("data", "train", "eval"):
        values[section].update(getattr(stage, section).model_dump())
    return _build(values, f"stage `{stage.name}`")


def _stacked(recipe: rcp.Recipe, phased: list[Stage]) -> Stage:
    """One run over every stage's training data, mixed (`a+b`), with the recipe's own train section."""
    if any(getattr(s.recipe.data, "mix", None) for s in phased):
        raise RecipeError("stage_mode=stacked joins the stages' data.train sources, and a stage uses data.mix: "
                          "list every source in the recipe's data.mix instead (no stages)")
    values = _base_values(recipe, "stacked")
    values["data"]["train"] = "+".join(_unique(s.recipe.data.train for s in phased))
    validation = _unique(s.recipe.data.validation for s in phased if s.recipe.data.validation)
    values["data"]["validation"] = "+".join(validation) if validation else None
    steps = [s.recipe.train.steps for s in phased]
    if all(steps):
        values["train"]["steps"] = sum(steps)
    return Stage("stacked", _build(values, "stage_mode=stacked"))


def _unique(items) -> list:
    return list(dict.fromkeys(items))


# --------------------------------------------------------------------------------------------------
# the job


def run_stages(recipe: rcp.Recipe, *, model=None, tokenizer=None, objective=None):
    """Train the recipe's stages in order as one job (see the module docstring); returns a RunResult
    for the whole job: its folder, status, steps summed over the stages, the last stage's output."""
    from .loop import keeping_process_group

    stages = plan_stages(recipe)
    job, main = recipe.run_dir, int(os.environ.get("RANK", "0")) == 0
    state = _open_job(recipe, stages, main)
    if main:  # the whole job's recipe beside the stages' own
        (job / "recipe.yaml").write_text(rcp.to_yaml(recipe))
    with keeping_process_group():  # under torchrun: one process group for all the stages
        return _run(recipe, stages, state, main, model, tokenizer, objective)


def _run(recipe: rcp.Recipe, stages: list[Stage], state: dict, main: bool, model, tokenizer, objective):
    from .loop import RunResult, train

    job = recipe.run_dir
    pristine = copy.deepcopy(model) if model is not None and len(stages) > 1 else None
    previous = None
    for i, stage in enumerate(stages):
        done = state["stages"][i]
        if done.get("status") == "completed":
            previous = job / done["output"]  # recorded relative to the job folder, which may have moved
            _note(main, f"stage {i + 1}/{len(stages)} `{stage.name}`: finished earlier → {previous}")
            continue
        run = stage.recipe
        stage_model = model if i == 0 else None
        if previous is not None:
            stage_model = _carry(run, previous, pristine)
        run.resume = recipe.resume and bool(ckpt.list_checkpoints(run.run_dir))
        _note(main, f"stage {i + 1}/{len(stages)} `{stage.name}`" + (f", from {previous}" if previous else ""))
        result = train(run, model=stage_model, tokenizer=tokenizer, objective=objective)
        done.update(status=result.status, steps=result.step, total_steps=result.total_steps,
                    output=os.path.relpath(result.output, job) if result.output else None)
        if main:
            _write_state(job, state)
        if result.status != "completed":
            return RunResult(job, result.status, *_steps(state), summary={"stages": state["stages"]})
        previous = result.output or _saved_output(run.run_dir)  # other ranks: what rank 0 saved
    if main:
        _link_output(job, previous)
        _write_report(job, stages, state)
    return RunResult(job, "completed", *_steps(state), output=previous, summary={"stages": state["stages"]})


def _open_job(recipe: rcp.Recipe, stages: list[Stage], main: bool) -> dict:
    """The job's state, written at once (a job killed in its first stage resumes too): fresh, or
    (resume=true) the recorded one, its finished stages checked against the plan. A job that has
    made progress (a finished stage, a stage checkpoint) is only continued, never started over."""
    job = recipe.run_dir
    path = job / STATE_FILE
    recorded = json.loads(path.read_text()).get("stages", []) if path.is_file() else []
    progress = any(e.get("status") == "completed" for e in recorded) or \
        any(ckpt.list_checkpoints(job / s.name) for s in stages)
    if progress and not recipe.resume:
        raise TrainError(f"{job} already holds a staged run: continue it with resume=true, "
                         "or start a new run with name=<new name>")
    planned = [{"name": s.name, "fingerprint": s.fingerprint, "status": "pending"} for s in stages]
    for i, entry in enumerate(recorded if recipe.resume else []):
        if entry.get("status") != "completed":
            break
        if i >= len(stages) or (entry["name"], entry["fingerprint"]) != (stages[i].name, stages[i].fingerprint):
            now = f"`{stages[i].name}`" if i < len(stages) else "nothing"
            raise TrainError(f"stage {i + 1} `{entry['name']}` finished under another recipe (now: {now}); "
                             "resuming would build on a different model: start a new run with name=<new name>")
        planned[i] = entry
    state = {"stage_mode": recipe.stage_mode, "stages": planned}
    if main:
        _write_state(job, state)
    return state


def _carry(run: rcp.Recipe, previous: Path, pristine):
    """Start `run` from the previous stage's output; returns the model object to pass to it (a
    fresh copy of a model given in memory, for an adapter; None to load from disk)."""
    if previous.name == "model":  # the method trained base weights: the saved model is the new base
        run.model.name, run.model.adapter = str(previous), None
        return None
    run.model.adapter = str(previous)
    return copy.deepcopy(pristine) if pristine is not None else None


def _saved_output(run_dir: Path) -> Path:
    """A finished run's output folder: its adapter, or the model of a method that trains base weights."""
    return run_dir / "adapter" if (run_dir / "adapter").is_dir() else run_dir / "model"


def _steps(state: dict) -> tuple[int, int]:
    entries = state["stages"]
    return sum(e.get("steps", 0) for e in entries), sum(e.get("total_steps", 0) for e in entries)


def _write_state(job: Path, state: dict) -> None:
    job.mkdir(parents=True, exist_ok=True)
    tmp = job / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, job / STATE_FILE)


def _link_output(job: Path, output: Path | None) -> None:
    """`<job>/adapter` (or `model`) → the last stage's output, relative so the folder can move."""
    if output is None:
        return
    link = job / output.name
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(output, job))


def _note(main: bool, text: str) -> None:
    if main:
        print(f"[tunesmith] {text}", flush=True)


# --------------------------------------------------------------------------------------------------
# the job's report


def _write_report(job: Path, stages: list[Stage], state: dict) -> Path:
    """`<job>/report.md`: a row per stage and the loss of all stages on one step axis."""
    lines = [f"# Staged run `{job.name}` ({state['stage_mode']})", "",
             "| stage | data.train | lr · schedule · warm-up | steps | first / last train loss | validation loss | output |",
             "|---|---|---|---|---|---|---|"]
    curves, offset = {}, 0
    for stage, entry in zip(stages, state["stages"]):
        rows = read_metrics(job / stage.name / "metrics.jsonl")
        train = [r for r in rows if "loss" in r]
        val = [r["val_loss"] for r in rows if "val_loss" in r]
        cfg = stage.recipe.train
        losses = f"{train[0]['loss']:.4f} / {train[-1]['loss']:.4f}" if train else "–"
        output = entry.get("output") or "–"
        lines.append(f"| [{stage.name}]({stage.name}/report.md) | `{stage.recipe.data.train}` | {cfg.lr:g} · "
                     f"{cfg.schedule} · {cfg.warmup:g} | {entry.get('steps', 0)} | {losses} | "
                     f"{f'{val[-1]:.4f}' if val else '–'} | {output} |")
        curves[stage.name] = [(offset + r["step"], r["loss"]) for r in train]
        offset += entry.get("steps", 0)
    lines.append("")
    if plot_curves(curves, job / "loss.png", "loss (nats/token)"):
        lines += ["## Loss, stage after stage", "", "![loss curves](loss.png)", ""]
    path = job / "report.md"
    path.write_text("\n".join(lines))
    return path
