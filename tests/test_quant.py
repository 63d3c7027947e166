"""The quantised frozen base (model.quantize, QLoRA): int8 / int4 / NF4 weight-only Linears under LoRA.

Bounds are computed from the stored scales (|W − dequant| <= the per-weight bound, so a Linear's
output moves by at most Σ_k |x_k|·bound_nk), never taken as a constant."""
import pytest
import torch
from torch import nn

from conftest import make_tiny_model, perturb
from tunesmith.methods import attach, build_method
from tunesmith.methods.lora import LoRALinear
from tunesmith.models.quant import (QuantError, QuantizedWeight, QuantLinear, dense, dequantize_model,
                                    quantization, quantize_frozen)
from tunesmith.recipe import load_recipe

FORMATS = [("int8", 64), ("int4", 32), ("int4", 64), ("int4", 128), ("nf4", 64)]


def lora_model(tokenizer, targets="all-linear"):
    model = make_tiny_model(tokenizer)
    method = build_method(load_recipe(None, ["method.name=lora", "method.lora.rank=4",
                                             f"method.lora.targets=[{targets}]"]).method)
    attach(model, method)
    perturb(model)  # B non-zero: the adapters change the output
    return model, method


def dequantised_reference(model):
    """A plain copy of a quantised model: every quantised weight replaced by its dense dequantisation."""
    import copy

    ref = copy.deepcopy(model)
    for mod in ref.modules():
        if isinstance(getattr(mod, "weight", None), QuantizedWeight):
            w = mod.weight.dequantize()
            del mod.weight
            mod.weight = nn.Parameter(w, requires_grad=False)
    for name, mod in list(ref.named_modules()):
        if isinstance(mod, QuantLinear):
            parent, _, child = name.rpartition(".")
            plain = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            plain.weight = mod.weight
            setattr(ref.get_submodule(parent), child, plain)
    return ref


@pytest.mark.parametrize("mode,group", FORMATS)
def test_dequantised_weight_within_the_bound_from_its_scales(mode, group):
    torch.manual_seed(0)
    w = torch.randn(48, 96) * 0.05
    w[3, 7] = 0.9  # an outlier: its group's scale (and bound) grows, the others' do not
    q = QuantizedWeight(w, mode, group)
    err, bound = (w - q.dequantize()).abs(), q.error_bound()
    assert bool((err <= bound * (1 + 1e-5) + 1e-7).all())
    assert float(err.max()) > 0  # it really is quantised
    assert float(bound.median()) < float(bound.max())  # per-group / per-row scales, not one global one
    bits = 8 * q.nbytes() / w.numel()
    assert bits < {"int8": 8.7, "int4": 6.1, "nf4": 4.6}[mode]


