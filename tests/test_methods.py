import math

import pytest
import torch

from tests.conftest import make_tiny_model
from tunesmith.methods import MethodError, adapters_disabled, build_method, mark_trainable
from tunesmith.methods.lora import LoRALinear, lora_modules
from tunesmith.recipe import MethodConfig, LoraConfig, FullConfig


def lora_model(tokenizer, **kw):
    model = make_tiny_model(tokenizer)
    base_keys = set(model.state_dict())
    method = build_method(MethodConfig(name="lora", lora=LoraConfig(**kw)))
    method.apply(model)
    mark_trainable(model, method)
    torch.manual_seed(1)
    for m in lora_modules(model).values():  # non-zero deltas, or merge tests prove nothing
        torch.nn.init.normal_(m.lora_b, std=0.05)
    return model, method, base_keys


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_lora_keeps_base_keys_and_trains_only_lora(tokenizer):
    model, method, base_keys = lora_model(tokenizer)
    keys = set(model.state_dict())
    assert base_keys <= keys, "base checkpoint keys must be unchanged"
    assert all(k.endswith((".lora_a", ".lora_b")) for k in keys - base_keys)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    # 2 layers x 7 linears x (a, b)
    assert len(trainable) == 2 * 7 * 2
    ids = torch.randint(0, 1000, (2, 12))
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in n), n


def test_lora_merge_equivalence(tokenizer):
    ids = torch.randint(0, 1000, (2, 10))
    base = logits(make_tiny_model(tokenizer), ids)
    model, method, base_keys = lora_model(tokenizer, rank=4, alpha=8)
    unmerged = logits(model, ids)
    with adapters_disabled(model):
        torch.testing.assert_close(logits(model, ids), base, atol=1e-6, rtol=0)
    method.merge(model)
    merged = logits(model, ids)
    assert not lora_modules(model)
    assert set(model.state_dict()) == base_keys
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert (merged - base).abs().max() > 1e-3, "merged must differ from the base model"


def test_rslora_scale_and_targets(tokenizer):
    model, _, _ = lora_model(tokenizer, rank=16, alpha=8, rslora=True, targets=["q_proj", "mlp.down_proj"])
    mods = lora_modules(model)
    assert sorted({n.split(".")[-1] for n in mods}) == ["down_proj", "q_proj"]
    assert all(math.isclose(m.scale, 8 / 4) for m in mods.values())


def test_unknown_target_is_an_error(tokenizer):
    with pytest.raises(MethodError, match="target `qproj` matches no Linear layer; this model has: .*q_proj"):
        lora_model(tokenizer, targets=["qproj"])


def test_full_method_freezes_embeddings_on_request(tokenizer):
    model = make_tiny_model(tokenizer)
    method = build_method(MethodConfig(name="full", full=FullConfig(train_embeddings=False)))
    method.apply(model)
    names = mark_trainable(model, method)
    assert "model.embed_tokens.weight" not in names
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not model.lm_head.weight.requires_grad  # tied to the embeddings


def test_lora_on_bf16_base_without_autocast(tokenizer):
    model, _, _ = lora_model(tokenizer)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            p.data = p.data.bfloat16()
    out = model(torch.randint(0, 1000, (1, 6))).logits
    assert torch.isfinite(out).all()
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
