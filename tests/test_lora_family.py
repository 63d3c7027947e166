"""The LoRA family as options of `lora`: LoRA+ (B's faster learning rate), DoRA (magnitude and
direction, parity with PEFT's forward, backward and files) and PiSSA (principal-part init on the
residual, saved as the equivalent rank-2r LoRA on the original base). Merge, save/load and resume
of each are in test_method_invariants.py; here is what is specific to each option. Every
comparison uses non-zero deltas and checks they change the logits, so none passes on a no-op."""
import json
import math

import peft  # a test dependency (the `test` extra): parity must fail, not skip, without it
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import make_tiny_model
from tunesmith.export import ExportError, load_adapter
from tunesmith.export.tuned import load_tuned, save_tuned
from tunesmith.methods import MethodError, adapters_disabled, attach, build_method, delta_state
from tunesmith.methods.lora import LoRALinear, lora_modules
from tunesmith.recipe import load_recipe, method_from_dict
from tunesmith.train.optim import build_optimizer, build_scheduler

IDS = torch.randint(5, 1000, (2, 10), generator=torch.Generator().manual_seed(7))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def tuned(tokenizer, seed=1, **opts):
    """A tiny model with `lora` applied (options `opts`), the method and its MethodConfig."""
    model = make_tiny_model(tokenizer)
    cfg = method_from_dict("lora", {"rank": 4, "alpha": 8, **opts})
    method = build_method(cfg)
    torch.manual_seed(seed)
    attach(model, method)
    return model, method, cfg


def perturb(model, seed=2, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std * (p.abs().mean() if p.ndim == 1 else 1))


def assert_changed(a, b):
    assert (a - b).abs().max() > 1e-3, "the adapter does not change the logits: the test would be vacuous"


# -------------------------------------------------------------------------------------------------
# LoRA+


def test_lora_plus_b_learns_ratio_times_faster(tokenizer):
    recipe = load_recipe(None, ["train.lr=1e-3", "train.weight_decay=0", "train.warmup=3", "train.schedule=linear"])
    moves = {}
    for ratio in (1.0, 16.0):
        model, method, _ = tuned(tokenizer, plus_ratio=ratio)
        perturb(model)  # B ≠ 0, so A gets gradients too
        opt = build_optimizer(model, recipe.train, method)
        lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        for name, p in model.named_parameters():
            if p.requires_grad:
                want = ratio if name.endswith(".lora_b") else 1.0
                assert lr_of[id(p)] == pytest.approx(recipe.train.lr * want), name
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.train()
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        moves[ratio] = {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}

        if ratio == 1.0:
            continue  # one group: nothing to compare
        b_ids = {id(p) for n, p in model.named_parameters() if n.endswith(".lora_b")}
        sched = build_scheduler(opt, recipe.train, total_steps=10)
        seen = set()
        for _ in range(6):  # through warm-up and into the decay, B's lr stays `ratio` × A's
            by_kind = {id(g["params"][0]) in b_ids: g["lr"] for g in opt.param_groups}
            assert by_kind[True] == pytest.approx(ratio * by_kind[False])
            seen.add(round(by_kind[False], 12))
            opt.step()
            sched.step()
        assert len(seen) > 3, "the schedule did not move the learning rate"
    # the first AdamW step is lr·g/|g| per entry: the same gradients, so B moves 16× as far and A as far
    for name, plain in moves[1.0].items():
        plus = moves[16.0][name]
        assert plain.abs().max() > 0
        torch.testing.assert_close(plus, plain * (16.0 if name.endswith(".lora_b") else 1.0), rtol=1e-3, atol=1e-9)


def test_lora_plus_with_dora_puts_the_magnitude_with_b(tokenizer):
    _, method, _ = tuned(tokenizer, plus_ratio=4, dora=True)
    w = nn.Parameter(torch.zeros(3))
    assert method.optimizer_options("model.layers.0.mlp.up_proj.lora_magnitude", w) == {"lr_scale": 4.0}
    assert method.optimizer_options("model.layers.0.mlp.up_proj.lora_a", w) == {}
    _, plain, _ = tuned(tokenizer)
    assert plain.optimizer_options("model.layers.0.mlp.up_proj.lora_b", w) == {}


# -------------------------------------------------------------------------------------------------
# DoRA


def test_dora_starts_at_the_base_and_its_magnitude_is_the_row_norm(tokenizer):
    model, method, _ = tuned(tokenizer, dora=True)
    base = make_tiny_model(tokenizer)
    torch.testing.assert_close(logits(model), logits(base), atol=1e-5, rtol=0)
    mods = lora_modules(model)
    for name, m in mods.items():
        w = base.get_submodule(name).weight
        torch.testing.assert_close(m.lora_magnitude, w.norm(dim=1), rtol=1e-6, atol=0)
    assert all(f"{n}.lora_magnitude" in delta_state(model, method) for n in mods)


