"""Sparse upcycling with a learned router (models.moe TopKRouter; method `moe`, routing=learned):
top-k mass, the capacity/drop policy, the router losses against hand computations and transformers'
Mixtral loss, upcycled == dense at init, the aux-loss accounting of the harness, a tiny SFT run that
logs expert utilisation and reloads, and the Mixtral export's logit parity."""
import json
import math

import pytest
import torch

from tests.conftest import make_tiny_model, tiny_recipe
from tunesmith.export.atomic import ExportError
from tunesmith.methods import attach, build_method
from tunesmith.methods.base import Compose, MethodBase, MethodError
from tunesmith.models.moe import MoEError, MoEMLP, TopKRouter, aux_losses, capacity, expert_stats, moe_modules
from tunesmith.recipe import method_from_dict

IDS = torch.randint(5, 1000, (3, 10), generator=torch.Generator().manual_seed(3))


def mlps(n, d=8, seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.GELU(), torch.nn.Linear(16, d)) for _ in range(n)]


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def learned(experts=4, top_k=2, **extra):
    return build_method(method_from_dict("moe", {"routing": "learned", "experts": experts, "top_k": top_k, **extra}))


# --------------------------------------------------------------------------------------------------
# the router


def test_top_k_ids_are_the_softmax_top_k_and_gates_sum_to_one():
    torch.manual_seed(0)
    router = TopKRouter(8, 5, k=3)
    x = torch.randn(40, 8)
    ids, gates = router(x)
    p = torch.softmax(x @ router.weight.detach().T, dim=-1)
    assert ids.shape == gates.shape == (40, 3)
    torch.testing.assert_close(gates.sum(-1), torch.ones(40))
    for i in range(40):
        want = sorted(range(5), key=lambda e: -float(p[i, e]))[:3]
        assert ids[i].tolist() == want  # highest first
        torch.testing.assert_close(gates[i], p[i, ids[i]] / p[i, ids[i]].sum())
    assert len(torch.unique(ids[:, 0])) > 1, "a random router spreads the tokens"


def test_top_k_output_is_the_gate_weighted_sum_of_the_chosen_experts():
    experts = mlps(4)
    layer = MoEMLP(experts, TopKRouter(8, 4, k=2))
    x = torch.randn(2, 7, 8)
    out = layer(x)
    ids, gates = layer.router(x.reshape(-1, 8))
    flat = x.reshape(-1, 8)
    want = torch.stack([sum(gates[i, j] * experts[ids[i, j]](flat[i]) for j in range(2)) for i in range(14)])
    torch.testing.assert_close(out, want.reshape(2, 7, 8), atol=1e-6, rtol=1e-6)
    # enforced routing still wins over the router (and leaves no router statistics behind)
    layer.route = torch.tensor([1, 3])
    torch.testing.assert_close(layer(x)[1], experts[3](x[1]))
    assert layer.router.last is None and aux_losses(layer) == {}


def test_a_top_1_gate_is_one_yet_trains_the_router():
    """Renormalised over one expert the gate is 1 (Mixtral): the value stays 1, and its gradient is that of
    log p, so the task loss reaches the router (a constant gate would leave it to the auxiliary losses)."""
    torch.manual_seed(0)
    experts = mlps(3)
    layer = MoEMLP(experts, TopKRouter(8, 3, k=1))
    x = torch.randn(12, 8)
    ids, gates = layer.router(x)
    torch.testing.assert_close(gates, torch.ones(12, 1))
    torch.testing.assert_close(layer(x), torch.stack([experts[int(ids[i, 0])](x[i]) for i in range(12)]))
    layer(x).pow(2).sum().backward()
    grad = layer.router.weight.grad
    assert grad is not None and grad.abs().max() > 1e-4
    # the same gradient by hand: d/dW of Σ_i 2·||E(x_i)||²·(log p_i − stop_grad(log p_i))
    w = layer.router.weight.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(x @ w.T, dim=-1).gather(1, ids)[:, 0]
    with torch.no_grad():
        sq = torch.stack([experts[int(ids[i, 0])](x[i]).pow(2).sum() for i in range(12)])
    (sq * 2 * (logp - logp.detach())).sum().backward()  # d(gate·y)²/d gate at gate 1 is 2·y²
    torch.testing.assert_close(grad, w.grad, atol=1e-5, rtol=1e-4)


