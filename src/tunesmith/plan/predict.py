"""From a pilot's first steps to the final run's loss, and the early signals that stop a pilot.

The prediction: the pilot's per-step training loss (the loss of each step's batch before its update:
on the first epoch, data the model has not yet seen) is fitted with a saturating power law
L(t) = a + b·t^(−c) — the shape loss curves take in steps — and read at the final run's step count
T. The exponent c is searched on a log grid and refined; for each c, a and b are the linear least
squares (with a ≥ 0 and b ≥ 0: a curve that rises is flat at its mean). The gap between validation
and training loss at the pilot's last validation is added, so the number is a validation loss.
With fewer than `MIN_FIT` points there is no curve: the last validation (else training) loss stands.

The early signals (Pareja et al., §12): lower gradient norm and higher training loss early predict
the better final model, so both are reported; a pilot whose loss rises, or whose gradient norm
climbs while its loss stalls, is stopped early with the reason.
"""
from __future__ import annotations

import math
from statistics import fmean, median

MIN_FIT = 5
_C_GRID = [0.02 * (100 ** (i / 59)) for i in range(60)]  # 0.02 .. 2, log-spaced


def _lsq(t: list[float], y: list[float], c: float) -> tuple[float, float, float]:
    """(a, b, squared error) of y ≈ a + b·t^(−c) with a, b ≥ 0."""
    x = [ti ** -c for ti in t]
    n, mx, my = len(x), fmean(x), fmean(y)
    sxx = sum((xi - mx) ** 2 for xi in x)
    b = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y)) / sxx if sxx > 0 else 0.0
    a = my - b * mx
    if b < 0:  # rising: no decay to fit
        a, b = my, 0.0
    elif a < 0:  # through the origin: y ≈ b·x
        a, b = 0.0, sum(xi * yi for xi, yi in zip(x, y)) / max(sum(xi * xi for xi in x), 1e-30)
    sse = sum((a + b * xi - yi) ** 2 for xi, yi in zip(x, y))
    return a, b, sse / max(n, 1)


def fit_power_law(t: list[float], y: list[float]) -> dict:
    """The best a + b·t^(−c) (a, b ≥ 0; c in [0.02, 2]): the grid's best c, then a golden-section
    refinement of log c between its neighbours."""
    if len(t) < 3:
        raise ValueError("a power-law fit needs at least 3 points")
    errors = [_lsq(t, y, c)[2] for c in _C_GRID]
    i = min(range(len(_C_GRID)), key=errors.__getitem__)
    lo, hi = math.log(_C_GRID[max(i - 1, 0)]), math.log(_C_GRID[min(i + 1, len(_C_GRID) - 1)])
    g = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        m1, m2 = hi - g * (hi - lo), lo + g * (hi - lo)
        if _lsq(t, y, math.exp(m1))[2] <= _lsq(t, y, math.exp(m2))[2]:
            hi = m2
        else:
            lo = m1
    c = math.exp((lo + hi) / 2)
    a, b, mse = _lsq(t, y, c)
    return {"a": a, "b": b, "c": c, "rmse": math.sqrt(mse)}


def power_law(fit: dict, t: float) -> float:
    return fit["a"] + fit["b"] * t ** -fit["c"]


def predict_final(losses: list[float], val: list[tuple[int, float]], steps: int | None) -> dict:
    """The final run's validation loss after `steps` steps, from a pilot's per-step training
    `losses` (step 1 first) and its (step, validation loss) points; see the module docstring."""
    if not losses:
        return {"predicted": None, "how": "no pilot steps"}
    t = list(range(1, len(losses) + 1))
    finite = [(ti, y) for ti, y in zip(t, losses) if math.isfinite(y)]
    last_val = val[-1] if val else None
    if len(finite) < MIN_FIT or not steps:
        at = last_val[1] if last_val else fmean(y for _, y in finite[-3:]) if finite else None
        return {"predicted": at, "how": "last measured loss (too few steps to fit a curve)"}
    fit = fit_power_law([p[0] for p in finite], [p[1] for p in finite])
    gap = last_val[1] - power_law(fit, last_val[0]) if last_val else 0.0
    target = max(steps, len(losses))
    predicted = power_law(fit, target) + gap
    return {"predicted": predicted, "how": f"L(t)=a+b·t^-c fitted to {len(finite)} steps, read at t={target}"
            + (", plus the validation gap" if last_val else ""), **fit, "gap": gap, "at_step": target}


def early_signals(losses: list[float], grad_norms: list[float], first: int) -> dict:
    """§12's indicators over the first `first` steps: mean gradient norm and mean training loss."""
    n = max(1, min(first, len(losses)))
    return {"early_grad_norm": fmean(grad_norms[:n]) if grad_norms else None,
            "early_loss": fmean(losses[:n]) if losses else None}


def _thirds(values: list[float]) -> tuple[list[float], list[float]]:
    k = max(1, len(values) // 3)
    return values[:k], values[-k:]


def stop_reason(losses: list[float], grad_norms: list[float], rise: float = 1.05, climb: float = 3.0) -> str | None:
    """Why a pilot should stop now, or None: its loss is not finite; its last third's mean loss is
    above `rise` × its first third's (diverging); or its gradient norm's last-third median is
    `climb` × the first third's while the loss has not fallen 1% (climbing, not learning). A LoRA
    gradient norm grows from zero-initialised B as the loss falls: that alone is no stop."""
    if any(not math.isfinite(x) for x in losses + grad_norms):
        return "loss or gradient norm not finite"
    if len(losses) < 3:
        return None
    head, tail = _thirds(losses)
    if fmean(tail) > rise * fmean(head):
        return f"loss rose from {fmean(head):.3f} to {fmean(tail):.3f} (diverging)"
    g_head, g_tail = _thirds(grad_norms)
    if g_head and median(g_tail) > climb * max(median(g_head), 1e-12) and fmean(tail) > 0.99 * fmean(head):
        return (f"gradient norm climbed from {median(g_head):.3g} to {median(g_tail):.3g} while the loss "
                f"stalled at {fmean(tail):.3f}")
    return None


def halve(scores: dict[str, float | None], keep: int) -> tuple[list[str], list[str]]:
    """Successive halving's cut: the `keep` lowest scores go on, the rest (and the unscored) stop."""
    ranked = sorted((s, label) for label, s in scores.items() if s is not None and math.isfinite(s))
    kept = [label for _, label in ranked[:keep]]
    return kept, [label for label in scores if label not in kept]
