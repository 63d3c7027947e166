"""The GPU path, checked where it can be on a CPU: variable-length attention (models/varlen.py)
against per-sample packed attention (models/attention.py) — boundaries, outputs and gradients,
with flex_attention for real and the CUDA kernels' plumbing through a reference kernel; the
fused linear + cross-entropy against the chunked loss; the choice of attention for CUDA runs;
regional compile under FSDP2 in two processes. Tests marked `cuda` run only where CUDA is."""
import math

import pytest
import torch

from tunesmith.models import varlen
from tunesmith.models.attention import PACKED, packed_attention, segments_from_ids, use_packed_attention
from tunesmith.models.varlen import (VARLEN, VarlenSegments, choose_backend, cu_seqlens_from_ids,
                                     document_block_mask, use_varlen_attention, varlen_attention)
from tunesmith.objectives.sft import (SFT, _FusedLinearCE, causal_lm_loss, fused_token_loss,
                                      resolve_loss_kernel, weighted_token_loss)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_segments(rng, B, T, max_doc=9, pad_rows=True):
    """(B, T) segment ids: documents of random lengths 1..max_doc, and padding (0) at the end of
    some rows."""
    rows = []
    for b in range(B):
        ids, sid = [], 1
        end = T - (int(torch.randint(0, T // 3, (1,), generator=rng)) if pad_rows and b % 2 else 0)
        while len(ids) < end:
            n = int(torch.randint(1, max_doc + 1, (1,), generator=rng))
            ids += [sid] * min(n, end - len(ids))
            sid += 1
        rows.append(ids + [0] * (T - len(ids)))
    return torch.tensor(rows)


def qkv(rng, B, T, H=4, KV=2, D=8, grad=False):
    return [torch.randn(B, h, T, D, generator=rng).requires_grad_(grad) for h in (H, KV, KV)]


def test_cu_seqlens_mark_every_document_and_padding_run():
    rng = torch.Generator().manual_seed(0)
    ids = random_segments(rng, 3, 40)
    cu, longest = cu_seqlens_from_ids(ids)
    assert cu.dtype == torch.int32 and int(cu[0]) == 0 and int(cu[-1]) == ids.numel()
    expected = [0]
    for b, row in enumerate(ids.tolist()):
        for t in range(1, len(row)):
            if row[t] != row[t - 1]:
                expected.append(b * 40 + t)
        expected.append((b + 1) * 40)
    assert cu.tolist() == expected
    lengths = [y - x for x, y in zip(expected, expected[1:])]
    assert longest == max(lengths)
    # rows of one document each (padding-free batches): a document still ends with its row
    assert cu_seqlens_from_ids(torch.ones(3, 10, dtype=torch.long))[0].tolist() == [0, 10, 20, 30]
    # no document crosses a row end, and each holds one id
    flat = ids.reshape(-1)
    for x, y in zip(expected, expected[1:]):
        assert x // 40 == (y - 1) // 40 and flat[x:y].unique().numel() == 1


def test_flex_document_mask_matches_packed_attention():
    rng = torch.Generator().manual_seed(1)
    ids = random_segments(rng, 2, 48)
    q, k, v = qkv(rng, 2, 48)
    seg = VarlenSegments("flex", block_mask=document_block_mask(ids))
    with torch.no_grad():  # flex has no backward on a CPU
        out, _ = varlen_attention(torch.nn.Module(), q, k, v, None, scaling=0.3, tunesmith_segments=seg)
        ref, _ = packed_attention(torch.nn.Module(), q, k, v, None, scaling=0.3,
                                  tunesmith_segments=segments_from_ids(ids))
    real = ids > 0
    assert out.shape == ref.shape == (2, 48, 4, 8)
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-4)


def reference_kernel(q, k, v, cu, max_len, scale):
    """What a CUDA varlen kernel computes, written out: causal sdpa within each cu_seqlens span."""
    out = []
    groups = q.shape[1] // k.shape[1]
    for x, y in zip(cu.tolist(), cu.tolist()[1:]):
        assert y - x <= max_len
        qi, ki, vi = (t[x:y].transpose(0, 1)[None] for t in (q, k, v))
        ki, vi = ki.repeat_interleave(groups, 1), vi.repeat_interleave(groups, 1)
        out.append(torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)[0]
                   .transpose(0, 1))
    return torch.cat(out)


@pytest.fixture
def cpu_kernel(monkeypatch):
    """The `torch` backend with the reference kernel in place of the CUDA one, chosen on a CPU."""
    monkeypatch.setattr(varlen, "_torch_varlen", reference_kernel)
    monkeypatch.setattr(varlen, "choose_backend", lambda device, dtype, wanted=None: "torch")


def test_varlen_plumbing_outputs_and_gradients_match_packed(cpu_kernel):
    rng = torch.Generator().manual_seed(2)
    ids = random_segments(rng, 3, 32)
    q, k, v = qkv(rng, 3, 32, grad=True)
    cu, longest = cu_seqlens_from_ids(ids)
    out, _ = varlen_attention(torch.nn.Module(), q, k, v, None, scaling=0.25,
                              tunesmith_segments=VarlenSegments("torch", cu, longest))
    ref, _ = packed_attention(torch.nn.Module(), q, k, v, None, scaling=0.25,
                              tunesmith_segments=segments_from_ids(ids))
    real = ids > 0
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-4)
    g = torch.randn(out[real].shape, generator=rng)
    ga = torch.autograd.grad((out[real] * g).sum(), (q, k, v))
    gb = torch.autograd.grad((ref[real] * g).sum(), (q, k, v))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def packed_batch(rng, vocab, B=2, T=40):
    ids = random_segments(rng, B, T)
    pos = torch.zeros_like(ids)
    for b in range(B):
        for t in range(1, T):
            pos[b, t] = pos[b, t - 1] + 1 if ids[b, t] == ids[b, t - 1] else 0
    weights = (ids > 0).float() * (torch.rand(ids.shape, generator=rng) > 0.3)
    return {"input_ids": torch.randint(5, vocab, ids.shape, generator=rng), "position_ids": pos,
            "segment_ids": ids, "weights": weights}


