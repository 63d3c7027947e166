"""Bottleneck adapters and (IA)³ on the tiny model: each form computes its formula, zero init is the
base model, parallel reads the input and sequential the output, packing / activation checkpointing /
bf16 / generation / deep copies work; IA3's formula, merge, errors and PEFT parity."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import make_tiny_model
from tunesmith.methods import MethodError, attach, build_method
from tunesmith.methods.adapters import Adapters, BottleneckAdapter
from tunesmith.methods.ia3 import IA3Linear
from tunesmith.recipe import AdapterConfig, method_from_dict

IDS = torch.randint(5, 1000, (2, 10), generator=torch.Generator().manual_seed(3))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def perturb(model, seed=2, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def adapted(tokenizer, form="parallel", sublayers=("ffn",), bottleneck=8, scale=2.0, nonzero=True):
    model = make_tiny_model(tokenizer)
    method = build_method(method_from_dict("adapter", {"form": form, "sublayers": list(sublayers),
                                                       "bottleneck": bottleneck, "scale": scale}))
    torch.manual_seed(1)
    attach(model, method)
    if nonzero:
        perturb(model)
    return model, method


def delta(adapter: BottleneckAdapter, z):
    """s · (ReLU(z W_down + b1) W_up + b2), by hand."""
    hidden = torch.relu(z @ adapter.down.weight.T + adapter.down.bias)
    return adapter.scale * (hidden @ adapter.up.weight.T + adapter.up.bias)


def capture(module):
    """Record the (args, kwargs) a module is called with and its final output (after our hook)."""
    seen = {}
    module.register_forward_pre_hook(lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    module.register_forward_hook(lambda m, a, o: seen.update(out=o))
    return seen


def ffn_by_hand(mlp, x):
    return mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))


@pytest.mark.parametrize("form", ["sequential", "parallel"])
@pytest.mark.parametrize("sublayer", ["attn", "ffn"])
def test_adapter_computes_its_formula(tokenizer, form, sublayer):
    model, _ = adapted(tokenizer, form, [sublayer])
    plain = make_tiny_model(tokenizer)  # the same base weights, no adapters
    layer, ref = model.model.layers[1], plain.model.layers[1]
    mod = layer.mlp if sublayer == "ffn" else layer.self_attn
    seen = capture(mod)
    logits(model)
    x = seen["kwargs"].get("hidden_states", seen["args"][0] if seen["args"] else None)
    out = seen["out"][0] if sublayer == "attn" else seen["out"]
    with torch.no_grad():
        if sublayer == "ffn":
            base = ffn_by_hand(layer.mlp, x)
        else:  # the base attention output: the unadapted model's sublayer on the same call
            base = ref.self_attn(*seen["args"], **seen["kwargs"])[0]
        expected = base + delta(mod.adapter, x if form == "parallel" else base)
    assert (expected - base).abs().max() > 1e-3, "the adapter must contribute something"
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_parallel_reads_the_input_and_sequential_the_output(tokenizer):
    seq, _ = adapted(tokenizer, "sequential", ["ffn"])
    par, _ = adapted(tokenizer, "parallel", ["ffn"])
    mlp_s, mlp_p = seq.model.layers[0].mlp, par.model.layers[0].mlp
    torch.testing.assert_close(mlp_s.adapter.up.weight, mlp_p.adapter.up.weight)  # the same adapter
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = ffn_by_hand(mlp_s, x)
        on_input, on_output = base + delta(mlp_s.adapter, x), base + delta(mlp_s.adapter, base)
        assert (on_input - on_output).abs().max() > 1e-3, "the case must tell input from output"
        torch.testing.assert_close(mlp_p(x), on_input)
        torch.testing.assert_close(mlp_s(x), on_output)


@pytest.mark.parametrize("form,sublayers", [("sequential", ["attn", "ffn"]), ("parallel", ["attn", "ffn"])])
def test_zero_init_is_the_base_model_exactly(tokenizer, form, sublayers):
    model, _ = adapted(tokenizer, form, sublayers, nonzero=False)
    a = model.model.layers[0].self_attn.adapter
    assert a.down.weight.abs().max() > 0 and not a.up.weight.any() and not a.down.bias.any() and not a.up.bias.any()
    assert torch.equal(logits(model), logits(make_tiny_model(tokenizer)))


def test_adapter_keys_and_trainable_set(tokenizer):
    model, method = adapted(tokenizer, "parallel", ["attn", "ffn"])
    base_keys = set(make_tiny_model(tokenizer).state_dict())
    added = set(model.state_dict()) - base_keys
    assert added == {f"model.layers.{i}.{s}.adapter.{p}.{w}" for i in range(2) for s in ("self_attn", "mlp")
                     for p in ("down", "up") for w in ("weight", "bias")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == added
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in added)


def test_adapter_export_delta_holds_only_its_tensors(tokenizer):
    """MAM saves `adapter.export_delta(model)` next to its prefix part's tensors: the adapter part
    must not carry the other part's parameters."""
    from tunesmith.methods import Compose
    from tunesmith.methods.lora import LoRA
    from tunesmith.recipe import LoraConfig

    model = make_tiny_model(tokenizer)
    adapter = Adapters(AdapterConfig(form="parallel", sublayers=["ffn"], bottleneck=8, scale=4.0))
    attach(model, Compose("both", [LoRA(LoraConfig(rank=2, targets=["q_proj"])), adapter]))
    tensors, options = adapter.export_delta(model)
    assert set(tensors) == {f"model.layers.{i}.mlp.adapter.{p}.{w}" for i in range(2) for p in ("down", "up")
                            for w in ("weight", "bias")}
    assert options.form == "parallel" and any(".lora_a" in n for n, p in model.named_parameters() if p.requires_grad)


