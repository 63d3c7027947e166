"""MoE-LoRA (method moe_lora): E LoRA experts on one frozen shared MLP per layer. At init == the base
model; only the LoRA factors and the router train and the shared weights are the base tensors
(no copies); a learned top-k layer computes the hand-computed mix of its experts; enforced routing
reaches exactly one expert; save -> reload gives the same logits; merge refuses, expand gives
full experts with the same output."""
import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import make_tiny_model, perturb
from tunesmith.methods import attach, build_method, count_parameters, delta_state
from tunesmith.methods.base import MethodError
from tunesmith.methods.lora import LoRALinear
from tunesmith.methods.moe_lora import expand
from tunesmith.models.moe import MoEMLP, TopKRouter, aux_losses, moe_modules, routing
from tunesmith.recipe import method_from_dict

IDS = torch.randint(5, 1000, (3, 10), generator=torch.Generator().manual_seed(3))


def moe_lora(model, **opts):
    method = build_method(method_from_dict("moe_lora", {"experts": 3, "rank": 4, "alpha": 8, **opts}))
    torch.manual_seed(1)
    attach(model, method)
    return method


def logits(model, route=None):
    with torch.no_grad(), routing(model, route):
        return model(IDS).logits


def tiny_bert(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).eval()


def test_at_init_equals_the_base_model(tokenizer):
    """B = 0: every expert is the base MLP. One expert per token: bit-identical; a learned top-2 mix
    of equal outputs: equal up to the rounding of Σ gates = 1."""
    base = logits(make_tiny_model(tokenizer))
    enforced = make_tiny_model(tokenizer)
    moe_lora(enforced, routing="enforced")
    assert torch.equal(logits(enforced), base)
    assert torch.equal(logits(enforced, 2), base)
    learned = make_tiny_model(tokenizer)
    moe_lora(learned)
    assert all(m.router is not None for m in moe_modules(learned))
    torch.testing.assert_close(logits(learned), base, atol=1e-5, rtol=1e-5)


def test_bert_enforced_at_init_equals_base_and_learned_is_refused():
    model = tiny_bert()
    ids = torch.randint(5, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids=ids).last_hidden_state
    moe_lora(model, routing="enforced")
    assert len(moe_modules(model)) == 4  # intermediate and output.dense of both layers
    with torch.no_grad(), routing(model, torch.tensor([2, 2])):
        assert torch.equal(model(input_ids=ids).last_hidden_state, base)
    with torch.no_grad(), routing(model, torch.tensor([1, 2])):  # row subsets: matmul rounding may differ
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, base, atol=1e-6, rtol=1e-6)
    with pytest.raises(MethodError, match="routing=enforced"):
        moe_lora(tiny_bert())


