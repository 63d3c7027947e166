"""Merging fine-tunes of one base: pure tensor operations on task vectors (τ_i = θ_i − θ_base).

Each combination takes the task vectors of one tensor (a list of same-shaped tensors, one per model)
and their weights w_i, and returns the merged task vector τ_m; the caller adds λ·τ_m to the base.

- `task_arithmetic` (Ilharco et al., 2023, "Editing models with task arithmetic"): τ_m = Σ w_i τ_i.
- `linear`: the weighted average of the models, θ_base + Σ w_i τ_i / Σ w_i (what mergekit calls
  linear, and a model soup when all w_i are equal).
- `ties` (Yadav et al., 2023, "TIES-Merging"): trim each τ_i to its top `density` share by magnitude,
  elect each entry's sign as the sign of Σ_i trimmed τ_i (the sign with more total mass), then take
  the disjoint mean: the mean of w_i·τ_i over the models whose trimmed entry is non-zero and has the
  elected sign. As in PEFT (`merge_utils.ties`), the sign is elected on the unweighted trimmed
  vectors and the mean divides by the number of agreeing models (not by their weights).
- `dare_linear`, `dare_ties` (Yu et al., 2024, "Language models are Super Mario", DARE): drop each
  entry of τ_i with probability 1 − density and rescale the survivors by 1/density, so the expected
  task vector is unchanged; then task arithmetic, or TIES' sign election and disjoint mean.
- `magnitude_prune`: task arithmetic on the top-`density` trimmed task vectors (TIES without the
  sign election; PEFT's `magnitude_prune`).
- `slerp`: spherical interpolation of two tensors at t along the great circle between their
  directions, falling back to linear interpolation when they are nearly colinear (the angle is then
  ill-conditioned), as mergekit does.

Trimming keeps int(density·numel) entries (PEFT's count); density ≥ 1 keeps everything. DARE's
masks come from the `generator` passed in (`torch.bernoulli` of a tensor filled with density, one
draw per task vector in order), so a seeded generator gives the same masks every run, and the same
masks as PEFT's `add_weighted_adapter` when torch's global generator is seeded alike and the tensors
come in the same order.
"""
from __future__ import annotations

import math

import torch

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "slerp")
SPARSE = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # use `density`
# |cos| above this: the directions are treated as colinear and SLERP interpolates linearly (mergekit's value)
COLINEAR = 0.9995


class MergeError(ValueError):
    """A merge that cannot be computed (mismatched shapes, weights that sum to zero, ...)."""


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise MergeError(f"task vectors of one tensor must have one shape, got {sorted(shapes)}")
    return torch.stack(tensors, dim=0)  # (n, *shape)


def _weighted(stacked: torch.Tensor, weights) -> torch.Tensor:
    w = torch.as_tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    if w.numel() != stacked.shape[0]:
        raise MergeError(f"{stacked.shape[0]} task vectors but {w.numel()} weights")
    return stacked * w.view(-1, *([1] * (stacked.ndim - 1)))


def trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = int(density·numel) entries of largest magnitude, zero the rest (TIES' trim step).

    The cut is the k-th largest magnitude (`kthvalue`, about 3× faster than `topk` with k near numel/2);
    entries equal to it are kept first come, first kept, until there are k (`topk` breaks such ties
    in an unspecified order)."""
    if density >= 1:
        return tensor
    mag = tensor.abs().reshape(-1)
    k = int(density * mag.numel())
    if k == 0:
        return torch.zeros_like(tensor)
    cut = torch.kthvalue(mag, mag.numel() - k + 1).values
    keep = mag > cut
    short = k - int(keep.sum())
    if short > 0:
        keep[(mag == cut).nonzero().squeeze(1)[:short]] = True
    return tensor * keep.view(tensor.shape)


def dare_drop(tensor: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each entry with probability `density` and divide the survivors by it (DARE's drop and rescale)."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def elect_sign(stacked: torch.Tensor) -> torch.Tensor:
    """+1 / −1 per entry: the sign of the summed (trimmed) task vectors; a zero sum elects +1."""
    return torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_mean(weighted: torch.Tensor, stacked: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Mean of the weighted entries whose (unweighted) sign equals the elected one; zero entries never
    agree, and an entry no model agrees on stays zero."""
    agree = stacked.sign() == sign  # (n, *shape)
    count = agree.sum(dim=0).clamp(min=1).to(weighted.dtype)
    return (weighted * agree).sum(dim=0) / count


def task_arithmetic(tensors: list[torch.Tensor], weights) -> torch.Tensor:
    return _weighted(_stack(tensors), weights).sum(dim=0)


def linear(tensors: list[torch.Tensor], weights) -> torch.Tensor:
    total = float(sum(weights))
    if abs(total) < 1e-12:
        raise MergeError("linear merging averages with the weights, which sum to 0; use task_arithmetic")
    return task_arithmetic(tensors, [w / total for w in weights])


def magnitude_prune(tensors: list[torch.Tensor], weights, density: float) -> torch.Tensor:
    return task_arithmetic([trim(t, density) for t in tensors], weights)


def ties(tensors: list[torch.Tensor], weights, density: float) -> torch.Tensor:
    stacked = _stack([trim(t, density) for t in tensors])
    return disjoint_mean(_weighted(stacked, weights), stacked, elect_sign(stacked))


def dare_linear(tensors: list[torch.Tensor], weights, density: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    return task_arithmetic([dare_drop(t, density, generator) for t in tensors], weights)


def dare_ties(tensors: list[torch.Tensor], weights, density: float,
              generator: torch.Generator | None = None) -> torch.Tensor:
    stacked = _stack([dare_drop(t, density, generator) for t in tensors])
    return disjoint_mean(_weighted(stacked, weights), stacked, elect_sign(stacked))


def slerp_coefficients(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[float, float]:
    """(s_a, s_b) with slerp(a, b, t) = s_a·a + s_b·b: sin((1−t)Ω)/sin Ω and sin(tΩ)/sin Ω for the angle
    Ω between a and b; (1 − t, t) when they are nearly colinear or either is zero."""
    a64, b64 = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = a64.norm(), b64.norm()
    if na == 0 or nb == 0:
        return 1.0 - t, t
    cos = float((a64 @ b64) / (na * nb))
    if abs(cos) > COLINEAR:
        return 1.0 - t, t
    omega = math.acos(max(-1.0, min(1.0, cos)))
    return math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from a (t=0) to b (t=1), over the flattened tensors."""
    if a.shape != b.shape:
        raise MergeError(f"slerp needs two tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    s_a, s_b = slerp_coefficients(a, b, t)
    return s_a * a + s_b * b


def combine(method: str, tensors: list[torch.Tensor], weights, *, density: float = 1.0, t: float = 0.5,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """The merged task vector of one tensor by `method` (one of METHODS); SLERP takes two tensors and t."""
    if method == "slerp":
        if len(tensors) != 2:
            raise MergeError(f"slerp merges exactly two models, got {len(tensors)}")
        return slerp(tensors[0], tensors[1], t)
    if method in ("linear", "task_arithmetic"):
        return (linear if method == "linear" else task_arithmetic)(tensors, weights)
    if method in ("ties", "magnitude_prune"):
        return (ties if method == "ties" else magnitude_prune)(tensors, weights, density)
    if method in ("dare_linear", "dare_ties"):
        return (dare_linear if method == "dare_linear" else dare_ties)(tensors, weights, density, generator)
    raise MergeError(f"unknown merge method `{method}`; choose one of {', '.join(METHODS)}")
