"""Short pilot runs of the candidates that fit, in successive halving: every survivor trains to the
first rung's step, the worse half (by the loss predicted for the final run) stops, the rest go on
to the next rung, and so on. A pilot is an ordinary `tunesmith train` run of the candidate's recipe
in `pilots/<label>/` — the same seed, so every candidate sees the same data in the same order — at a
constant learning rate without warm-up (§12: no worse than warm-up and decay, and its loss curve
has no schedule in it to extrapolate through).

Each rung is the harness stopping the run at the rung's step, as an interrupt would: it writes a
checkpoint there, and the next rung resumes from it. The plan's state (plan.json) is written after
every pilot, so a plan stopped anywhere continues where it was: finished pilots are not rerun, an
interrupted one resumes from its last rung's checkpoint (or starts again when it had none).
"""
from __future__ import annotations

import contextlib
import math
import shutil
import time
from pathlib import Path
from statistics import median

from .candidates import Candidate, steps_for
from .predict import early_signals, halve, predict_final, stop_reason

MIN_RUNG = 3  # steps: a rung shorter than this measures noise


class PlanInterrupted(Exception):
    """A pilot was interrupted (Ctrl-C): the state is saved, the same command continues."""


def rung_ends(pilot_steps: int, candidates: int) -> list[int]:
    """The step at which each rung ends: log2(candidates) rungs (at most 3), each twice the last,
    the first at least MIN_RUNG steps; the total rounded up so the rungs are whole."""
    k = min(3, max(1, math.ceil(math.log2(max(candidates, 1)))))
    while k > 1 and pilot_steps / 2 ** (k - 1) < MIN_RUNG:
        k -= 1
    first = math.ceil(pilot_steps / 2 ** (k - 1))
    return [first * 2 ** i for i in range(k)]


def pilot_cost(ends: list[int], candidates: int) -> int:
    """Steps all pilots take together when each rung keeps the better half."""
    total, alive, last = 0, candidates, 0
    for end in ends:
        total += alive * (end - last)
        alive, last = math.ceil(alive / 2), end
    return total


def choose_pilot_steps(seconds: float, step_s: list[float], overhead_s: float = 5.0,
                       low: int = 6, high: int = 40) -> int:
    """The most pilot steps (low..high) whose halving schedule fits `seconds`, from the candidates'
    estimated step times (their mean; `overhead_s` per pilot run for loading and validation);
    `low` when even that does not fit (a pilot shorter than that says nothing)."""
    if not step_s:
        return 10
    mean_s, n = sum(step_s) / len(step_s), len(step_s)
    best = low
    for steps in range(low, high + 1):
        ends = rung_ends(steps, n)
        runs = sum(math.ceil(n / 2 ** i) for i in range(len(ends)))
        if pilot_cost(ends, n) * mean_s + runs * overhead_s <= seconds:
            best = steps
    return best


def pilot_overrides(cand: Candidate, pilots_dir: Path, ends: list[int], recipe) -> list[str]:
    """The pilot's overrides over the candidate's recipe: its folder, length, constant lr, a checkpoint
    only where a rung stops, validation at every rung's end, no generation eval."""
    extra = [f"name={cand.label}", f"output_dir={pilots_dir}", "resume=true", f"train.steps={ends[-1]}",
             "train.schedule=constant", "train.warmup=0", "train.save_every=0", "train.keep_last=1",
             f"train.eval_every={ends[0]}", "train.log_every=1", "eval.task=null", "eval.every=0"]
    if recipe.data.validation is None and recipe.data.val_fraction == 0:
        extra.append("data.val_fraction=0.05")  # a small held-out slice for validation loss
    if recipe.train.eval_batches == 0:
        extra.append("train.eval_batches=8")
    return extra


def read_pilot(run_dir: Path) -> dict:
    """Per-step losses, gradient norms, step times and (step, validation loss) from metrics.jsonl."""
    from ..train.metrics import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    return {"steps_run": len(steps), "losses": [r["loss"] for r in steps],
            "grad_norms": [r["grad_norm"] for r in steps],
            "step_s": median([r["step_s"] for r in steps]) if steps else None,
            "val": [[r["step"], r["val_loss"]] for r in rows if "val_loss" in r]}


