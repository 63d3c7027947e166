"""What a plan writes: the ranked table (plan.md, and printed), and the winner as a ready recipe."""
from __future__ import annotations

from pathlib import Path

from .candidates import Candidate

HOW = """\
**How the prediction is made.** Each pilot trains the candidate's recipe for a few steps (same seed,
so the same data in the same order for all; constant learning rate, no warm-up). Its per-step training
loss — each batch's loss before its update, data the model has not seen yet — is fitted with
L(t) = a + b·t^(−c) (least squares, a, b ≥ 0, c searched in [0.02, 2]) and read at the final run's step
count, the steps that fit the time budget at the pilot's measured step time. The gap between the
pilot's last validation loss and the fitted curve at that step is added: the prediction is a
validation loss. Under five pilot steps there is no curve; the last validation loss stands. Successive
halving stops the worse half of the pilots (by that prediction) at the end of every rung but the last.
A pilot whose loss rises, or whose gradient norm climbs while its loss stalls, is stopped with the
reason. The early gradient norm and early loss (means over the first rung) are Pareja et al.'s §12
signals — lower gradient norm and higher early loss tend to end better — shown for judgement, not
used in the rank. A few steps say little about thousands: read the prediction as a ranking aid, not
a promise; a cosine schedule usually ends a little below the constant-rate curve."""


def _f(x, fmt: str = ".4f") -> str:
    return "—" if x is None else format(x, fmt)


def rows(cands: list[Candidate]) -> list[list[str]]:
    out = []
    for c in sorted(cands, key=lambda c: (c.rank is None, c.rank or 0, c.label)):
        e, p = c.estimate or {}, c.pilot
        val = p.get("val") or []
        status = "not fit: " + c.note if not c.fits else \
            ("stopped: " + p.get("reason", "")) if p.get("stopped_early") else \
            ("pilot done" if p.get("steps_run") else "no pilot") + (f"; {c.note}" if c.note else "")
        step_s = p.get("step_s") or e.get("step_s")
        out.append([_f(c.rank, "d"), c.label, str(c.overrides.get("method.name", "")),
                    _f(c.overrides.get("train.lr"), ".2e"), _f(e.get("peak_gb"), ".2f"),
                    _f(step_s, ".2f") + (" (est.)" if step_s and not p.get("step_s") else ""),
                    _f(c.steps_in_budget, "d"), str(p.get("steps_run", 0)), _f(p.get("early_grad_norm"), ".3g"),
                    _f(p.get("early_loss")), _f(val[-1][1] if val else None), _f(c.predicted_final_loss), status])
    return out


HEADER = ["rank", "candidate", "method", "lr", "peak GB", "step s", "steps in budget", "pilot steps",
          "early grad norm", "early loss", "val loss", "predicted final loss", "status"]


def table(cands: list[Candidate], markdown: bool = True) -> str:
    body = rows(cands)
    if markdown:
        lines = ["| " + " | ".join(HEADER) + " |", "|---:|---|---|" + "---:|" * 9 + "---|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    cols = HEADER[:12]
    width = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(cols)]
    lines = ["  ".join(h.rjust(w) if i != 1 else h.ljust(w) for i, (h, w) in enumerate(zip(cols, width)))]
    for r in body:
        lines.append("  ".join(x.rjust(w) if i != 1 else x.ljust(w) for i, (x, w) in enumerate(zip(r, width)))
                     + ("" if r[-1].startswith("pilot done") else f"  {r[-1]}"))
    return "\n".join(lines)


def winner_recipe(winner: Candidate, load) -> tuple[object, str]:
    """The winner's complete recipe: the user's recipe with its overrides, train.steps set to what
    fits the budget, its own run folder; and the run's name."""
    base = load({})
    extra = [f"name={base.name}-{winner.label}", "resume=false"]
    if winner.steps_in_budget:
        extra.append(f"train.steps={winner.steps_in_budget}")
    return load(winner.overrides, extra=extra), f"{base.name}-{winner.label}"


def write_outputs(out: Path, state: dict, cands: list[Candidate], settings, load) -> None:
    """plan.md (the table and how it was made) and winner.yaml; the table is printed too."""
    from ..recipe import to_yaml

    out.mkdir(parents=True, exist_ok=True)
    winner = next((c for c in cands if c.label == state.get("winner")), None)
    why = "the faster on this machine's measured matmul peak" if settings.precision == "auto" else "as asked"
    precision = f"compute precision {state['precision']} ({why})." if state.get("precision") \
        else "each candidate's settings as given."
    head = [f"# Plan for `{settings.recipe}`", "",
            f"Final run budget {settings.time_s / 60:.1f} min; memory budget {state.get('memory_gb', 0):.2f} GB; "
            + precision]
    if state.get("rungs"):
        head.append(f"Pilots: rungs ending at steps {state['rungs']}, {state.get('pilot_wall_s', 0):.0f} s in all "
                    "(not part of the budget).")
    else:
        head.append("No pilots: ranked by the tokens each candidate trains in the budget (no loss to compare).")
    if winner is not None:
        recipe, name = winner_recipe(winner, load)
        (out / "winner.yaml").write_text(f"# tunesmith plan's winner: {winner.label}\n" + to_yaml(recipe))
        head += ["", f"**Winner: `{winner.label}`**"
                 + (f" — predicted final validation loss {winner.predicted_final_loss:.4f}"
                    if winner.predicted_final_loss is not None else "")
                 + f", {winner.steps_in_budget or 'the recipe’s'} steps. Train it: "
                 f"`tunesmith train {out / 'winner.yaml'}` (run folder `{recipe.run_dir}`)."]
        if winner.pilot.get("stopped_early"):
            head.append("Every pilot was stopped early: check the reasons before training the winner.")
    text = "\n".join(head + ["", table(cands), "", HOW, ""])
    (out / "plan.md").write_text(text)