def test_packed_equals_one_by_one_with_adapters(tokenizer):
    from tests.conftest import sample
    from tunesmith.data import collate
    from tunesmith.models.attention import use_packed_attention
    from tunesmith.objectives.sft import forward_hidden

    rng = torch.Generator().manual_seed(0)
    samples = [sample(rng, 9, 3), sample(rng, 14, 5), sample(rng, 6, 1)]
    model, _ = adapted(tokenizer, "parallel", ["attn", "ffn"])
    use_packed_attention(model)
    with torch.no_grad():
        packed = model.lm_head(forward_hidden(model, collate(samples, packing=True, pad_id=tokenizer.pad_token_id)))[0]
        start = 0
        for s in samples:
            alone = model.lm_head(forward_hidden(model, collate([s], packing=True, pad_id=tokenizer.pad_token_id)))[0]
            torch.testing.assert_close(packed[start:start + len(s["input_ids"])], alone, atol=1e-5, rtol=1e-5)
            start += len(s["input_ids"])


@pytest.mark.parametrize("form", ["sequential", "parallel"])
def test_activation_checkpointing_gives_the_same_gradients(tokenizer, form):
    model, _ = adapted(tokenizer, form, ["attn", "ffn"])
    model.train()
    calls = []
    for m in model.modules():
        if isinstance(m, BottleneckAdapter):
            m.register_forward_hook(lambda *a: calls.append(1))

    def grads():
        calls.clear()
        model.zero_grad(set_to_none=True)
        model(IDS, labels=IDS).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)

    plain, n_plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed, n_ckpt = grads()
    assert n_ckpt > n_plain, "checkpointing must recompute the adapters in backward"
    assert plain.keys() == checkpointed.keys() and all(g.abs().max() > 0 for g in plain.values())
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], atol=1e-6, rtol=1e-5)


def test_adapter_under_bf16(tokenizer):
    model, _ = adapted(tokenizer, "sequential", ["attn", "ffn"])
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(IDS, labels=IDS).loss
    loss.backward()
    a = model.model.layers[0].mlp.adapter
    assert torch.isfinite(loss) and a.up.weight.grad.dtype == torch.float32 and a.up.weight.grad.abs().max() > 0
    for p in model.parameters():  # a bf16 frozen base, no autocast
        if not p.requires_grad:
            p.data = p.data.bfloat16()
    out = logits(model)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_generation_with_cache_matches_without(tokenizer):
    model, _ = adapted(tokenizer, "parallel", ["attn", "ffn"], scale=4.0)
    prompt = IDS[:1, :6]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
    assert cached.shape[1] == 12 and torch.equal(cached, uncached)


