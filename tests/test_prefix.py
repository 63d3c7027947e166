"""Prefix tuning: the attention it computes (by hand, on one layer), every attention path the toolkit
uses (packed, padded sdpa/eager, KV-cached generation), the MLP fold, what trains, and parity with
PEFT's PREFIX_TUNING loaded from our saved adapter."""
import copy
import math

import pytest
import torch

from tests.conftest import make_tiny_model
from tests.conftest import perturb
from tunesmith.data import collate
from tunesmith.methods import MethodError, attach, build_method, cast_frozen, delta_state
from tunesmith.models.attention import use_attention, use_packed_attention
from tunesmith.objectives.sft import causal_lm_loss, forward_hidden
from tunesmith.recipe import method_from_dict

L = 4  # prefix length


def prefixed(tokenizer, reparam=False, seed=0, attention="sdpa"):
    """A tiny model with non-trivial prefixes (perturbed away from their real-token start)."""
    model = make_tiny_model(tokenizer, seed=seed)
    use_packed_attention(model) if attention == "packed" else use_attention(model, attention)
    method = build_method(method_from_dict("prefix", {"length": L, "hidden": 16, "reparam": reparam}))
    torch.manual_seed(1)
    attach(model, method)
    perturb(model, std=0.3)
    return model.eval(), method


def ids(n=2, t=10, seed=3):
    return torch.randint(5, 1000, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def samples():
    g = torch.Generator().manual_seed(0)
    lengths = [(9, 3), (14, 5), (6, 1), (11, 4)]
    return [{"input_ids": torch.randint(5, 1000, (n,), generator=g).tolist(),
             "weights": [0.0] * k + [1.0] * (n - k)} for n, k in lengths]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_attention_equals_softmax_over_prefix_and_causal_context(tokenizer, attention):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, _ = prefixed(tokenizer, attention=attention)
    attn = model.model.layers[1].self_attn
    seen = {}
    hook = attn.register_forward_hook(lambda m, args, kwargs, out: seen.update(kwargs, x=args[0] if args else
                                      kwargs["hidden_states"], out=out[0]), with_kwargs=True)
    with torch.no_grad():
        model(ids())
    hook.remove()
    x, (cos, sin) = seen["x"], seen["position_embeddings"]
    B, T, _ = x.shape
    hd, groups = attn.head_dim, attn.num_key_value_groups
    with torch.no_grad():
        q = attn.q_proj(x).view(B, T, -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, -1, hd).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # real tokens: positions 0..T-1; the prefix gets none
        heads = []
        for h in range(q.shape[1]):
            kv = h // groups
            keys = torch.cat([attn.prefix_key[kv].expand(B, -1, -1), k[:, kv]], dim=1)  # (B, l + T, hd)
            values = torch.cat([attn.prefix_value[kv].expand(B, -1, -1), v[:, kv]], dim=1)
            scores = q[:, h] @ keys.transpose(1, 2) / math.sqrt(hd)  # (B, T, l + T)
            allowed = torch.cat([torch.ones(T, L, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], 1)
            heads.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ values)
        expected = attn.o_proj(torch.stack(heads, 2).reshape(B, T, -1))
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-4)
    # the prefix carries real weight: without it the same layer gives something else
    no_prefix = attn.__dict__.pop("tunesmith_prefix")
    try:
        with torch.no_grad():
            plain = attn(x, position_embeddings=(cos, sin), attention_mask=seen["attention_mask"])[0]
    finally:
        attn.__dict__["tunesmith_prefix"] = no_prefix
    assert (plain - expected).abs().max() > 1e-3


