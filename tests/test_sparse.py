"""SpIEL sparse fine-tuning: the sparse delta's forward and gradient, merge, the prune/regrow step
(both growth criteria, on hand-built cases and through the gradient hooks), optimizer state, and
ranks agreeing on the indices."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import make_tiny_model
from tunesmith.methods import MethodError, attach, build_method, delta_state
from tunesmith.methods.sparse import SparseLinear, plan_swap, sm3_update, sparse_modules
from tunesmith.recipe import MethodConfig, RecipeError, SparseConfig
from tunesmith.train.optim import build_optimizer


def sparse_method(**kw):
    return build_method(MethodConfig(name="sparse", sparse=SparseConfig(**kw)))


class Toy(nn.Module):
    """One Linear at a transformer-like name (`model.layers.0.proj`), so targets resolve."""

    def __init__(self, out_features=4, in_features=4, bias=True):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Module()])
        self.model.layers[0].proj = nn.Linear(in_features, out_features, bias=bias)

    @property
    def proj(self):
        return self.model.layers[0].proj


def dense_delta(layer: SparseLinear) -> torch.Tensor:
    d = torch.zeros(layer.weight.numel())
    d[layer.sparse_indices] = layer.sparse_values.detach()
    return d.view_as(layer.weight)


def random_layer(out_features=6, in_features=8, k=10, criterion="ag", seed=0):
    torch.manual_seed(seed)
    layer = SparseLinear(nn.Linear(in_features, out_features), k, criterion)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    with torch.no_grad():
        layer.sparse_values.normal_(std=0.1)
    return layer


def fixed_selection_state(layer):
    """Known entries, candidates and accumulated gradient statistics, for reselection by hand."""
    with torch.no_grad():
        layer.sparse_indices.copy_(torch.tensor([0, 5, 10, 15]))
        layer.sparse_values.copy_(torch.tensor([0.5, -0.01, 0.3, 0.02]))
        layer.sparse_candidates.copy_(torch.tensor([5, 1, 2, 3]))
        layer.sparse_grad_sum.copy_(torch.tensor([9.0, 4.0, -7.0, 0.5]))
        layer.sparse_grad_sq.copy_(torch.tensor([50.0, 10.0, 30.0, 1.0]))
        layer.sparse_seen.fill_(2)


def test_starts_at_base_and_forward_is_dense_weight_plus_delta():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = SparseLinear(base, 10, "ag")
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(layer(x), F.linear(x, base.weight, base.bias), atol=0, rtol=0)
    idx = layer.sparse_indices
    assert idx.dtype == torch.int64 and idx.unique().numel() == 10 and int(idx.max()) < 48
    with torch.no_grad():
        layer.sparse_values.normal_()
    expected = F.linear(x, base.weight + dense_delta(layer), base.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    assert (layer(x) - F.linear(x, base.weight, base.bias)).abs().max() > 1e-2


def test_bf16_weights_with_and_without_autocast():
    layer = random_layer()
    layer.weight.data, layer.bias.data = layer.weight.data.bfloat16(), layer.bias.data.bfloat16()
    merged = layer.merged()
    assert merged.weight.dtype == torch.bfloat16
    x = torch.randn(4, 8)
    # bf16 activations (frozen bf16 embeddings), no autocast: the same numbers as the merged layer
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, merged(x.bfloat16()), atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        ref = merged(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, atol=1e-2, rtol=1e-2)
    y.float().sum().backward()
    assert layer.sparse_values.grad is not None and layer.sparse_values.grad.dtype == torch.float32
    assert layer.sparse_values.grad.abs().sum() > 0


def test_values_gradient_is_gather_of_dense_weight_gradient():
    layer = random_layer()
    x, target = torch.randn(5, 8), torch.randn(5, 6)
    F.mse_loss(layer(x), target).backward()
    dense = (layer.weight + dense_delta(layer)).detach().requires_grad_(True)
    F.mse_loss(F.linear(x, dense, layer.bias), target).backward()
    torch.testing.assert_close(layer.sparse_values.grad, dense.grad.flatten()[layer.sparse_indices])
    assert dense.grad.abs().sum() > 0 and layer.weight.grad is None


def test_merge_folds_values_into_weights(tokenizer):
    model = make_tiny_model(tokenizer)
    base_keys = set(model.state_dict())
    base_q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    method = sparse_method(density=0.05, targets=["q_proj", "down_proj"])
    attach(model, method)
    mods = sparse_modules(model)
    assert len(mods) == 4
    new_keys = set(model.state_dict()) - base_keys
    assert {k.rsplit(".", 1)[1] for k in new_keys} == {"sparse_indices", "sparse_values", "sparse_candidates",
                                                      "sparse_grad_sum", "sparse_grad_sq", "sparse_seen"}
    torch.manual_seed(3)
    for m in mods.values():
        with torch.no_grad():
            m.sparse_values.normal_(std=0.05)
    q = mods["model.layers.0.self_attn.q_proj"]
    idx, vals = q.sparse_indices.clone(), q.sparse_values.detach().clone()
    ids = torch.randint(5, 1000, (2, 10))
    with torch.no_grad():
        unmerged = model(ids).logits
        method.merge(model)
        merged = model(ids).logits
    assert set(model.state_dict()) == base_keys and not sparse_modules(model)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
    w = model.model.layers[0].self_attn.q_proj.weight.detach().flatten()
    torch.testing.assert_close(w[idx], base_q.flatten()[idx] + vals)
    untouched = torch.ones_like(w, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(w[untouched], base_q.flatten()[untouched])


def test_plan_swap_drops_smallest_and_grows_largest_accumulated_gradient():
    indices = torch.tensor([0, 5, 10, 15])
    values = torch.tensor([0.5, -0.01, 0.3, 0.02])
    candidates = torch.tensor([5, 1, 2, 3, 10])
    scores = torch.tensor([9.0, 4.0, 7.0, 0.5, 100.0])  # 10 stays active: never a candidate to grow
    slots, incoming, picked = plan_swap(indices, values, 16, 2, scores, candidates)
    # drop 5 and 15 (smallest |value|); grow 5 (kept in its slot, value and all) and 2
    assert slots.tolist() == [3] and incoming.tolist() == [2] and picked.tolist() == [2]
    # n = 3 also drops 10 (0.3), but its accumulated gradient is the largest: 10 and 5 stay, 2 comes in
    slots, incoming, _ = plan_swap(indices, values, 16, 3, scores, candidates)
    assert slots.tolist() == [3] and incoming.tolist() == [2]
    slots, incoming, _ = plan_swap(indices, values, 16, 3, torch.tensor([9.0, 4.0, 7.0, 0.5, 0.1]), candidates)
    assert sorted(zip(slots.tolist(), incoming.tolist())) == [(2, 1), (3, 2)]


def test_reselect_resets_values_and_seeds_optimizer_state():
    layer = SparseLinear(nn.Linear(4, 4), 4, "ag")
    opt = torch.optim.AdamW([layer.sparse_values], lr=0.1, betas=(0.9, 0.99))
    layer.sparse_values.grad = torch.ones(4)
    opt.step()
    opt.step()
    state = opt.state[layer.sparse_values]
    fixed_selection_state(layer)
    before_m, before_v = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    assert layer.reselect(0.5, opt) == 1
    assert layer.sparse_indices.tolist() == [0, 5, 10, 2]
    assert layer.sparse_values.tolist() == pytest.approx([0.5, -0.01, 0.3, 0.0])
    # seeded so that Adam's bias-corrected moments (step 2) read the phase's mean and mean square
    assert float(state["exp_avg"][3]) == pytest.approx(-7.0 / 2 * (1 - 0.9 ** 2))
    assert float(state["exp_avg_sq"][3]) == pytest.approx(30.0 / 2 * (1 - 0.99 ** 2))
    assert torch.equal(state["exp_avg"][:3], before_m[:3]) and torch.equal(state["exp_avg_sq"][:3], before_v[:3])
    assert int(layer.sparse_seen) == -1 and not layer.collecting  # the phase is closed


def drive(model, method, opt, grads, start=1):
    """Optimizer steps whose dense weight gradient is exactly grads[i] (x = I, loss = <W', G>)."""
    layer = model.proj
    for step, g in enumerate(grads, start):
        y = layer(torch.eye(layer.in_features))  # y[b, o] = W'[o, b] + bias[o]
        (y * g.T).sum().backward()
        opt.step()
        method.after_step(model, step, opt)
        opt.zero_grad(set_to_none=True)


def test_ag_first_reselection_grows_the_top_accumulated_gradients():
    torch.manual_seed(0)
    model = Toy(4, 4)
    method = sparse_method(density=0.25, reselect_every=3, accumulate_steps=1)
    attach(model, method)
    layer = model.proj
    initial = set(layer.sparse_indices.tolist())
    opt = torch.optim.AdamW([layer.sparse_values], lr=0.1, weight_decay=0.0)
    g = torch.arange(16, dtype=torch.float32).view(4, 4) * torch.tensor([1.0, -1.0]).repeat(8).view(4, 4)
    drive(model, method, opt, [g])
    top = set(g.flatten().abs().topk(4).indices.tolist())  # {12, 13, 14, 15}
    assert set(layer.sparse_indices.tolist()) == top  # p = 1: the random start is replaced
    state = opt.state[layer.sparse_values]
    for slot, i in enumerate(layer.sparse_indices.tolist()):
        if i in initial:  # kept: trained one step, nothing reset
            assert float(layer.sparse_values.detach()[slot]) != 0.0
        else:  # grown: value 0, Adam's m seeded with the gradient it saw (bias-corrected at step 1)
            assert float(layer.sparse_values.detach()[slot]) == 0.0
            assert float(state["exp_avg"][slot]) == pytest.approx(0.1 * float(g.flatten()[i]))
    assert not layer.collecting
    # outside a selection phase no dense gradient is collected; step 2 opens the next phase (S = 3)
    (layer(torch.eye(4)) * g.T).sum().backward()
    assert layer._step_grad is None
    opt.step()
    method.after_step(model, 2, opt)
    assert layer.collecting and int(layer.sparse_seen) == 0


def test_ag_later_reselection_follows_the_phase_gradients():
    torch.manual_seed(0)
    model = Toy(4, 4, bias=False)
    method = sparse_method(density=0.25, reselect_every=3, accumulate_steps=1, regrow=1.0)
    method.total_steps = 8  # p = 1 - 4/8 at step 4: two of the four entries move
    attach(model, method)
    layer = model.proj
    opt = torch.optim.AdamW([layer.sparse_values], lr=1e-5, weight_decay=0.0)
    first = torch.zeros(4, 4)
    first.view(-1)[[0, 1, 2, 3]] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    drive(model, method, opt, [first, first])  # step 1: active = {0, 1, 2, 3}; step 2: opens a phase
    assert sorted(layer.sparse_indices.tolist()) == [0, 1, 2, 3]
    with torch.no_grad():
        layer.sparse_values.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0]))
        layer.sparse_values[layer.sparse_indices.tolist().index(3)] = 1e-4  # the smallest two: 2 and 3
        layer.sparse_values[layer.sparse_indices.tolist().index(2)] = 1e-3
    # steps 3, 4: 7 and 9 have the largest summed |g| (9 only on the second step), 8 cancels out
    g3, g4 = torch.zeros(16), torch.zeros(16)
    g3[[7, 8, 9, 11]] = torch.tensor([5.0, 6.0, 0.1, 0.2])
    g4[[7, 8, 9, 11]] = torch.tensor([5.0, -6.0, 4.0, 0.2])
    drive(model, method, opt, [g3.view(4, 4), g4.view(4, 4)], start=3)
    assert sorted(layer.sparse_indices.tolist()) == [0, 1, 7, 9]