def loss_and_grads(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    loss, n, _ = causal_lm_loss(model, batch, **kw)
    loss.backward()
    return float(loss), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_model_trains_the_same_through_varlen_as_through_packed(tokenizer, cpu_kernel):
    from conftest import make_tiny_model

    model = make_tiny_model(tokenizer, layers=2).train()
    batch = packed_batch(torch.Generator().manual_seed(3), len(tokenizer))
    use_packed_attention(model)
    ref = loss_and_grads(model, batch)
    use_varlen_attention(model)
    assert model.config._attn_implementation == VARLEN
    got = loss_and_grads(model, batch)
    assert got[1] == ref[1] > 0
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    assert got[2].keys() == ref[2].keys()
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], atol=1e-5, rtol=1e-4, msg=name)


def test_without_segments_varlen_runs_as_sdpa(tokenizer):
    from conftest import make_tiny_model

    model = make_tiny_model(tokenizer)
    ids = torch.randint(5, 500, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
        use_varlen_attention(model)
        got = model(ids).logits
    torch.testing.assert_close(got, ref)


def test_backend_choice_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("TUNESMITH_VARLEN", raising=False)
    assert choose_backend(cpu, torch.bfloat16) == "packed"  # CUDA kernels skipped, eager flex only on request
    assert choose_backend(cpu, torch.float32, "flex") == "flex"
    monkeypatch.setenv("TUNESMITH_VARLEN", "flex")
    assert choose_backend(cpu, torch.float32) == "flex"
    monkeypatch.setenv("TUNESMITH_VARLEN", "nonsense")
    with pytest.raises(ValueError, match="TUNESMITH_VARLEN"):
        choose_backend(cpu, torch.float32)


def test_packed_fallback_builds_the_gather_plan(tokenizer, monkeypatch):
    from conftest import make_tiny_model

    monkeypatch.delenv("TUNESMITH_VARLEN", raising=False)
    model = make_tiny_model(tokenizer)
    use_varlen_attention(model)
    ids = random_segments(torch.Generator().manual_seed(4), 2, 30)
    seg = varlen.varlen_segments(model, ids)
    assert seg.backend == "packed" and seg.packed is not None and seg.cu_seqlens is None
    use_varlen_attention(model, "flex")
    seg = varlen.varlen_segments(model, ids)
    assert seg.backend == "flex" and seg.block_mask is not None and seg.packed is None


def test_cuda_runs_choose_varlen_unless_prefix(monkeypatch):
    from tunesmith.recipe import load_recipe
    from tunesmith.train import prepare

    def attention(*overrides):
        return prepare.training_attention(load_recipe(None, ["model.name=x", "data.train=x.jsonl", *overrides]))

    assert attention() == "packed"  # this machine: no CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert attention() == "varlen"
    assert attention("train.device=cpu") == "packed"
    assert attention("model.attention=sdpa") == "sdpa"
    assert attention("method.name=prefix") == "packed"
    monkeypatch.setattr(varlen, "backend_available", lambda name: name == "packed")
    assert attention() == "packed"


# ---- fused linear + cross-entropy


def head_case(rng, n=70, d=16, vocab=50, trained_head=True):
    head = torch.nn.Linear(d, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, d, generator=rng) * 0.5)
    head.weight.requires_grad_(trained_head)
    hidden = torch.randn(2, n // 2 + 1, d, generator=rng, requires_grad=True)
    ids = torch.randint(0, vocab, (2, n // 2 + 1), generator=rng)
    weights = torch.rand(ids.shape, generator=rng) * (torch.rand(ids.shape, generator=rng) > 0.2)
    return head, hidden, ids, weights


@pytest.mark.parametrize("trained_head", [True, False])
def test_fused_loss_and_gradients_equal_the_chunked_loss(trained_head):
    rng = torch.Generator().manual_seed(5)
    head, hidden, ids, weights = head_case(rng, trained_head=trained_head)
    params = [hidden] + ([head.weight] if trained_head else [])
    ref, n = weighted_token_loss(head, hidden, ids, weights, chunk=16, kernel="chunked")
    ref_grads = torch.autograd.grad(ref * 3.0, params)
    got, m = weighted_token_loss(head, hidden, ids, weights, chunk=16, kernel="fused")
    got_grads = torch.autograd.grad(got * 3.0, params)
    assert m == n > 0
    assert float(got) == pytest.approx(float(ref), rel=1e-5)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_fused_loss_under_bf16_autocast_is_close():
    rng = torch.Generator().manual_seed(6)
    head, hidden, ids, weights = head_case(rng)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = weighted_token_loss(head, hidden, ids, weights, chunk=32, kernel="chunked")
        got, _ = weighted_token_loss(head, hidden, ids, weights, chunk=32, kernel="fused")
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(ref), rel=2e-2)
    ga = torch.autograd.grad(got, (hidden, head.weight))
    gb = torch.autograd.grad(ref, (hidden, head.weight))
    for a, b in zip(ga, gb):
        assert a.dtype == b.dtype
        assert (a - b).abs().max() <= 0.05 * b.abs().max()


def test_loss_kernel_falls_back_where_it_must():
    cpu = torch.device("cpu")
    plain = torch.nn.Linear(4, 6, bias=False)
    assert resolve_loss_kernel("auto", plain, cpu) == "chunked"  # what the estimate is fitted to on a CPU
    assert resolve_loss_kernel("auto", plain, torch.device("cuda")) in ("fused", "liger")
    assert resolve_loss_kernel("liger", plain, cpu) == "fused"  # Liger is CUDA only
    assert resolve_loss_kernel("fused", torch.nn.Linear(4, 6), cpu) == "chunked"  # a bias
    hooked = torch.nn.Linear(4, 6, bias=False)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    assert resolve_loss_kernel("fused", hooked, cpu) == "chunked"

    class Adapted(torch.nn.Linear):
        pass

    assert resolve_loss_kernel("fused", Adapted(4, 6, bias=False), cpu) == "chunked"
    from tunesmith.objectives.base import ObjectiveError

    with pytest.raises(ObjectiveError, match="loss kernel"):
        resolve_loss_kernel("fast", plain, cpu)


def test_fused_loss_without_grad_is_the_plain_sum():
    rng = torch.Generator().manual_seed(7)
    head, hidden, ids, weights = head_case(rng)
    with torch.no_grad():
        a, _ = weighted_token_loss(head, hidden, ids, weights, kernel="fused")
        b, _ = weighted_token_loss(head, hidden, ids, weights, kernel="chunked")
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_fused_function_direct_matches_nll():
    rng = torch.Generator().manual_seed(8)
    h = torch.randn(9, 5, generator=rng, requires_grad=True)
    w = torch.randn(7, 5, generator=rng, requires_grad=True)
    t = torch.randint(0, 7, (9,), generator=rng)
    ww = torch.ones(9)
    loss = _FusedLinearCE.apply(h, w, t, ww, 4, torch.float32)
    nll = torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum")
    assert float(loss) == pytest.approx(float(nll), rel=1e-5)
    assert float(fused_token_loss(torch.nn.Linear(5, 7, bias=False), h, t, ww).detach()) > 0
    assert not math.isnan(float(loss))


def test_sft_reads_the_loss_kernel():
    from tunesmith.recipe import load_recipe

    base = ["model.name=x", "data.train=x.jsonl"]
    assert SFT.build(load_recipe(None, base)).kernel == "auto"
    assert SFT.build(load_recipe(None, [*base, "train.loss_kernel=chunked"])).kernel == "chunked"


def test_model_loss_through_the_fused_kernel(tokenizer):
    from conftest import make_tiny_model

    model = make_tiny_model(tokenizer).train()
    use_packed_attention(model)
    assert model.config._attn_implementation == PACKED
    batch = packed_batch(torch.Generator().manual_seed(9), len(tokenizer))
    ref = loss_and_grads(model, batch, kernel="chunked")
    got = loss_and_grads(model, batch, kernel="fused")
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    for name in ref[2]:  # the tied embedding gets the head's gradient too
        torch.testing.assert_close(got[2][name], ref[2][name], atol=1e-5, rtol=1e-4, msg=name)


# ---- on a GPU


@cuda
@pytest.mark.parametrize("backend", ["torch", "flash_attn", "flex"])
def test_cuda_kernel_matches_packed_in_bf16(tokenizer, backend):
    from conftest import make_tiny_model

    if not varlen.backend_available(backend):
        pytest.skip(f"{backend} is not installed")
    model = make_tiny_model(tokenizer, layers=2).cuda().train()
    batch = {k: v.cuda() for k, v in packed_batch(torch.Generator().manual_seed(10), len(tokenizer), T=256).items()}
    use_packed_attention(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = loss_and_grads(model, batch)
    use_varlen_attention(model, backend)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert varlen.varlen_segments(model, batch["segment_ids"]).backend == backend
        got = loss_and_grads(model, batch)
    assert got[0] == pytest.approx(ref[0], rel=2e-2)
    for name in ref[2]:
        scale = ref[2][name].abs().max()
        assert (got[2][name] - ref[2][name]).abs().max() <= 0.05 * scale + 1e-6, name


@cuda
def test_cuda_fused_loss_kernels_match_chunked():
    rng = torch.Generator().manual_seed(11)
    head, hidden, ids, weights = head_case(rng, n=300, d=64, vocab=1000)
    head, hidden, ids = head.cuda(), hidden.detach().cuda().requires_grad_(), ids.cuda()
    ones = (weights > 0).float().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref, _ = weighted_token_loss(head, hidden, ids, ones, kernel="chunked")
        gref = torch.autograd.grad(ref, (hidden, head.weight))
        for kernel in ("fused", "liger"):
            got, _ = weighted_token_loss(head, hidden, ids, ones, kernel=kernel)
            assert float(got) == pytest.approx(float(ref), rel=2e-2), kernel
            for a, b in zip(torch.autograd.grad(got, (hidden, head.weight)), gref):
                assert (a.float() - b.float()).abs().max() <= 0.05 * b.abs().max(), kernel


# ---- regional compile under FSDP2 (two processes, gloo)


@pytest.mark.slow
def test_fsdp_with_regional_compile_matches_one_eager_process(tmp_path, tiny_model_dir, monkeypatch):
    """train.compile=true with train.strategy=fsdp: each decoder layer compiled, then sharded (the
    order torchtitan uses: FSDP2's hooks run eagerly around the compiled layers) — the loss curve
    of one uncompiled process with the same global batch. Dynamo traces the layers under FSDP2
    (aot_eager: the graphs without inductor's C++ kernels, minutes of compiling on a CPU)."""
    monkeypatch.setenv("TUNESMITH_COMPILE_BACKEND", "aot_eager")
    from pathlib import Path

    from test_distributed import losses, overrides, torchrun
    from tunesmith.recipe import load_recipe
    from tunesmith.train.loop import train

    recipe = Path(__file__).parent.parent / "recipes" / "lora-sft.yaml"
    extra = ["method.name=full", "train.lr=1e-3"]
    one = train(load_recipe(recipe, overrides(tmp_path, tiny_model_dir, "one", "train.grad_accum=2", *extra)))
    torchrun(overrides(tmp_path, tiny_model_dir, "fc", "train.grad_accum=1", "train.strategy=fsdp",
                       "train.compile=true", *extra), timeout=900)
    a, b = losses(one.run_dir), losses(tmp_path / "runs" / "fc")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-3, (a, b)