def run_rung(cand: Candidate, load, pilots_dir: Path, ends: list[int], rung: int) -> None:
    """Train the candidate's pilot to the end of `rung` (resuming its last rung's checkpoint) and
    record the result in `cand.pilot`; a run the guard stopped is recorded as stopped, with why."""
    from ..methods import MethodError
    from ..train import checkpoint as ckpt
    from ..train.loop import TrainError, stopping_after, train

    run_dir = pilots_dir / cand.label
    recipe = load(cand.overrides, extra=pilot_overrides(cand, pilots_dir, ends, load(cand.overrides)))
    t0, error, result = time.perf_counter(), None, None
    try:
        last = ckpt.latest_checkpoint(run_dir, verified=True, note=lambda *_: None)
    except ckpt.CheckpointError:  # killed while writing its only checkpoint: start this pilot again
        shutil.rmtree(run_dir)
        last = None
    done = last is not None and last.name == f"{ckpt.PREFIX}{ends[rung]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "a") as log, contextlib.redirect_stdout(log), stopping_after(ends[rung]):
        try:
            if not done:  # (stopped after this rung's checkpoint but before the plan recorded it: read it)
                result = train(recipe)
        except (TrainError, MethodError) as e:  # the divergence guard, or a method that cannot run here
            error = str(e).splitlines()[0]
    pilot = cand.pilot
    pilot["wall_s"] = pilot.get("wall_s", 0.0) + time.perf_counter() - t0
    pilot.update(read_pilot(run_dir))
    if result is not None and result.step < ends[rung]:
        raise PlanInterrupted(f"pilot {cand.label} interrupted at step {result.step}")
    pilot["rung"] = rung
    reason = error or stop_reason(pilot["losses"], pilot["grad_norms"])
    if reason:
        pilot.update(stopped_early=True, reason=reason)
    early = early_signals(pilot["losses"], pilot["grad_norms"], ends[0])
    pilot.update(early)


def score(cand: Candidate, seconds: float) -> float | None:
    """The candidate's predicted final validation loss from its pilot so far (lower is better)."""
    p = cand.pilot
    steps = steps_for(seconds, p.get("step_s") or (cand.estimate or {}).get("step_s"))
    return predict_final(p.get("losses", []), [tuple(v) for v in p.get("val", [])], steps)["predicted"]


def tidy(run_dir: Path) -> None:
    """A pilot that is done keeps its curve (metrics, log, resolved recipe, report), not its weights."""
    for name in ("checkpoints", "adapter", "model", "tb"):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def successive_halving(cands: list[Candidate], load, pilots_dir: Path, ends: list[int], seconds: float,
                       save, say) -> None:
    """Run the rungs; `save()` writes the plan's state after every pilot and every cut. Each cut is
    recorded on the candidates it judged (`judged`: the rung), so a continued plan never cuts twice."""
    for rung, end in enumerate(ends):
        todo = [c for c in cands if c.fits and not c.pilot.get("stopped_early") and c.pilot.get("rung", -1) < rung]
        entered = [c for c in cands if c.fits and c.pilot.get("rung", -1) >= rung - 1
                   and not (c.pilot.get("stopped_early") and c.pilot.get("rung", -1) < rung)]
        for cand in todo:
            start = ends[rung - 1] if rung else 0
            say(f"[plan] rung {rung + 1}/{len(ends)} pilot {entered.index(cand) + 1}/{len(entered)}: {cand.label} "
                f"steps {start + 1}-{end} ...")
            try:
                run_rung(cand, load, pilots_dir, ends, rung)
            finally:
                save()
            say(f"[plan]   {describe(cand, seconds)}")
        if rung + 1 < len(ends):
            _cut(cands, rung, seconds, save, say)
        for c in cands:
            if c.pilot.get("stopped_early") or (c.pilot.get("rung") == len(ends) - 1):
                tidy(pilots_dir / c.label)


def _cut(cands: list[Candidate], rung: int, seconds: float, save, say) -> None:
    """After `rung`: of the pilots that ran it and were not stopped for their own reason, the worse
    half (by predicted final loss) stops."""
    pool = [c for c in cands if c.fits and c.pilot.get("rung", -1) >= rung
            and not (c.pilot.get("stopped_early") and "cut_after" not in c.pilot and c.pilot["rung"] <= rung)]
    if len(pool) < 2 or all(c.pilot.get("judged", -1) >= rung for c in pool):
        return
    scores = {c.label: score(c, seconds) for c in pool}
    kept, cut = halve(scores, math.ceil(len(pool) / 2))
    bar = max(scores[k] for k in kept) if kept else None
    for c in pool:
        c.pilot["judged"] = rung
        if c.label in cut:
            c.pilot.update(stopped_early=True, cut_after=rung, reason=f"halved after rung {rung + 1}: predicted "
                           f"{_num(scores[c.label])} vs the kept half's worst {_num(bar)}")
            say(f"[plan]   stop {c.label}: {c.pilot['reason']}")
    save()


def _num(x) -> str:
    return "—" if x is None else f"{x:.4f}"


def describe(cand: Candidate, seconds: float) -> str:
    p = cand.pilot
    losses, val = p.get("losses") or [], p.get("val") or []
    text = f"{cand.label}: {p.get('steps_run', 0)} steps"
    if losses:
        text += f", loss {losses[0]:.3f} → {losses[-1]:.3f}"
    if val:
        text += f", val {val[-1][1]:.3f}"
    if p.get("grad_norms"):
        text += f", grad norm {p['grad_norms'][-1]:.3g}"
    if p.get("step_s"):
        text += f", {p['step_s']:.2f} s/step"
    text += f", predicted {_num(score(cand, seconds))}"
    return text + (f" — stopped: {p['reason']}" if p.get("stopped_early") else "")