def test_nf4_is_bitsandbytes_layout():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(1)
    w = torch.randn(32, 128)
    ours = QuantizedWeight(w, "nf4")
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(ours.qdata, packed.reshape(-1))
    assert torch.allclose(ours.scale, state.absmax)
    assert torch.allclose(ours.dequantize(), bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("mode,group", FORMATS)
def test_quantised_linear_output_within_the_bound(mode, group):
    torch.manual_seed(0)
    base = nn.Linear(96, 40)
    x = torch.randn(5, 96)
    q = QuantLinear(base, mode, group)
    y, y_dense = q(x), base(x)
    bound = x.abs() @ q.weight.error_bound().T  # Σ_k |x_k|·bound_nk
    assert bool(((y - y_dense).abs() <= bound * (1 + 1e-4) + 1e-5).all())
    assert not torch.allclose(y, y_dense, atol=1e-6)


@pytest.mark.parametrize("mode,group", FORMATS)
def test_lora_on_quantised_base_matches_dequantised_reference(tokenizer, mode, group):
    model, _ = lora_model(tokenizer, targets="q_proj")  # the other Linears become QuantLinear
    names = quantize_frozen(model, mode, group)
    assert any(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert any(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    ref = dequantised_reference(model)
    ids = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    out, out_ref = model(ids).logits, ref(ids).logits
    assert torch.allclose(out, out_ref, atol=1e-4, rtol=1e-4)
    out.float().square().mean().backward()
    out_ref.float().square().mean().backward()
    trained = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    trained_ref = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert trained.keys() == trained_ref.keys() and any(".layers.0." in n for n in trained)
    for n, g in trained.items():  # layer 0's adapters: the gradient went down through quantised layers
        assert g is not None and float(g.abs().max()) > 0
        assert torch.allclose(g, trained_ref[n], atol=1e-5, rtol=1e-3), n


def test_quantised_base_stays_frozen(tokenizer):
    model, _ = lora_model(tokenizer)
    quantize_frozen(model, "int4", 32)
    qweights = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    before = [(m.qdata.clone(), m.scale.clone()) for m in qweights]
    assert all(".lora_" in n or not p.requires_grad for n, p in model.named_parameters())
    assert not any(n.endswith("proj.weight") for n, _ in model.named_parameters())  # no dense copy kept
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(5, 1000, (1, 16))
    model(ids).logits.mean().backward()
    opt.step()
    for m, (qd, sc) in zip(qweights, before):
        assert torch.equal(m.qdata, qd) and torch.equal(m.scale, sc)
    assert not any("qdata" in k or "scale" in k for k in model.state_dict())  # never saved with a delta


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_merged_equals_unmerged_quantised_and_differs_from_base(tokenizer, mode):
    model, method = lora_model(tokenizer, targets="q_proj")
    base = make_tiny_model(tokenizer)  # the same seed: the original weights
    quantize_frozen(model, mode)
    ids = torch.randint(5, 1000, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
        lora = model.get_submodule("model.layers.0.self_attn.q_proj")
        merged = lora.merged()
        assert torch.allclose(merged.weight, dense(lora.weight) + lora.delta_weight(), atol=1e-6)
        method.merge(model)
        assert dequantize_model(model) > 0 and quantization(model) is None
        got, plain = model(ids).logits, base(ids).logits
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_export_merged_dequantises(tokenizer, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunesmith.export.merged import export_merged
    from tunesmith.export.tuned import save_tuned

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    method = build_method(load_recipe(None, ["method.name=lora", "method.lora.rank=4"]).method)
    attach(model, method)
    perturb(model)
    save_tuned(model, method, str(tiny_model_dir), tmp_path / "adapter")
    ids = torch.randint(5, 1000, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain_lora = model(ids).logits
        quantize_frozen(model, "nf4")
        want = model(ids).logits
    out = export_merged(str(tiny_model_dir), tmp_path / "adapter", tmp_path / "merged", quantize="nf4")
    got = AutoModelForCausalLM.from_pretrained(str(out))(ids).logits.detach()
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, plain_lora, atol=1e-4)


def test_refuses_trained_base_and_unknown_mode(tokenizer):
    model = make_tiny_model(tokenizer)  # every weight trains (a full fine-tune)
    with pytest.raises(QuantError, match="cannot"):
        quantize_frozen(model, "int8")
    with pytest.raises(QuantError, match="not a format"):
        quantize_frozen(model, "int3")
    assert quantize_frozen(model, "none") == []


def test_meta_device_sizes(tokenizer):
    model = make_tiny_model(tokenizer).to("meta")
    for p in model.parameters():
        p.requires_grad_(False)
    quantize_frozen(model, "nf4")
    q = model.get_submodule("model.layers.0.mlp.up_proj").weight
    assert q.qdata.is_meta and q.nbytes() == q.numel() // 2 + 4 * q.numel() // 64


def test_size_estimate_weights_follow_the_format():
    from tunesmith.bench.estimate_sizes import format_sizes, measure, size_config

    bf16, nf4 = measure("0.5B", "lora", "bf16", tokens=64), measure("0.5B", "lora", "nf4", tokens=64)
    c = size_config("0.5B")
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    per_layer = c.hidden_size * (2 * c.hidden_size + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    linear = c.num_hidden_layers * per_layer  # decoder Linear weights: bf16 (2 bytes) -> NF4 (0.5 + 4/64)
    assert bf16.parts["weights"] - nf4.parts["weights"] == linear * (2 - 0.5 - 4 / 64)
    assert bf16.parts["activations"] == nf4.parts["activations"] > bf16.parts["activations_ckpt"]
    assert bf16.trainable == nf4.trainable and bf16.peak() > nf4.peak()
    full = measure("0.5B", "full", "int8", tokens=64)
    assert full.note and "cannot train" in format_sizes([full], 64)


def test_qlora_run_end_to_end(tokenizer, tiny_model_dir, tmp_path):
    """model.quantize through the trainer: the adapter records the base format, the merged export reads it back
    and equals the trained (quantised base + LoRA) model; a full fine-tune is refused by name."""

    from transformers import AutoModelForCausalLM

    from conftest import tiny_recipe
    from tunesmith.export.merged import export_merged
    from tunesmith.export.tuned import read_method
    from tunesmith.train.loop import train
    from tunesmith.train.prepare import prepare_model
    from tunesmith.train.safety import TrainError

    recipe = tiny_recipe(tmp_path, tiny_model_dir, "model.quantize=int4", "train.steps=3", "method.lora.dropout=0")
    result = train(recipe)
    _, meta = read_method(result.output)
    assert meta["quantize"] == {"mode": "int4", "group_size": 64}
    trained, _, _ = prepare_model(tiny_recipe(tmp_path, tiny_model_dir, "model.quantize=int4",
                                              f"model.adapter={result.output}"))
    assert quantization(trained) == {"mode": "int4", "group_size": 64}
    ids = torch.randint(5, 1000, (1, 9), generator=torch.Generator().manual_seed(4))
    merged = export_merged(str(tiny_model_dir), result.output, tmp_path / "merged")
    with torch.no_grad():
        want = trained.eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(merged))(ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, base, atol=1e-3)
    with pytest.raises(TrainError, match="cannot"):
        prepare_model(tiny_recipe(tmp_path, tiny_model_dir, "model.quantize=int8", "method.name=full"))


def test_estimate_sizes_command(capsys):
    from tunesmith.cli import main

    assert main(["estimate", "--sizes", "--sizes-tokens", "64"]) == 0
    out = capsys.readouterr().out
    for size in ("0.5B", "1B", "3B", "8B"):
        assert f"| {size} | lora | nf4 |" in out and f"| {size} | full | bf16 |" in out
