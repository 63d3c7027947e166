"""The short-sample speed paths compute what the reference computes: the one-node LoRA function
(methods/lora_kernel.py) against LoRA written as plain autograd ops, and packed attention over many
short documents (gathered along the row, grouped-query heads shared by the kernel) against sdpa run
on each document alone — outputs and gradients within fp32 rounding."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import make_tiny_model
from tunesmith.methods.lora import LoRALinear
from tunesmith.methods.lora_kernel import applies, lora_linear
from tunesmith.models.attention import PREFIX, packed_attention, segments_from_ids


def _reference_lora(x, weight, bias, a, b, scale):
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, a), b)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train_weight", [False, True])
def test_fused_lora_equals_autograd_lora(bias, train_weight):
    torch.manual_seed(0)
    x = torch.randn(2, 37, 24, requires_grad=True)
    weight = torch.randn(40, 24, requires_grad=train_weight)
    bias_t = torch.randn(40, requires_grad=True) if bias else None
    a, b = torch.randn(4, 24, requires_grad=True), torch.randn(40, 4, requires_grad=True)
    grad = torch.randn(2, 37, 40)
    assert applies(x, weight, a, b)
    ins = [x, weight, bias_t, a, b]
    ref_in = [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in ins]
    out = lora_linear(*ins, 2.5)
    ref = _reference_lora(*ref_in, 2.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.backward(grad)
    ref.backward(grad)
    checked = 0
    for mine, theirs in zip(ins, ref_in):
        if theirs is not None and theirs.requires_grad:
            torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-4, rtol=1e-5)
            checked += 1
    assert checked == 4 + bias - (not train_weight)
    assert weight.grad is None if not train_weight else weight.grad.abs().sum() > 0


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_lora_linear_takes_the_fused_path_and_matches(init):
    torch.manual_seed(1)
    base = nn.Linear(32, 48)
    base.weight.requires_grad_(False)
    layer = LoRALinear(base, rank=8, alpha=16, init=init)
    with torch.no_grad():
        layer.lora_b.normal_()  # a non-zero update, so a wrong B path shows
    x = torch.randn(3, 11, 32, requires_grad=True)
    out = layer(x)
    assert out.grad_fn is not None and "LoRALinearFn" in type(out.grad_fn).__name__
    xr, a, b = _leaves(x, layer.lora_a, layer.lora_b)
    ref = _reference_lora(xr, layer.weight, layer.bias, a, b, layer.scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for mine, theirs in [(x, xr), (layer.lora_a, a), (layer.lora_b, b)]:
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-4, rtol=1e-5)


def test_fused_lora_under_bf16_autocast_returns_grads_in_the_parameters_dtype():
    torch.manual_seed(2)
    x = torch.randn(64, 32, requires_grad=True)
    weight = torch.randn(16, 32)
    a, b = torch.randn(4, 32, requires_grad=True), torch.randn(16, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert applies(x, weight, a, b)
        out = lora_linear(x, weight, None, a, b, 0.5)
        xr, ar, br = _leaves(x, a, b)
        ref = _reference_lora(xr, weight, None, ar, br, 0.5)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=0.1, rtol=0.02)
    out.float().sum().backward()
    ref.float().sum().backward()
    for mine, theirs in [(x, xr), (a, ar), (b, br)]:
        assert mine.grad.dtype == torch.float32
        torch.testing.assert_close(mine.grad, theirs.grad, atol=0.5, rtol=0.05)


def test_fused_lora_declines_what_it_cannot_compute():
    from tunesmith.models.quant import QuantizedWeight

    x, a, b = torch.randn(5, 64), torch.randn(2, 64), torch.randn(8, 2)
    assert not applies(x, QuantizedWeight(torch.randn(8, 64), "int8"), a, b)  # its own matmul
    assert not applies(x, torch.randn(8, 64, dtype=torch.bfloat16), a, b)  # mixed dtypes, no autocast
    layer = LoRALinear(nn.Linear(64, 8), rank=2, alpha=4, dropout=0.5)
    assert "LoRALinearFn" not in type(layer.train()(x).grad_fn).__name__  # dropout on the LoRA input
    assert "LoRALinearFn" in type(layer.eval()(x).grad_fn).__name__  # dropout off in eval


def _one_by_one(q, k, v, lengths, scale, prefix=None):
    """sdpa on each document alone (K/V heads repeated for grouped-query attention)."""
    groups = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[:, :, start:start + n] for t in (q, k, v))
        mask = None
        if prefix is not None:
            ks, vs = torch.cat([prefix[0], ks], 2), torch.cat([prefix[1], vs], 2)
            mask = torch.ones(n, ks.shape[2], dtype=torch.bool).tril(ks.shape[2] - n)
        ks, vs = ks.repeat_interleave(groups, 1), vs.repeat_interleave(groups, 1)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None,
                                                   scale=scale))
        start += n
    return torch.cat(outs, 2).transpose(1, 2)  # (1, T, H, D)


@pytest.mark.parametrize("with_prefix", [False, True])
def test_packed_attention_over_short_documents_equals_one_by_one(with_prefix):
    torch.manual_seed(3)
    lengths = [5, 48, 51, 3, 60, 47, 12, 50, 9, 1]  # several length buckets, some of one sample
    T, H, KV, D = sum(lengths), 6, 2, 8
    ids = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)])[None]
    q = torch.randn(1, T, H, D).transpose(1, 2).contiguous().requires_grad_()  # as after RoPE
    k = torch.randn(1, T, KV, D).transpose(1, 2).contiguous().requires_grad_()
    v = torch.randn(1, T, KV, D, requires_grad=True)  # a transposed view, as transformers passes it
    module = nn.Module()
    prefix = None
    if with_prefix:
        pk, pv = torch.randn(KV, 3, D, requires_grad=True), torch.randn(KV, 3, D, requires_grad=True)
        module.__dict__[PREFIX] = lambda m: (pk, pv)
        prefix = (pk[None], pv[None])
    scale = 1 / math.sqrt(D)
    seg = segments_from_ids(ids)
    assert len(seg.buckets) > 2
    out, _ = packed_attention(module, q, k, v.transpose(1, 2), None, scaling=scale, tunesmith_segments=seg)
    leaves = _leaves(q, k, v)
    ref = _one_by_one(leaves[0], leaves[1], leaves[2].transpose(1, 2), lengths, scale, prefix)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    mine = torch.autograd.grad(out, [q, k, v] + ([pk, pv] if with_prefix else []), grad)
    theirs = torch.autograd.grad(ref, leaves + ([pk, pv] if with_prefix else []), grad)
    for g1, g2 in zip(mine, theirs):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


def test_lora_model_on_a_packed_row_of_short_samples_equals_each_alone(tokenizer):
    from tunesmith.methods import LoRA
    from tunesmith.methods.lora import LoraConfig
    from tunesmith.models.attention import use_packed_attention

    model = make_tiny_model(tokenizer, layers=2)
    LoRA(LoraConfig(rank=4, alpha=8)).apply(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith((".lora_a", ".lora_b")))
        if name.endswith(".lora_b"):
            torch.nn.init.normal_(p, std=0.1)
    use_packed_attention(model)
    torch.manual_seed(4)
    lengths = [7, 30, 28, 2, 31]
    docs = [torch.randint(5, 1000, (n,)) for n in lengths]
    ids = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    seg = {"tunesmith_segments": segments_from_ids(ids), "attention_mask": None}
    packed = model.model(input_ids=torch.cat(docs)[None], position_ids=positions, **seg).last_hidden_state
    packed.square().sum().backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    alone = []
    for doc in docs:
        h = model.model(input_ids=doc[None], position_ids=torch.arange(len(doc))[None],
                        tunesmith_segments=segments_from_ids(torch.ones(1, len(doc), dtype=torch.long)),
                        attention_mask=None).last_hidden_state
        h.square().sum().backward()
        alone.append(h.detach())
    torch.testing.assert_close(packed.detach(), torch.cat(alone, 1), atol=1e-5, rtol=1e-5)
    assert g_packed
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(g_packed[n], p.grad, atol=1e-4, rtol=1e-4)