def test_only_router_and_lora_train_and_the_experts_share_the_base_weights(tokenizer):
    model = make_tiny_model(tokenizer)
    total_before = count_parameters(model)[1]
    method = moe_lora(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_a", ".lora_b", ".router.weight")) for n in trainable)
    assert sum(n.endswith(".router.weight") for n in trainable) == 2  # one router per layer
    assert sum(n.endswith(".lora_a") for n in trainable) == 2 * 3 * 3  # layers × experts × linears
    # shared, not copied: the experts' linears hold the base tensors themselves
    for m in moe_modules(model):
        for k in range(1, m.n_experts):
            for name in ("gate_proj", "up_proj", "down_proj"):
                assert getattr(m.expert(k), name).weight is getattr(m, name).weight
    added = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert count_parameters(model)[1] == total_before + added
    delta = delta_state(model, method)
    assert set(delta) == set(method.trained_names)  # the adapter holds router + LoRA, no shared weights
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturb(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trainable)
    assert all(not torch.equal(before[n], after[n]) for n in trainable if n.endswith((".lora_b", ".router.weight")))


def merged(lin: LoRALinear) -> torch.Tensor:
    return lin.weight + lin.scale * lin.lora_b @ lin.lora_a


def hand_expert(mlp, x):
    """A Llama MLP with each linear's LoRA merged by hand: down(silu(gate x) * up x). (Differs from the
    factored W x + s·B(A x) by float rounding: the tests below compare within 1e-4, while experts differ by > 1e-2.)"""
    return F.linear(F.silu(F.linear(x, merged(mlp.gate_proj))) * F.linear(x, merged(mlp.up_proj)),
                    merged(mlp.down_proj))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_learned_top_k_layer_is_the_hand_computed_mix(tokenizer, top_k):
    model = make_tiny_model(tokenizer)
    moe_lora(model, top_k=top_k)
    perturb(model, std=0.3)  # distinct LoRA experts and a decisive router
    layer = moe_modules(model)[0]
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = layer(x)
        probs = torch.softmax(x @ layer.router.weight.T, dim=-1)
        outs = torch.stack([hand_expert(layer.expert(e), x) for e in range(3)], dim=1)  # (n, E, d)
        want = torch.zeros_like(got)
        for i in range(6):
            top = sorted(range(3), key=lambda e: -float(probs[i, e]))[:top_k]
            norm = sum(float(probs[i, e]) for e in top)
            for e in top:
                want[i] += float(probs[i, e]) / norm * outs[i, e]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # W + s·BA merged by hand vs factored: rounding
    # not vacuous: the experts differ from each other
    assert (outs[:, 0] - outs[:, 1]).abs().max() > 1e-2


def test_enforced_route_runs_exactly_that_expert(tokenizer):
    model = make_tiny_model(tokenizer)
    moe_lora(model, routing="enforced")
    perturb(model, std=0.3)
    layer = moe_modules(model)[1]
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        for k in range(3):
            layer.route = torch.tensor(k)
            torch.testing.assert_close(layer(x), hand_expert(layer.expert(k), x), atol=1e-4, rtol=1e-4)
        layer.route = torch.tensor([[0, 0, 1, 2, 2], [2, 1, 1, 0, 0]])
        got = layer(x)
        layer.route = None
        assert (hand_expert(layer.expert(1), x) - hand_expert(layer.expert(2), x)).abs().max() > 1e-2
    for b in range(2):
        for t in range(5):
            k = int(torch.tensor([[0, 0, 1, 2, 2], [2, 1, 1, 0, 0]])[b, t])
            torch.testing.assert_close(got[b, t], hand_expert(layer.expert(k), x[b, t:t + 1])[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits(model, 1), logits(model, 2))


def test_aux_loss_is_the_weighted_router_losses(tokenizer):
    model = make_tiny_model(tokenizer)
    method = moe_lora(model, balance_weight=0.5, z_weight=0.25)
    model.train()
    model(IDS)
    total, metrics = method.aux_loss(model)
    losses = aux_losses(model)
    torch.testing.assert_close(total, 0.5 * losses["moe_balance"] + 0.25 * losses["moe_z"])
    assert total.requires_grad and {"moe/balance", "moe/z", "moe/share_e0", "moe/load_entropy"} <= set(metrics)
    enforced = make_tiny_model(tokenizer)
    method = moe_lora(enforced, routing="enforced")
    enforced(IDS)
    assert method.aux_loss(enforced) == (None, {})


def test_adapter_saves_router_and_lora_only_and_reloads_the_same_logits(tokenizer, tmp_path):
    from safetensors.torch import load_file

    from tunesmith.export.tuned import load_tuned, save_tuned

    model = make_tiny_model(tokenizer)
    method = moe_lora(model)
    perturb(model, std=0.2)
    expected = logits(model)
    save_tuned(model, method, "tiny", tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "delta.safetensors"))
    assert all(k.endswith((".lora_a", ".lora_b", ".router.weight")) for k in saved)
    assert len(saved) == 2 * (3 * 3 * 2 + 1)
    fresh = make_tiny_model(tokenizer)
    base = logits(fresh)
    loaded, cfg = load_tuned(fresh, tmp_path / "adapter")
    assert cfg.name == "moe_lora" and cfg.moe_lora.experts == 3
    got = logits(fresh)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert (got - base).abs().max() > 1e-3


def test_merge_refuses_and_expand_gives_full_experts_with_the_same_output(tokenizer):
    model = make_tiny_model(tokenizer)
    method = moe_lora(model)
    perturb(model, std=0.2)
    with pytest.raises(MethodError, match="expand"):
        method.merge(model)
    before = logits(model)
    routers = [m.router for m in moe_modules(model)]
    made = expand(model)
    assert len(made) == 2 and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert [m.router for m in moe_modules(model)] == routers
    for m in made:
        weights = [m.expert(k).gate_proj.weight for k in range(3)]
        assert len({w.data_ptr() for w in weights}) == 3  # E full experts, no shared storage
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)
    with pytest.raises(MethodError, match="no MoE-LoRA"):
        expand(model)