def test_dora_layer_formula_with_bias():
    """W' = m ⊙ (W + sBA)/||W + sBA||_row; the bias is added after, not rescaled."""
    torch.manual_seed(0)
    base = nn.Linear(12, 6, bias=True)
    layer = LoRALinear(base, rank=3, alpha=6, dora=True)
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.3)
        layer.lora_magnitude.mul_(torch.linspace(0.5, 2.0, 6))
    x = torch.randn(4, 12)
    w = base.weight + 2.0 * layer.lora_b @ layer.lora_a
    want = F.linear(x, layer.lora_magnitude[:, None] * w / w.norm(dim=1, keepdim=True), base.bias)
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.merged()(x), want, atol=1e-5, rtol=1e-5)
    assert (want - base(x)).abs().max() > 1e-2
    layer.disabled = True
    assert torch.equal(layer(x), base(x)), "disabled must be exactly the base layer"


def test_dora_disabled_is_exactly_the_base_model(tokenizer):
    model, _, _ = tuned(tokenizer, dora=True)
    perturb(model)
    base = logits(make_tiny_model(tokenizer))
    assert_changed(logits(model), base)
    with adapters_disabled(model):
        assert torch.equal(logits(model), base)


def test_dora_forward_and_backward_match_peft_with_dropout(tokenizer, tmp_path):
    """Same logits and the same gradients as PEFT in training mode with dropout (same seeds, same
    masks): the norm is a constant in backward and dropout reaches both DoRA terms, as in PEFT."""
    ours, method, _ = tuned(tokenizer, dora=True, dropout=0.2)
    perturb(ours)
    save_tuned(ours, method, "tiny", tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(make_tiny_model(tokenizer), str(tmp_path / "a"), is_trainable=True)
    ours.train(), theirs.train()
    grads = {}
    for key, model in (("ours", ours), ("theirs", theirs)):
        torch.manual_seed(11)
        out = model(input_ids=IDS, labels=IDS)
        out.loss.backward()
        grads[key] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        grads[key + "_logits"] = out.logits.detach()
    torch.testing.assert_close(grads["ours_logits"], grads["theirs_logits"], atol=1e-5, rtol=0)
    peft_name = {".lora_a": ".lora_A.default.weight", ".lora_b": ".lora_B.default.weight",
                 ".lora_magnitude": ".lora_magnitude_vector.default.weight"}
    assert len(grads["ours"]) == len(grads["theirs"]) == 3 * len(lora_modules(ours))
    for name, g in grads["ours"].items():
        suffix = "." + name.rsplit(".", 1)[1]
        other = grads["theirs"]["base_model.model." + name.removesuffix(suffix) + peft_name[suffix]]
        assert g.abs().max() > 0
        torch.testing.assert_close(g, other, atol=1e-6, rtol=1e-4)


def test_peft_loads_our_dora_adapter_with_same_logits(tokenizer, tmp_path):
    ours, method, _ = tuned(tokenizer, dora=True, targets=["q_proj", "down_proj"])
    perturb(ours)
    ours.eval()
    save_tuned(ours, method, "tiny", tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == 4
    theirs = peft.PeftModel.from_pretrained(make_tiny_model(tokenizer), str(tmp_path / "a")).eval()
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=0)
    assert_changed(logits(ours), logits(make_tiny_model(tokenizer)))


def test_peft_saved_dora_adapter_loads_with_same_logits(tokenizer, tmp_path):
    theirs = peft.get_peft_model(make_tiny_model(tokenizer), peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["v_proj", "up_proj"], use_dora=True))
    perturb(theirs)
    theirs.eval()
    theirs.save_pretrained(str(tmp_path / "peft"))

    ours = load_adapter(make_tiny_model(tokenizer), tmp_path / "peft")
    assert all(m.dora for m in lora_modules(ours).values()) and len(lora_modules(ours)) == 4
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)
    assert_changed(logits(ours), logits(make_tiny_model(tokenizer)))

    fresh = make_tiny_model(tokenizer)  # the generic loader reads a PEFT-only folder the same way
    _, cfg = load_tuned(fresh, tmp_path / "peft")
    assert cfg.lora.dora and cfg.lora.rank == 4
    torch.testing.assert_close(logits(fresh), logits(theirs), atol=1e-5, rtol=0)