def test_sm3_accumulators_hand_case():
    row, col = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([2.0, 0.5])
    rows, cols = torch.tensor([0, 0, 2]), torch.tensor([0, 1, 1])
    sm3_update(row, col, rows, cols, torch.tensor([1.0, 2.0, 3.0]))
    # u = min(R[i], C[j]) + g² = [1 + 1, 0.5 + 4, 0.5 + 9]
    assert row.tolist() == [4.5, 0.0, 9.5] and col.tolist() == [2.0, 9.5]


def sparse_optimizer(model, method, lr=0.1, betas=(0.9, 0.999), weight_decay=None):
    from tunesmith.recipe import load_recipe

    over = [f"train.lr={lr}", f"train.betas=[{betas[0]},{betas[1]}]"]
    if weight_decay is not None:
        method.cfg.weight_decay = weight_decay
    return build_optimizer(model, load_recipe(None, over).train, method)


def test_ma_grows_the_largest_row_times_column_score():
    torch.manual_seed(0)
    model = Toy(3, 3, bias=False)
    method = sparse_method(density=1 / 3, criterion="ma")
    attach(model, method)
    layer = model.proj
    opt = sparse_optimizer(model, method)
    with torch.no_grad():
        layer.sparse_indices.copy_(torch.tensor([0, 4, 8]))  # the diagonal
        layer.sparse_values.copy_(torch.tensor([1.0, 0.01, 2.0]))
    opt.state[layer.sparse_values] = {"row": torch.tensor([1.0, 2.0, 10.0]), "col": torch.tensor([3.0, 1.0, 5.0])}
    # scores R[i]·C[j]: (2,2) = 50 is active; best inactive: (2,0) = 30, then (1,2) = 10
    assert layer.reselect(1 / 3, opt) == 1
    assert layer.sparse_indices.tolist() == [0, 6, 8] and layer.sparse_values.tolist() == [1.0, 0.0, 2.0]
    # every entry active (density 1): nothing to grow, so nothing is dropped (no duplicate indices)
    slots, incoming, _ = plan_swap(torch.arange(9), torch.randn(9), 9, 3, torch.rand(9))
    assert slots.numel() == incoming.numel() == 0
    with pytest.raises(MethodError, match="sparse.criterion=ma grows by SM3"):
        layer.reselect(1 / 3, torch.optim.AdamW([layer.sparse_values]))  # no SM3 accumulators to grow by