def test_bad_router_settings_are_clear_errors(tokenizer):
    with pytest.raises(MoEError, match="top_k"):
        TopKRouter(8, 2, k=3)
    with pytest.raises(MoEError, match="capacity_factor"):
        TopKRouter(8, 2, k=1, capacity_factor=0)
    with pytest.raises(MethodError, match="top_k"):
        attach(make_tiny_model(tokenizer), learned(experts=2, top_k=3))
    from tests.test_moe_embed import tiny_bert

    with pytest.raises(MethodError, match="enforced routing"):
        attach(tiny_bert(), learned())


# --------------------------------------------------------------------------------------------------
# capacity: each expert takes at most ceil(c·n·k/E) assignments, in token order; the rest add zero


def test_capacity_drops_the_overflow_in_token_order():
    torch.manual_seed(1)
    router = TopKRouter(8, 4, k=2, capacity_factor=0.75).train()
    x = torch.randn(24, 8)
    cap = capacity(24, 2, 4, 0.75)
    assert cap == math.ceil(0.75 * 24 * 2 / 4) == 9
    ids, gates = router(x)
    chosen = router.last[1]  # the top-k before dropping
    # by hand: walk the assignments token by token, first choice first
    taken, want = [0] * 4, []
    for i in range(24):
        row = []
        for j in range(2):
            e = int(chosen[i, j])
            row.append(e if taken[e] < cap else -1)
            taken[e] += 1
        want.append(row)
    assert ids.tolist() == want
    assert (ids == -1).any(), "the test must drop something"
    kept = ids[ids >= 0]
    assert int(torch.bincount(kept, minlength=4).max()) <= cap
    assert torch.all(gates[ids == -1] == 0)
    # eval and generation are dropless: Mixtral's computation
    ids_eval, _ = router.eval()(x)
    assert torch.equal(ids_eval, chosen)


def test_a_dropped_token_gives_zero_mlp_output():
    experts = mlps(2)
    router = TopKRouter(8, 2, k=1, capacity_factor=0.5)  # capacity ceil(0.5·6·1/2) = 2 per expert
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0] + [0.0] * 7, [-1.0] + [0.0] * 7]))
    layer = MoEMLP(experts, router).train()
    x = torch.randn(6, 8)
    x[:, 0] = torch.tensor([3.0, 2.0, 1.0, 4.0, -1.0, 5.0])  # tokens 0,1,2,3,5 prefer expert 0; 4 expert 1
    out = layer(x)
    assert router.last[1][:, 0].tolist() == [0, 0, 0, 0, 1, 0]
    gates = torch.ones(6)  # k = 1: the renormalised gate is 1
    for i in (0, 1, 4):
        torch.testing.assert_close(out[i], gates[i] * experts[router.last[1][i, 0]](x[i]))
    assert torch.all(out[[2, 3, 5]] == 0), "over capacity: the token passes through the residual only"


# --------------------------------------------------------------------------------------------------
# the router losses against hand computations


FIXED = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, -2.0, 0.5]])


def hand_losses(rows, k):
    """E·Σ f_e·P_e over the n·k assignments and mean logsumexp², with math on Python floats."""
    n, n_experts = len(rows), len(rows[0])
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in rows]
    top = [sorted(range(n_experts), key=lambda e: -p[e])[:k] for p in probs]
    share = [sum(e in t for t in top) / (n * k) for e in range(n_experts)]
    mean_p = [sum(p[e] for p in probs) / n for e in range(n_experts)]
    balance = n_experts * sum(f * q for f, q in zip(share, mean_p))
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in rows) / n
    return balance, z, share, probs


def routed_layers(logit_sets, k):
    """MoE layers whose routers saw these logits in 'the last forward'."""
    layers = []
    for lg in logit_sets:
        router = TopKRouter(1, lg.shape[1], k=k)
        router.last = (lg, torch.topk(torch.softmax(lg, -1), k, -1).indices)
        layers.append(MoEMLP(mlps(lg.shape[1], d=1), router))
    return torch.nn.ModuleList(layers)