@pytest.mark.parametrize("attention", ["packed", "sdpa", "eager"])
def test_packed_equals_one_by_one(tokenizer, samples, attention):
    """Each packed sample sees the prefix and never another sample."""
    model, _ = prefixed(tokenizer, attention=attention)
    base = make_tiny_model(tokenizer)
    use_packed_attention(base) if attention == "packed" else use_attention(base, attention)
    packed = collate(samples, packing=True, pad_id=tokenizer.pad_token_id)
    assert packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        logits = model.lm_head(forward_hidden(model, packed))[0]
        start = 0
        for s in samples:
            one = collate([s], packing=True, pad_id=tokenizer.pad_token_id)
            alone = model.lm_head(forward_hidden(model, one))[0]
            torch.testing.assert_close(logits[start:start + len(s["input_ids"])], alone, atol=1e-5, rtol=1e-5)
            start += len(s["input_ids"])
        without = base.lm_head(forward_hidden(base, packed))[0]
    assert (logits - without).abs().max() > 1e-2, "the prefix must change the output"


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padded_equals_packed(tokenizer, samples, attention):
    model, _ = prefixed(tokenizer, attention="packed")
    with torch.no_grad():
        packed = causal_lm_loss(model, collate(samples, packing=True, pad_id=tokenizer.pad_token_id))
        use_attention(model, attention)  # the prefix survives the switch
        padded_batch = collate(samples, packing=False, pad_id=tokenizer.pad_token_id)
        assert padded_batch["input_ids"].shape[0] == len(samples)
        padded = causal_lm_loss(model, padded_batch)
        # right-padded rows through the model's own forward (transformers' padding mask)
        full = model(padded_batch["input_ids"], attention_mask=(padded_batch["segment_ids"] > 0).long()).logits
        one = model(torch.tensor([samples[1]["input_ids"]])).logits[0]
    assert packed[1] == padded[1]
    assert math.isclose(float(packed[0]), float(padded[0]), rel_tol=1e-5)
    torch.testing.assert_close(full[1, :len(samples[1]["input_ids"])], one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_cached_generation_equals_full_forward_greedy(tokenizer, attention):
    """Left-padded, KV-cached generate == greedy argmax of full (uncached, unpadded) forwards."""
    from tunesmith.infer.generate import left_pad

    model, _ = prefixed(tokenizer, attention=attention)
    model.generation_config.eos_token_id = None  # run every step
    prompts = [ids(1, 7, seed=5)[0].tolist(), ids(1, 4, seed=6)[0].tolist()]
    input_ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    steps = 5
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                             temperature=None, top_p=None, top_k=None)
        for row, prompt in zip(out[:, input_ids.shape[1]:].tolist(), prompts):
            seq = list(prompt)
            for _ in range(steps):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            assert row == seq[len(prompt):]


@pytest.mark.parametrize("attention", ["sdpa", "eager", "packed"])  # packed: no segments, so no mask at all
def test_chunked_prefill_with_cache_equals_full_forward(tokenizer, attention):
    """Several new queries on top of a cache: the causal rule aligns to the last key, not the first."""
    model, _ = prefixed(tokenizer, attention=attention)
    x = ids(2, 10)
    with torch.no_grad():
        full = model(x).logits
        first = model(x[:, :6], use_cache=True)
        second = model(x[:, 6:], cache=first.cache, use_cache=True).logits
    torch.testing.assert_close(second, full[:, 6:], atol=1e-5, rtol=1e-4)


def test_reparam_fold_gives_identical_logits(tokenizer):
    from tunesmith.export.tuned import load_delta

    model, method = prefixed(tokenizer, reparam=True)
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
    tensors, options = method.export_delta(model)
    assert options.reparam is False and options.length == L
    assert not any("prefix_encoder" in n for n in tensors), "a saved adapter holds no MLP"
    fresh = make_tiny_model(tokenizer)
    plain = build_method(method_from_dict("prefix", options.model_dump()))
    attach(fresh, plain)
    assert set(delta_state(fresh, plain)) == set(tensors)
    before = fresh(x).logits.detach()
    load_delta(fresh, tensors, where="fold", method=plain)
    with torch.no_grad():
        got = fresh.eval()(x).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert (before - expected).abs().max() > 1e-3