def test_ma_values_are_updated_by_sm3_with_rows_plus_columns_of_state():
    """SpIEL's `ma` is SM3: one accumulator per row and per column of each matrix, no per-value
    moments; the step is lr·g/√(min(R[i], C[j]) + g² + ε); growth reads the same accumulators."""
    torch.manual_seed(0)
    model = Toy(4, 6)
    method = sparse_method(density=0.25, reselect_every=3, accumulate_steps=2, criterion="ma")
    attach(model, method)
    layer = model.proj
    opt = sparse_optimizer(model, method, lr=0.1, weight_decay=0.0)
    rows, cols = layer.sparse_indices // 6, layer.sparse_indices % 6
    g1, g2 = torch.randn(4, 6), torch.randn(4, 6)
    v0 = layer.sparse_values.detach().clone()
    drive(model, method, opt, [g1])
    state = opt.state[layer.sparse_values]
    assert set(state) == {"row", "col"} and state["row"].shape == (4,) and state["col"].shape == (6,)
    u1 = g1.flatten()[layer.sparse_indices] ** 2  # R, C start at zero: u = g²
    assert torch.allclose(state["row"], torch.zeros(4).scatter_reduce(0, rows, u1, "amax"))
    assert torch.allclose(state["col"], torch.zeros(6).scatter_reduce(0, cols, u1, "amax"))
    step1 = v0 - 0.1 * g1.flatten()[layer.sparse_indices] / (u1 + 1e-8).sqrt()
    torch.testing.assert_close(layer.sparse_values.detach(), step1)  # the first step: -lr·sign(g)
    row, col = state["row"].clone(), state["col"].clone()
    drive(model, method, opt, [g2], start=2)  # step 2 = A: the first reselection (p = 1) after the update
    g = g2.flatten()[rows * 6 + cols]
    u2 = torch.minimum(row[rows], col[cols]) + g ** 2
    expected = torch.maximum(row, torch.zeros(4).scatter_reduce(0, rows, u2, "amax"))
    torch.testing.assert_close(state["row"], expected)
    scores = torch.outer(state["row"], state["col"]).flatten()
    start = set((rows * 6 + cols).tolist())
    grown = [i for i in layer.sparse_indices.tolist() if i not in start]
    assert grown, "p = 1 at the first reselection moves entries"
    outside = scores.clone()
    outside[list(start)] = float("-inf")
    assert set(grown) <= set(outside.topk(len(start)).indices.tolist())
    assert all(float(layer.sparse_values.detach()[layer.sparse_indices.tolist().index(i)]) == 0.0 for i in grown)