@pytest.mark.parametrize("k", [1, 2])
def test_router_losses_equal_hand_computations(k):
    other = FIXED.flip(0) * 0.7
    got = aux_losses(routed_layers([FIXED, other], k))
    b1, z1, _, _ = hand_losses(FIXED.tolist(), k)
    b2, z2, _, _ = hand_losses(other.tolist(), k)
    assert got["moe_balance"].item() == pytest.approx((b1 + b2) / 2, rel=1e-6)  # mean over layers
    assert got["moe_z"].item() == pytest.approx((z1 + z2) / 2, rel=1e-6)
    # transformers' Mixtral loss counts f_e per token (Σ f = k): k times ours on one layer
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    theirs = load_balancing_loss_func((FIXED,), 3, top_k=k)
    assert aux_losses(routed_layers([FIXED], k))["moe_balance"].item() * k == pytest.approx(theirs.item(), rel=1e-6)


def test_balance_loss_is_one_when_even_and_e_when_collapsed():
    even = torch.zeros(6, 3)
    even_ids = torch.tensor([[0], [1], [2], [0], [1], [2]])
    layers = routed_layers([even], 1)
    layers[0].router.last = (even, even_ids)
    assert aux_losses(layers)["moe_balance"].item() == pytest.approx(1.0)
    collapsed = torch.tensor([[30.0, 0.0, 0.0]] * 6)
    assert aux_losses(routed_layers([collapsed], 1))["moe_balance"].item() == pytest.approx(3.0, rel=1e-6)


def test_expert_stats_equal_hand_computations():
    _, _, share, probs = hand_losses(FIXED.tolist(), 2)
    stats = expert_stats(routed_layers([FIXED], 2))
    for e in range(3):
        assert stats[f"moe/share_e{e}"] == pytest.approx(share[e])
    assert stats["moe/load_entropy"] == pytest.approx(-sum(f * math.log(f) for f in share if f))
    router_entropy = sum(-sum(p * math.log(p) for p in row) for row in probs) / len(probs)
    assert stats["moe/router_entropy"] == pytest.approx(router_entropy)


def test_the_aux_losses_train_the_router():
    layers = routed_layers([FIXED.clone().requires_grad_(True)], 2)
    logits_ = layers[0].router.last[0]
    aux_losses(layers)["moe_z"].backward()
    assert logits_.grad is not None and logits_.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# upcycled at init == dense


def test_upcycled_with_a_learned_router_equals_dense_at_init(tokenizer):
    model = make_tiny_model(tokenizer)
    dense = logits(model)
    keys = set(model.state_dict())
    torch.manual_seed(5)
    attach(model, learned(experts=4, top_k=2))
    assert keys <= set(model.state_dict())
    assert any(k.endswith("mlp.router.weight") for k in model.state_dict())
    with torch.no_grad():  # any router weights: large ones, so tokens spread over every expert
        for m in moe_modules(model):
            m.router.weight.normal_(0, 3.0)
    out = logits(model)
    used = torch.unique(torch.cat([m.router.last[1].reshape(-1) for m in moe_modules(model)]))
    assert len(used) == 4, "every expert is used, so the equality is not vacuous"
    # Σ gates = 1 and the experts are one MLP: equal up to float rounding of the weighted sum
    torch.testing.assert_close(out, dense, atol=2e-6, rtol=1e-5)
    noisy = make_tiny_model(tokenizer)
    attach(noisy, learned(experts=4, top_k=2, noise=0.1))
    assert (logits(noisy) - dense).abs().max() > 1e-4, "noise on the copies changes the output"