def test_dora_magnitude_mismatch_is_refused(tokenizer, tmp_path):
    ours, method, cfg = tuned(tokenizer, dora=True, targets=["q_proj"])
    save_tuned(ours, method, "tiny", tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_dora": False}))
    model = make_tiny_model(tokenizer)
    with pytest.raises(ExportError, match="lora_magnitude_vector"):
        load_adapter(model, tmp_path / "a")
    assert not lora_modules(model)


@pytest.mark.parametrize("opts", [{"dora": True}, {"init": "pissa"}, {"dora": True, "init": "pissa"}],
                         ids=["dora", "pissa", "dora+pissa"])
def test_trains_under_bf16(tokenizer, opts):
    """Frozen weights in bf16, with bf16 autocast (train.precision=bf16) and without it."""
    model, _, _ = tuned(tokenizer, dropout=0.1, **opts)
    perturb(model)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.bfloat16()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(IDS, labels=IDS).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    model.eval()
    assert torch.isfinite(logits(model)).all()


# -------------------------------------------------------------------------------------------------
# PiSSA


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_init_is_the_principal_part_and_starts_at_the_base(tokenizer, rslora):
    model, method, _ = tuned(tokenizer, init="pissa", alpha=6, rslora=rslora)
    base = make_tiny_model(tokenizer)
    torch.testing.assert_close(logits(model), logits(base), atol=1e-5, rtol=0)
    for name, m in lora_modules(model).items():
        w = base.get_submodule(name).weight
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        principal = (u[:, :4] * s[:4]) @ vh[:4]
        torch.testing.assert_close(m.delta_weight(), principal, atol=1e-5, rtol=0)
        torch.testing.assert_close(m.weight, w - principal, atol=1e-5, rtol=0)
        assert torch.equal(m.lora_a, m.lora_a0) and torch.equal(m.lora_b, m.lora_b0)
    state = delta_state(model, method)
    assert {k.rsplit(".", 1)[1] for k in state} == {"lora_a", "lora_b", "lora_a0", "lora_b0"}


def test_pissa_init_matches_peft(tokenizer):
    ours, _, _ = tuned(tokenizer, init="pissa", targets=["q_proj", "gate_proj"])
    theirs = peft.get_peft_model(make_tiny_model(tokenizer), peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"], init_lora_weights="pissa"))
    for name, m in lora_modules(ours).items():
        layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(m.lora_a, layer.lora_A["default"].weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(m.lora_b, layer.lora_B["default"].weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(m.weight, layer.base_layer.weight, atol=1e-5, rtol=0)


def test_pissa_disabled_is_the_original_base(tokenizer):
    model, _, _ = tuned(tokenizer, init="pissa")
    perturb(model)
    base = logits(make_tiny_model(tokenizer))
    assert_changed(logits(model), base)
    with adapters_disabled(model):
        torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=0)


@pytest.mark.parametrize("opts", [{}, {"rslora": True}, {"dora": True}], ids=["plain", "rslora", "dora"])
def test_pissa_saves_as_rank_2r_lora_on_the_original_base(tokenizer, tmp_path, opts):
    model, method, cfg = tuned(tokenizer, init="pissa", alpha=5, **opts)
    perturb(model)
    model.eval()
    expected = logits(model)
    save_tuned(model, method, "tiny", tmp_path / "a")

    meta = json.loads((tmp_path / "a" / "tunesmith_method.json").read_text())
    want_alpha = 5 * (math.sqrt(2) if opts.get("rslora") else 2)
    assert meta["options"]["init"] == "default" and meta["options"]["rank"] == 8
    assert meta["options"]["alpha"] == pytest.approx(want_alpha)
    peft_cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (peft_cfg["r"], peft_cfg["init_lora_weights"]) == (8, True)
    assert peft_cfg["lora_alpha"] == pytest.approx(want_alpha)

    fresh = make_tiny_model(tokenizer)  # the ORIGINAL base: no SVD, no residual
    _, loaded = load_tuned(fresh, tmp_path / "a")
    assert loaded.lora.init == "default" and loaded.lora.rank == 8
    torch.testing.assert_close(logits(fresh), expected, atol=1e-5, rtol=1e-4)
    assert_changed(expected, logits(make_tiny_model(tokenizer)))

    merged = make_tiny_model(tokenizer)
    load_tuned(merged, tmp_path / "a")[0].merge(merged)
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("opts", [{}, {"dora": True}], ids=["pissa", "pissa+dora"])
def test_peft_loads_our_pissa_adapter_with_same_logits(tokenizer, tmp_path, opts):
    ours, method, _ = tuned(tokenizer, init="pissa", rslora=True, targets=["k_proj", "o_proj", "up_proj"], **opts)
    perturb(ours)
    ours.eval()
    save_tuned(ours, method, "tiny", tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(make_tiny_model(tokenizer), str(tmp_path / "a")).eval()
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=1e-4)
    assert_changed(logits(ours), logits(make_tiny_model(tokenizer)))


def test_pissa_rank_larger_than_the_matrix_is_a_clear_error(tokenizer):
    with pytest.raises(MethodError, match=r"lora\.rank.*at most 32"):
        tuned(tokenizer, init="pissa", rank=40, targets=["k_proj"])  # k_proj is 64 -> 32