def test_ag_grown_entries_get_their_own_age():
    """SpIEL's AdamW counts steps per entry: an entry grown after a phase of a steps is seeded with
    m = mean(g)·(1−β1^a), v = mean(g²)·(1−β2^a), age a; kept entries keep theirs; the next step's
    bias correction uses each entry's own age (the reference's age-aware moments)."""
    layer_model = Toy(4, 4)
    method = sparse_method(density=0.25)
    attach(layer_model, method)
    layer = layer_model.proj
    opt = sparse_optimizer(layer_model, method, lr=0.1, betas=(0.9, 0.99), weight_decay=0.0)
    layer.sparse_values.grad = torch.ones(4)
    for _ in range(7):
        opt.step()
    state = opt.state[layer.sparse_values]
    assert state["age"].tolist() == [7.0] * 4
    fixed_selection_state(layer)
    m_before, v_before = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    assert layer.reselect(0.5, opt) == 1 and layer.sparse_indices.tolist() == [0, 5, 10, 2]
    assert state["age"].tolist() == [7.0, 7.0, 7.0, 2.0]
    assert float(state["exp_avg"][3]) == pytest.approx(-7.0 / 2 * (1 - 0.9 ** 2))
    assert float(state["exp_avg_sq"][3]) == pytest.approx(30.0 / 2 * (1 - 0.99 ** 2))
    assert torch.equal(state["exp_avg"][:3], m_before[:3]) and torch.equal(state["exp_avg_sq"][:3], v_before[:3])
    # one more step with gradient g: each entry is bias-corrected by its own age (8 and 3)
    g = torch.tensor([1.0, 1.0, 1.0, 2.0])
    m = 0.9 * state["exp_avg"].clone() + 0.1 * g
    v = 0.99 * state["exp_avg_sq"].clone() + 0.01 * g * g
    age = torch.tensor([8.0, 8.0, 8.0, 3.0])
    expected = layer.sparse_values.detach() - 0.1 * (m / (1 - 0.9 ** age)) / ((v / (1 - 0.99 ** age)).sqrt() + 1e-8)
    layer.sparse_values.grad = g
    opt.step()
    torch.testing.assert_close(layer.sparse_values.detach(), expected)