def test_bad_options_are_one_line_errors(tokenizer):
    with pytest.raises(MethodError, match="top_k=4 is more than the 3 experts"):
        moe_lora(make_tiny_model(tokenizer), top_k=4)
    with pytest.raises(MethodError, match="rank=80 is too large"):
        moe_lora(make_tiny_model(tokenizer), rank=80)
    model = make_tiny_model(tokenizer)
    moe_lora(model, layers=[0])
    assert isinstance(model.model.layers[0].mlp, MoEMLP) and not isinstance(model.model.layers[1].mlp, MoEMLP)
    with pytest.raises(MethodError, match="already upcycled"):
        moe_lora(model, layers=[0])


def test_router_is_mixtrals_gate(tokenizer):
    model = make_tiny_model(tokenizer)
    moe_lora(model, top_k=2, jitter=0.1, capacity_factor=1.5)
    router = moe_modules(model)[0].router
    assert isinstance(router, TopKRouter) and router.k == 2 and router.n_experts == 3
    assert router.jitter == 0.1 and router.capacity_factor == 1.5
    assert tuple(router.weight.shape) == (3, 64) and math.isclose(float(router.weight.detach().std()), 0.02, rel_tol=0.6)


def test_training_run_logs_the_router_and_saves_the_adapter(tmp_path, tiny_model_dir):
    from tests.conftest import tiny_recipe
    from tunesmith.train.loop import train
    from tunesmith.train.metrics import read_metrics

    result = train(tiny_recipe(tmp_path, tiny_model_dir, "method.name=moe_lora", "method.moe_lora.experts=2",
                               "method.moe_lora.rank=4", "train.steps=3"))
    rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert rows and all("moe/balance" in r and "moe/share_e1" in r for r in rows)
    assert all(0.0 < r["moe/share_e0"] < 1.0 for r in rows)
    assert (result.output / "delta.safetensors").is_file()
    # `tunesmith export` of a learned-router MoE-LoRA: E full experts (LoRA merged in) as a transformers Mixtral
    from transformers import AutoModelForCausalLM

    from tunesmith.cli import main
    from tunesmith.infer.generate import load_for_inference

    ours, _ = load_for_inference(adapter=str(result.run_dir))
    assert main(["export", "--adapter", str(result.run_dir), "--output", str(tmp_path / "mixtral")]) == 0
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "mixtral")).eval()
    assert type(theirs).__name__ == "MixtralForCausalLM" and theirs.config.num_local_experts == 2
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-4, rtol=1e-4)


def test_expanded_moe_lora_is_a_transformers_mixtral_with_equal_logits(tokenizer, tmp_path):
    """A learned-router MoE-LoRA in every layer, expanded into full experts, is Mixtral's computation:
    the export's state dict, in the Hub's Mixtral layout, loads as a MixtralForCausalLM with the same logits."""
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoModelForCausalLM, MixtralConfig

    from tunesmith.export.mixtral import mixtral_state

    model = make_tiny_model(tokenizer)
    moe_lora(model, top_k=2)
    perturb(model, std=0.2)
    ours = logits(model)
    expand(model)
    kwargs, state = mixtral_state(model)
    save_torch_state_dict({n: t.contiguous() for n, t in state.items()}, tmp_path)
    MixtralConfig(**kwargs, architectures=["MixtralForCausalLM"]).save_pretrained(tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(theirs).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        got = theirs(IDS).logits
    torch.testing.assert_close(got, ours, atol=1e-4, rtol=1e-4)
    assert (ours - logits(make_tiny_model(tokenizer))).abs().max() > 1e-3