def test_both_forms_start_at_real_token_states(tokenizer):
    """Same seed: the MLP's initial output is exactly the plain prefixes (the states of l real tokens)."""
    models = []
    for reparam in (False, True):
        model = make_tiny_model(tokenizer)
        method = build_method(method_from_dict("prefix", {"length": L, "hidden": 16, "reparam": reparam}))
        torch.manual_seed(7)
        attach(model, method)
        models.append((model, method))
    (plain, pm), (mlp, mm) = models
    a, b = pm.prefixes(plain), mm.prefixes(mlp)
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=1e-5, rtol=1e-4)
    # ...the keys/values the base model itself gives some real tokens: attending to them is not a no-op
    k = a["model.layers.0.self_attn.prefix_key"]
    assert k.abs().max() > 1e-2 and not torch.allclose(k[:, 0], k[:, 1])


@pytest.mark.parametrize("reparam", [False, True])
def test_gradients_reach_only_the_prefix(tokenizer, reparam):
    model, method = prefixed(tokenizer, reparam=reparam)
    model.train()
    model(ids(), labels=ids()).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got == trainable, sorted(got ^ trainable)
    if reparam:
        assert all(n.startswith("prefix_encoder.") for n in trainable) and len(trainable) == 5
    else:  # every layer's key and value prefixes
        assert trainable == {f"model.layers.{i}.self_attn.prefix_{kv}" for i in range(2) for kv in ("key", "value")}


@pytest.mark.parametrize("reparam", [False, True])
def test_bf16_frozen_weights_and_autocast(tokenizer, samples, reparam):
    model, _ = prefixed(tokenizer, reparam=reparam, attention="packed")
    cast_frozen(model, torch.bfloat16)
    batch = collate(samples, packing=True, pad_id=tokenizer.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, n, _ = causal_lm_loss(model.train(), batch)
    (loss / n).backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name


def test_deepcopy_keeps_its_own_prefixes(tokenizer):
    """A frozen reference copy (preference training) must not read the original's MLP."""
    model, _ = prefixed(tokenizer, reparam=True)
    twin = copy.deepcopy(model)
    x = ids()
    with torch.no_grad():
        before = twin(x).logits
        model.prefix_encoder.transform[2].bias.add_(1.0)
        torch.testing.assert_close(twin(x).logits, before)
        assert (model(x).logits - before).abs().max() > 1e-3


def test_peft_loads_our_adapter_with_the_same_logits(tokenizer, tmp_path):
    """PEFT keeps the prefix in the cache, so it places real tokens at positions l..l+T-1 (and shifts
    any position_ids it is given by l); ours start at 0. Like with like, the logits are identical;
    with each library's own default positions they differ (prefix keys carry no rotary embedding, so
    a query's score on them depends on its absolute position)."""
    from peft import PeftModel

    from tunesmith.export.tuned import save_tuned

    model, method = prefixed(tokenizer, reparam=True)
    save_tuned(model, method, "tiny", tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(make_tiny_model(tokenizer), tmp_path / "adapter").eval()
    x = ids()
    pos = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
    with torch.no_grad():
        ours = model(x).logits
        theirs = peft_model(input_ids=x).logits
        torch.testing.assert_close(peft_model(input_ids=x, position_ids=pos - L).logits, ours, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model(x, position_ids=pos + L).logits, theirs, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(peft_model(input_ids=x, attention_mask=torch.ones_like(x), position_ids=pos - L)
                                   .logits, ours, atol=1e-5, rtol=1e-4)
    assert (theirs - ours).abs().max() > 1e-4  # the position convention is a real difference
    with torch.no_grad():
        base = make_tiny_model(tokenizer)(x).logits
    assert (ours - base).abs().max() > 1e-3  # the prefix is live: the parity is not between two no-ops


def test_clear_errors(tokenizer):
    model, method = prefixed(tokenizer)
    with pytest.raises(MethodError, match="once"):
        method.apply(model)
    other = make_tiny_model(tokenizer)
    other.config._attn_implementation = "flex_attention"
    with pytest.raises(MethodError, match="packed, sdpa or eager"):
        build_method(method_from_dict("prefix", {"length": L})).apply(other)