def test_values_are_pulled_toward_the_base_by_default():
    assert SparseConfig().weight_decay > 0, "SpIEL decays the values toward the pretrained weights"
    for criterion in ("ag", "ma"):
        model = Toy(4, 4)
        method = sparse_method(density=0.5, criterion=criterion)
        attach(model, method)
        opt = sparse_optimizer(model, method, lr=0.01)
        values = model.proj.sparse_values
        assert all(g["weight_decay"] == SparseConfig().weight_decay for g in opt.param_groups)
        with torch.no_grad():
            values.fill_(0.5)
        values.grad = torch.zeros_like(values)  # no gradient signal: only the pull acts
        opt.step()
        torch.testing.assert_close(values.detach(), torch.full_like(values, 0.5 * (1 - 0.01 * SparseConfig().weight_decay)))


@pytest.mark.parametrize("criterion", ["ag", "ma"])
def test_indices_distinct_in_range_and_state_is_o_of_k(tokenizer, criterion):
    from tunesmith.recipe import load_recipe

    model = make_tiny_model(tokenizer)
    method = sparse_method(density=0.05, reselect_every=3, accumulate_steps=1, criterion=criterion)
    attach(model, method)
    mods = sparse_modules(model)
    start = {n: m.sparse_indices.clone() for n, m in mods.items()}
    opt = build_optimizer(model, load_recipe(None, ["train.lr=1e-2", "train.weight_decay=0.1"]).train, method)
    wd = method.cfg.weight_decay
    assert all(g["weight_decay"] == wd > 0 for g in opt.param_groups), "the values decay toward the base"
    model.train()
    method.on_epoch(model, 0, opt)
    g = torch.Generator().manual_seed(0)
    for step in range(1, 8):  # reselections at steps 1, 4 and 7
        ids = torch.randint(5, 1000, (2, 12), generator=g)
        model(ids, labels=ids).loss.backward()
        opt.step()
        method.after_step(model, step, opt)
        opt.zero_grad(set_to_none=True)
    for n, m in mods.items():
        idx = m.sparse_indices
        assert idx.unique().numel() == idx.numel() == m.k == m.sparse_values.numel()
        assert 0 <= int(idx.min()) and int(idx.max()) < m.weight.numel()
        assert not torch.equal(idx.sort().values, start[n].sort().values), f"{n}: no reselection happened"
    k = sum(m.k for m in mods.values())
    assert set(map(id, opt.state)) == {id(m.sparse_values) for m in mods.values()}
    for m in mods.values():  # ag: age, m, v per value; ma (SM3): one number per row and per column
        held = sum(t.numel() for t in opt.state[m.sparse_values].values())
        assert held == (3 * m.k if criterion == "ag" else m.out_features + m.in_features)
    saved = sum(t.numel() for t in delta_state(model, method).values())
    assert saved <= 5 * k + len(mods), "everything saved is O(k)"
    assert saved < sum(m.weight.numel() for m in mods.values()) / 2