def test_a_deep_copy_runs_its_own_adapters(tokenizer):
    model, _ = adapted(tokenizer, "parallel", ["ffn"])
    before = logits(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.layers[0].mlp.adapter.up.bias.add_(1.0)
    assert torch.equal(logits(model), before)
    assert (logits(twin) - before).abs().max() > 1e-3


def test_adapter_needs_the_sublayer(tokenizer):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = nn.Linear(8, 8)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

    method = Adapters(AdapterConfig(sublayers=["ffn"]))
    with pytest.raises(MethodError, match=r"sublayers: `ffn`.*mixer"):
        method.apply(Net())
    with pytest.raises(MethodError, match="no decoder blocks"):
        method.apply(nn.Sequential(nn.Linear(8, 8)))


# ------------------------------------------------------------------------------------------------
# (IA)³


def ia3_model(tokenizer, nonzero=True, **opts):
    model = make_tiny_model(tokenizer)
    method = build_method(method_from_dict("ia3", opts))
    attach(model, method)
    if nonzero:
        perturb(model, std=0.3)
    return model, method


def test_ia3_formula_and_init(tokenizer):
    model, _ = ia3_model(tokenizer, nonzero=False)
    assert torch.equal(logits(model), logits(make_tiny_model(tokenizer)))
    perturb(model, std=0.3)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.k_proj, IA3Linear) and not isinstance(attn.q_proj, IA3Linear)
    assert attn.v_proj.ia3_l.shape == (32,) and mlp.down_proj.ia3_l.shape == (128,)
    x, inner = torch.randn(3, 64), torch.randn(3, 128)
    with torch.no_grad():
        for proj in (attn.k_proj, attn.v_proj):
            torch.testing.assert_close(proj(x), (x @ proj.weight.T) * proj.ia3_l)
        d = mlp.down_proj
        torch.testing.assert_close(d(inner), (inner * d.ia3_l) @ d.weight.T)
        assert (d(inner) - inner @ d.weight.T).abs().max() > 1e-3


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_merge_folds_rows_bias_or_columns(feedforward):
    torch.manual_seed(0)
    base = nn.Linear(6, 4, bias=True)
    layer = IA3Linear(base, feedforward=feedforward)
    with torch.no_grad():
        layer.ia3_l.copy_(torch.rand(layer.ia3_l.shape) + 0.5)
    merged = layer.merged()
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), layer(x))
        assert (merged(x) - base(x)).abs().max() > 1e-3
    assert set(merged.state_dict()) == {"weight", "bias"}
    if feedforward:
        assert torch.equal(merged.bias, base.bias)  # input scaling leaves the bias alone


def test_ia3_merge_on_the_model(tokenizer):
    model, method = ia3_model(tokenizer)
    unmerged = logits(model)
    method.merge(model)
    assert not any(isinstance(m, IA3Linear) for m in model.modules())
    assert set(model.state_dict()) == set(make_tiny_model(tokenizer).state_dict())
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-4)


def test_ia3_errors(tokenizer):
    with pytest.raises(MethodError, match=r"ia3\.targets.*nope"):
        ia3_model(tokenizer, targets=["nope"], feedforward=[])
    with pytest.raises(MethodError, match=r"ia3\.feedforward: `down_proj` is not among"):
        ia3_model(tokenizer, targets=["k_proj", "v_proj"], feedforward=["down_proj"])
    with pytest.raises(MethodError, match=r"ia3\.feedforward: `gone`"):
        ia3_model(tokenizer, feedforward=["gone"])


def test_ia3_peft_parity(tokenizer, tmp_path):
    from peft import PeftModel

    from tunesmith.export.tuned import save_tuned

    model, method = ia3_model(tokenizer, targets=["k_proj", "v_proj", "layers.1.mlp.down_proj"],
                              feedforward=["down_proj"])
    ours = logits(model)
    save_tuned(model, method, "tiny", tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(make_tiny_model(tokenizer), tmp_path / "adapter").eval()
    wrapped = [n for n, _ in peft_model.named_modules() if n.endswith(("k_proj", "v_proj", "down_proj"))
               and hasattr(peft_model.get_submodule(n), "ia3_l")]
    assert len(wrapped) == 5  # layer 0's down_proj is not a target
    theirs = logits(peft_model)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    assert (theirs - logits(make_tiny_model(tokenizer))).abs().max() > 1e-3


def test_ia3_under_bf16(tokenizer):
    model, _ = ia3_model(tokenizer)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(IDS, labels=IDS).loss
    loss.backward()
    l = model.model.layers[0].mlp.down_proj.ia3_l
    assert torch.isfinite(loss) and l.grad.dtype == torch.float32 and l.grad.abs().max() > 0
    for p in model.parameters():  # a bf16 frozen base, no autocast
        if not p.requires_grad:
            p.data = p.data.bfloat16()
    out = logits(model)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