def test_router_gradients_are_the_same_under_activation_checkpointing(tokenizer):
    """The aux losses read the router logits kept from the forward; recomputing a checkpointed layer
    in the backward pass must not change what they contribute."""
    grads = []
    for checkpointing in (False, True):
        model = make_tiny_model(tokenizer)
        method = learned(experts=3, top_k=2, balance_weight=1.0, z_weight=0.1)
        torch.manual_seed(4)
        attach(model, method)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        out = model(IDS, labels=IDS, use_cache=False)
        aux, _ = method.aux_loss(model)
        (out.loss + aux).backward()
        grads.append(torch.cat([m.router.weight.grad.flatten() for m in moe_modules(model)]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


def test_learned_method_trains_experts_and_routers_only(tokenizer):
    model = make_tiny_model(tokenizer)
    trained = attach(model, learned(experts=3, top_k=1))
    assert any(n.endswith("router.weight") for n in trained)
    assert all(".mlp." in n for n in trained)
    assert len(trained) == 2 * (3 * 3 + 1)  # 2 layers × (3 experts × 3 linears + the router)


# --------------------------------------------------------------------------------------------------
# the harness hook: aux counts as a per-step mean, metrics as per-step means


class _Fixed(MethodBase):
    name = "fixed"

    def __init__(self, value, metric):
        super().__init__()
        self.value, self.metric = value, metric

    def aux_loss(self, model):
        return torch.tensor(self.value, requires_grad=True), {"m": self.metric}


class _Objective:
    """Loss sum = 2·units (mean 2 per unit), one metric summed over units."""

    def __call__(self, model, batch):
        units = batch["units"]
        return torch.tensor(2.0 * units, requires_grad=True), units, {"obj": 1.0 * units}


def test_loss_module_adds_aux_as_a_per_step_mean():
    from tunesmith.train.step import LossModule, backward_window

    runner = LossModule(torch.nn.Linear(1, 1), _Objective(), _Fixed(0.25, 3.0))
    batches = [{"units": 3, "segment_ids": torch.ones(1, 3)}, {"units": 7, "segment_ids": torch.ones(1, 7)}]
    loss, units, _, metrics = backward_window(runner, batches, torch.device("cpu"), "fp32", window_units=10)
    assert loss == pytest.approx(2.0 + 0.25)  # per unit: the objective's mean plus aux once
    assert metrics["m"] / units == pytest.approx(3.0) and metrics["obj"] / units == pytest.approx(1.0)
    with torch.no_grad():  # validation: the objective's loss alone
        assert float(runner(batches[0])[0]) == pytest.approx(6.0)
    composed = Compose("both", [_Fixed(0.25, 1.0), _Fixed(0.5, 2.0), MethodBase()])
    total, _ = composed.aux_loss(None)
    assert float(total.detach()) == pytest.approx(0.75)
    assert MethodBase().aux_loss(None) == (None, {})


def test_method_aux_loss_weights_the_router_losses(tokenizer):
    model = make_tiny_model(tokenizer)
    method = learned(experts=3, top_k=2, balance_weight=0.5, z_weight=0.25)
    attach(model, method)
    model(IDS)
    parts = aux_losses(model)
    total, metrics = method.aux_loss(model)
    torch.testing.assert_close(total, 0.5 * parts["moe_balance"] + 0.25 * parts["moe_z"])
    assert sum(metrics[f"moe/share_e{e}"] for e in range(3)) == pytest.approx(1.0)
    assert {"moe/balance", "moe/z", "moe/load_entropy", "moe/router_entropy"} <= set(metrics)
    enforced = build_method(method_from_dict("moe", {"experts": 2}))
    attach(make_tiny_model(tokenizer), enforced)
    assert enforced.aux_loss(model) == (None, {})


# --------------------------------------------------------------------------------------------------
# end to end: a tiny SFT run, reload, Mixtral export


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, tiny_model_dir):
    from tunesmith.train.loop import train

    tmp = tmp_path_factory.mktemp("moe-run")
    recipe = tiny_recipe(tmp, tiny_model_dir, "method.name=moe", "method.moe.routing=learned",
                         "method.moe.experts=3", "method.moe.top_k=2", "method.moe.jitter=0.01",
                         "method.moe.capacity_factor=2.0", "train.steps=10", "train.lr=5e-3", "train.log_every=1")
    result = train(recipe)
    assert result.status == "completed"
    return result


def test_learned_moe_sft_run_trains_logs_utilisation_and_reloads(moe_run, tiny_model_dir):
    from tunesmith.infer.generate import load_for_inference
    from tunesmith.train.metrics import read_metrics

    rows = [r for r in read_metrics(moe_run.run_dir / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05
    for r in rows:
        assert sum(r[f"moe/share_e{e}"] for e in range(3)) == pytest.approx(1.0)
        assert 0 <= r["moe/load_entropy"] <= math.log(3) + 1e-9 and r["moe/balance"] >= 1.0 - 1e-6
    assert "expert share, last step" in (moe_run.run_dir / "report.md").read_text()
    method = json.loads((moe_run.output / "tunesmith_method.json").read_text())
    assert method["options"]["routing"] == "learned" and method["options"]["top_k"] == 2
    model, _ = load_for_inference(adapter=str(moe_run.run_dir))
    again, _ = load_for_inference(adapter=str(moe_run.run_dir))
    assert torch.equal(logits(model), logits(again))  # reload is deterministic (no stray noise or jitter)
    base, _ = load_for_inference(str(tiny_model_dir))
    assert (logits(model) - logits(base)).abs().max() > 1e-3, "training moved the model"
    assert len(moe_modules(model)) == 2 and all(isinstance(m.router, TopKRouter) for m in moe_modules(model))
    # serve's batched engine (left padding, KV cache): each prompt's next-token logits as on its own
    from tunesmith.serve.engine import Engine, Sequence

    prompts = [IDS[0, :7].tolist(), IDS[1, :3].tolist()]
    joined = Engine(model, pad_id=0).join([Sequence(p, max_tokens=1) for p in prompts])
    for row, p in zip(joined, prompts):
        torch.testing.assert_close(row, logits(model, torch.tensor([p]))[0, -1], atol=1e-5, rtol=1e-5)


def test_saved_adapter_reloads_with_equal_logits(tokenizer, tmp_path):
    from tunesmith.export.tuned import load_tuned, save_tuned

    model = make_tiny_model(tokenizer)
    method = learned(experts=3, top_k=2, capacity_factor=1.0)
    attach(model, method)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        out = model(IDS, labels=IDS)
        aux, _ = method.aux_loss(model)
        (out.loss + aux).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    expected = logits(model)
    save_tuned(model, method, "tiny", tmp_path / "adapter")
    fresh = make_tiny_model(tokenizer)
    load_tuned(fresh, tmp_path / "adapter")
    assert torch.equal(logits(fresh.eval()), expected)


def test_mixtral_export_loads_in_transformers_with_equal_logits(moe_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunesmith.cli import main
    from tunesmith.infer.generate import load_for_inference

    ours, _ = load_for_inference(adapter=str(moe_run.run_dir))
    assert main(["export", "--adapter", str(moe_run.run_dir), "--output", str(tmp_path / "mixtral")]) == 0
    config = json.loads((tmp_path / "mixtral" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 3
    assert config["num_experts_per_tok"] == 2
    from safetensors import safe_open

    with safe_open(str(tmp_path / "mixtral" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"model.layers.1.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.experts.2.w1.weight",
            "model.layers.0.block_sparse_moe.experts.0.w3.weight"} <= keys
    folder = tmp_path / "mixtral"
    assert (folder / "model.safetensors").stat().st_mode == (folder / "config.json").stat().st_mode
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "mixtral")).eval()
    assert type(theirs).__name__ == "MixtralForCausalLM"
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=1e-5)
    prompt = IDS[:1, :4]
    with torch.no_grad():  # generation with a KV cache routes token by token: the same greedy text
        a = theirs.generate(prompt, max_new_tokens=6, do_sample=False)
        b = ours.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


def test_what_is_not_mixtral_stays_an_adapter(tokenizer, tmp_path, tiny_model_dir, capsys):
    from tunesmith.cli import main
    from tunesmith.export.mixtral import mixtral_state
    from tunesmith.export.tuned import save_tuned

    partial = make_tiny_model(tokenizer)
    attach(partial, learned(experts=2, top_k=1, layers=[1]))
    with pytest.raises(ExportError, match="1 MoE layers of 2.*adapter"):
        mixtral_state(partial)
    enforced = make_tiny_model(tokenizer)
    method = build_method(method_from_dict("moe", {"experts": 2}))
    attach(enforced, method)
    save_tuned(enforced, method, str(tiny_model_dir), tmp_path / "enforced")
    assert main(["export", "--adapter", str(tmp_path / "enforced"), "--output", str(tmp_path / "out")]) == 2
    assert "enforced" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["moe", "moe_lora"])
def test_routers_get_their_own_learning_rate(tokenizer, name):
    """`router_lr_scale`: routers start near uniform and barely move at a full-tuning lr; their optimizer
    group runs at a multiple of it, every other trained parameter at train.lr."""
    from types import SimpleNamespace

    from tunesmith.train.optim import build_optimizer

    model = make_tiny_model(tokenizer)
    options = {"experts": 2, "routing": "learned", "top_k": 1, "router_lr_scale": 50.0}
    method = build_method(method_from_dict(name, {**options, **({"rank": 4} if name == "moe_lora" else {})}))
    attach(model, method)
    cfg = SimpleNamespace(lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), adamw="loop")
    optimizer = build_optimizer(model, cfg, method)
    routers = {id(m.router.weight) for m in moe_modules(model)}
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert routers and all(lr_of[r] == pytest.approx(5e-3) for r in routers)
    others = [lr for i, lr in lr_of.items() if i not in routers]
    assert others and all(lr == pytest.approx(1e-4) for lr in others)