def test_regrow_fraction_schedule():
    method = sparse_method(reselect_every=20, accumulate_steps=5, regrow=0.2)
    assert method.regrow_fraction(5, None) == 1.0
    method.total_steps = 100
    assert method.regrow_fraction(25, None) == pytest.approx(0.2 * 0.75)
    assert method.regrow_fraction(100, None) == 0.0
    method.total_steps = None  # unknown run length: follow the learning-rate schedule
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 10)
    for _ in range(4):
        opt.step()
        sched.step()
    assert method.regrow_fraction(25, opt) == pytest.approx(0.2 * 0.6)


def test_describe_and_errors(tokenizer):
    model = make_tiny_model(tokenizer)
    method = sparse_method(density=0.01, targets=["q_proj"])
    attach(model, method)
    k = sum(m.k for m in sparse_modules(model).values())
    assert k == 2 * round(0.01 * 64 * 64)
    assert method.describe(model).startswith(f"{k:,} trained weights in 2 matrices (1.00% of their weights)")
    # the options refuse these as soon as they are built, naming the field and what is allowed
    with pytest.raises(RecipeError, match="criterion: 'rigl' is not allowed; choose one of ag, ma"):
        SparseConfig(criterion="rigl")
    with pytest.raises(RecipeError, match=r"accumulate_steps: must be < reselect_every \(5\), got 5"):
        SparseConfig(reselect_every=5, accumulate_steps=5)
    with pytest.raises(MethodError, match="target `nope`"):
        attach(make_tiny_model(tokenizer), sparse_method(targets=["nope"]))


def _rank(rank, world, init_file, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same model on every rank
        model = Toy(4, 4, bias=False)
        method = sparse_method(density=0.25, reselect_every=3, accumulate_steps=1)
        attach(model, method)
        opt = torch.optim.AdamW([model.proj.sparse_values], lr=0.1)
        # rank 0 alone would grow {0..3}, rank 1 alone {12..15}; summed, the middle wins
        g = torch.zeros(16)
        g[[0, 1, 2, 3] if rank == 0 else [12, 13, 14, 15]] = 5.0
        g[[6, 7, 8, 9]] = 3.0
        y = model.proj(torch.eye(4))
        (y * g.view(4, 4).T).sum().backward()
        dist.all_reduce(model.proj.sparse_values.grad)  # what DDP does for the parameters
        opt.step()
        method.after_step(model, 1, opt)
        p = model.proj
        torch.save({"indices": sorted(p.sparse_indices.tolist()), "grad_sum": p.sparse_grad_sum.tolist(),
                    "exp_avg": opt.state[p.sparse_values]["exp_avg"].tolist()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ranks_pick_the_same_indices_from_summed_statistics(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True,
                       start_method="fork")  # no re-import: seconds, not tens
    r0, r1 = (torch.load(tmp_path / f"out.{r}") for r in (0, 1))
    assert r0["indices"] == r1["indices"] == [6, 7, 8, 9]
    # the step's candidate gradients are summed over ranks before they count (3 + 3 per rank)
    assert r0["grad_sum"] == r1["grad_sum"] == [6.0] * 4
    assert r0["exp_avg"] == r1["exp_avg"] == pytest.approx([0.1 * 6.0] * 4)
