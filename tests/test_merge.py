"""Merging: each method on hand-built tensors against hand computations, parity with PEFT's
`add_weighted_adapter` on a tiny model with two LoRA adapters, full-model task vectors, and the
merged output loading where adapters and models load."""
import json
import math

import pytest
import torch

from tunesmith.models import merging

from conftest import lively_model

# ---- hand-built tensors

T1 = torch.tensor([1.0, -2.0, 0.5, 3.0])
T2 = torch.tensor([-3.0, 1.0, 0.4, -1.2])
T3 = torch.tensor([1.0, 1.5, -0.1, 2.0])


def test_trim_keeps_the_largest_magnitudes():
    assert torch.equal(merging.trim(T2, 0.5), torch.tensor([-3.0, 0.0, 0.0, -1.2]))
    assert torch.equal(merging.trim(T1, 0.25), torch.tensor([0.0, 0.0, 0.0, 3.0]))
    assert torch.equal(merging.trim(T1, 1.0), T1)


def test_ties_without_trimming_elects_the_sign_of_the_sum_and_averages_the_agreeing():
    # sums: -1.0, 0.5, 0.8, 3.8 -> signs -, +, +, +
    # entry 0: only T2 (-3) agrees; 1: T2, T3 (1, 1.5); 2: T1, T2 (0.5, 0.4); 3: T1, T3 (3, 2)
    got = merging.ties([T1, T2, T3], [1.0, 1.0, 1.0], density=1.0)
    assert torch.allclose(got, torch.tensor([-3.0, 1.25, 0.45, 2.5]))


def test_ties_trims_before_the_election():
    # trimmed to 2 of 4: T1 [0,-2,0,3], T2 [-3,0,0,-1.2], T3 [0,1.5,0,2]; sums -3, -0.5, 0, 3.8
    # entry 1 now elects − (untrimmed it was +): only T1's −2 agrees; entry 2: nobody is left -> 0
    got = merging.ties([T1, T2, T3], [1.0, 1.0, 1.0], density=0.5)
    assert torch.allclose(got, torch.tensor([-3.0, -2.0, 0.0, 2.5]))
    # weights scale the mean but not the election (PEFT's semantics): w = 2, 1, 1
    got = merging.ties([T1, T2, T3], [2.0, 1.0, 1.0], density=0.5)
    assert torch.allclose(got, torch.tensor([-3.0, -4.0, 0.0, 4.0]))


def test_sign_election_on_a_zero_sum_is_positive():
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([-1.0, 2.0])
    assert torch.equal(merging.elect_sign(torch.stack([a, b])), torch.tensor([1.0, 1.0]))
    assert torch.allclose(merging.ties([a, b], [1.0, 1.0], 1.0), torch.tensor([1.0, 2.0]))


def test_linear_averages_and_task_arithmetic_sums():
    assert torch.allclose(merging.linear([T1, T2], [1.0, 3.0]), (T1 + 3 * T2) / 4)
    assert torch.allclose(merging.task_arithmetic([T1, T2], [1.0, 3.0]), T1 + 3 * T2)
    assert torch.allclose(merging.task_arithmetic([T1, T2], [1.0, -1.0]), T1 - T2)
    with pytest.raises(merging.MergeError, match="sum to 0"):
        merging.linear([T1, T2], [1.0, -1.0])


def test_magnitude_prune_is_task_arithmetic_of_the_trimmed():
    got = merging.magnitude_prune([T1, T2], [1.0, 2.0], density=0.5)
    assert torch.allclose(got, torch.tensor([0.0, -2.0, 0.0, 3.0]) + 2 * torch.tensor([-3.0, 0.0, 0.0, -1.2]))


def test_dare_drops_and_rescales_with_a_seeded_mask():
    t = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    got = merging.dare_drop(t, 0.25, torch.Generator().manual_seed(7))
    kept = got != 0
    assert torch.allclose(got[kept], t[kept] / 0.25)  # survivors rescaled by 1/density
    # the mask is Bernoulli(density) from the generator: the same draw by hand
    hand = torch.bernoulli(torch.full_like(t, 0.25), generator=torch.Generator().manual_seed(7)).bool()
    assert torch.equal(kept, hand)
    assert abs(kept.float().mean().item() - 0.25) < 0.03  # 4096 draws: 5 standard deviations
    assert torch.equal(got, merging.dare_drop(t, 0.25, torch.Generator().manual_seed(7)))
    assert not torch.equal(got, merging.dare_drop(t, 0.25, torch.Generator().manual_seed(8)))
    assert torch.equal(merging.dare_drop(t, 1.0, torch.Generator().manual_seed(7)), t)


def test_dare_linear_and_dare_ties_on_the_dropped_vectors():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    ts = [torch.randn(32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    gen = g()
    dropped = [merging.dare_drop(t, 0.5, gen) for t in ts]  # the order dare_* draws in
    assert torch.allclose(merging.dare_linear(ts, [1.0, 2.0, 0.5], 0.5, g()),
                          dropped[0] + 2 * dropped[1] + 0.5 * dropped[2])
    assert torch.allclose(merging.dare_ties(ts, [1.0, 2.0, 0.5], 0.5, g()),
                          merging.ties(dropped, [1.0, 2.0, 0.5], density=1.0))
    # density 1 drops nothing: DARE-TIES is TIES without trimming (hand values above)
    assert torch.allclose(merging.dare_ties([T1, T2, T3], [1.0] * 3, 1.0, g()), torch.tensor([-3.0, 1.25, 0.45, 2.5]))


def test_slerp_ends_midpoint_and_colinear_fallback():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(merging.slerp(a, b, 0.0), a)
    assert torch.allclose(merging.slerp(a, b, 1.0), b)
    mid = merging.slerp(a, b, 0.5)
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))  # on the circle, not the chord
    assert math.isclose(mid.norm().item(), 1.0, rel_tol=1e-6)
    third = merging.slerp(a, b, 1 / 3)  # 30° along the 90° arc
    assert torch.allclose(third, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    c = torch.tensor([2.0, 1e-4])  # nearly colinear with a: linear interpolation
    assert torch.allclose(merging.slerp(a, c, 0.5), 0.5 * a + 0.5 * c)
    with pytest.raises(merging.MergeError):
        merging.combine("slerp", [T1, T2, T3], [1.0] * 3)
