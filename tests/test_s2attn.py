"""S²-Attn (models/s2attn.py) against a hand-built N×N mask, its O(N·G) memory, training a tiny
Llama with it (full attention afterwards), and LongLoRA's trainable set and saved forms."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import make_tiny_model
from tunesmith.models import s2attn
from tunesmith.models.s2attn import S2, s2_attention, s2_rows, use_s2_attention


def reference_mask(segment_ids, heads: int, G: int) -> torch.Tensor:
    """(B, H, N, N): the first H//2 heads see their block [mG, (m+1)G), the others their block
    [G/2 + mG, G/2 + (m+1)G) (the first one [0, G/2)); always causal and within one sample."""
    B, N = segment_ids.shape
    i = torch.arange(N)
    plain = (i[:, None] // G) == (i[None, :] // G)
    block = torch.div(i - G // 2, G, rounding_mode="floor")
    shifted = block[:, None] == block[None, :]
    per_head = torch.stack([plain] * (heads // 2) + [shifted] * (heads - heads // 2))  # (H, N, N)
    causal = i[:, None] >= i[None, :]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return per_head[None] & causal & same[:, None]


def reference(q, k, v, segment_ids, G):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=reference_mask(segment_ids, q.shape[1], G)).transpose(1, 2)


def rows(*lengths, total=None):
    """A (1, N) row of samples with these lengths (then padding up to `total`)."""
    ids = torch.cat([torch.full((n,), s + 1) for s, n in enumerate(lengths)])
    return F.pad(ids, (0, (total or len(ids)) - len(ids)))[None]


CASES = {  # name: (segment ids (B, N), heads, kv heads, group)
    "one sample, N % G != 0": (rows(37), 4, 2, 8),
    "packed": (rows(7, 13, 4, 16), 4, 4, 10),
    "packed + padding, GQA": (torch.cat([rows(9, 20, 3, total=40), rows(40)]), 6, 2, 12),
    "right padding": (torch.cat([rows(30, total=33), rows(21, total=33)]), 4, 1, 6),
    "odd heads, default group": (rows(5, 25, 11), 3, 1, 0),
}


@pytest.mark.parametrize("case", CASES)
def test_s2_equals_hand_built_mask_forward_and_backward(case):
    seg, H, KV, group = CASES[case]
    B, N = seg.shape
    G = group or -(-N // 4)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, N, 8, generator=g, requires_grad=True) for h in (H, KV, KV))
    w = torch.randn(B, N, H, 8, generator=g) * (seg > 0)[:, :, None, None]  # padding's outputs unused
    s2_rows_ = s2_rows(seg, group)
    assert s2_rows_.group == G
    out, _ = s2_attention(torch.nn.Module(), q, k, v, None, tunesmith_segments=s2_rows_)
    (out * w).sum().backward()
    got = [out.detach(), q.grad, k.grad, v.grad]
    q.grad = k.grad = v.grad = None
    ref = reference(q, k, v, seg, G)
    (ref * w).sum().backward()
    real = (seg > 0)[:, :, None, None]
    torch.testing.assert_close(got[0] * real, ref.detach() * real, atol=1e-5, rtol=1e-5)
    for a, b in zip(got[1:], [q.grad, k.grad, v.grad]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    full = F.scaled_dot_product_attention(q, k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1),
                                          is_causal=True).transpose(1, 2)
    assert ((full - ref) * real).abs().max() > 1e-3  # the blocks matter: not full attention in disguise


class Largest(TorchDispatchMode):
    """The most elements any op produced."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def largest_tensor(N: int, G: int, packed: bool, monkeypatch) -> tuple[int, int]:
    """(the most elements any op of forward + backward produced, the most keys any sdpa call saw)."""
    seg = rows(*([N // 8] * 8)) if packed else rows(N)
    q, k, v = (torch.randn(1, 4, N, 8, requires_grad=True) for _ in range(3))
    keys, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, *a, **kw: keys.append(k.shape[-2]) or sdpa(q, k, *a, **kw))
    with Largest() as probe:
        out, _ = s2_attention(torch.nn.Module(), q, k, v, None, tunesmith_segments=s2_rows(seg, G))
        out.sum().backward()
    return probe.numel, max(keys)


@pytest.mark.parametrize("packed", [False, True])
def test_memory_grows_linearly_in_n_for_a_fixed_group(packed, monkeypatch):
    G = 32
    sizes = {N: largest_tensor(N, G, packed, monkeypatch) for N in (256, 512, 1024)}
    assert all(keys <= G for _, keys in sizes.values())  # every sdpa call sees one block of keys
    numel = {N: n for N, (n, _) in sizes.items()}
    assert numel[1024] <= 2.1 * numel[512] and numel[512] <= 2.1 * numel[256]  # N² would be 4×
    assert numel[1024] <= 4 * 1024 * G < 1024 * 1024  # heads × N × G at most: no (N, N) anything


def packed_batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    return {"input_ids": torch.randint(5, 1000, (1, n), generator=g),
            "position_ids": torch.cat([torch.arange(m) for m in lengths])[None],
            "segment_ids": rows(*lengths), "weights": torch.ones(1, n)}


def test_tiny_llama_trains_with_s2_and_evaluates_with_full_attention(tokenizer):
    from tunesmith.models.attention import use_attention, use_packed_attention
    from tunesmith.objectives.sft import causal_lm_loss, forward_hidden

    model = make_tiny_model(tokenizer)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    use_s2_attention(model, group=8)
    assert model.config._attn_implementation == S2
    batch = packed_batch([20, 28, 16])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss, n, _ = causal_lm_loss(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach() / n))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters())
    model.eval()
    with torch.no_grad():
        s2_eval = forward_hidden(model, batch)  # evaluating: full attention within each sample
        model.train()
        s2_train = forward_hidden(model, batch)
        model.eval()
        use_packed_attention(model)
        packed = forward_hidden(model, batch)
    torch.testing.assert_close(s2_eval, packed, atol=1e-5, rtol=1e-5)
    assert (s2_train - packed).abs().max() > 1e-3
    prompt = batch["input_ids"][:, :12]
    use_s2_attention(model, group=8)  # left in S²-Attn mode, generation runs full attention
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        s2_gen = model.generate(prompt, **kw)
        use_attention(model, "sdpa")
        sdpa_gen = model.generate(prompt, **kw)
    assert torch.equal(s2_gen, sdpa_gen)


def test_longlora_defaults_train_embeddings_and_norms_not_the_head(tokenizer):
    from tunesmith.methods import attach, build_method
    from tunesmith.methods.lora import LoRALinear
    from tunesmith.methods.options import method_from_dict
    from tunesmith.objectives.sft import causal_lm_loss

    model = make_tiny_model(tokenizer)  # ties lm_head to the embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    attach(model, build_method(method_from_dict("longlora", {})))
    attn = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        layers = [getattr(a, proj) for a in attn]
        assert all(isinstance(m, LoRALinear) and (m.rank, m.alpha, m.scale) == (8, 16.0, 2.0) for m in layers)
    assert not model.config.tie_word_embeddings and not model.lm_head.weight.requires_grad
    use_s2_attention(model, group=8)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = packed_batch([30, 34])
    for _ in range(3):
        loss, n, _ = causal_lm_loss(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    after = dict(model.named_parameters())
    moved = {n for n in start if not torch.equal(after[n], start[n])}
    norms = {n for n in start if "norm" in n}
    assert moved == norms | {"model.embed_tokens.weight"}  # base weights: embeddings and norms only
    assert torch.equal(after["lm_head.weight"], start["model.embed_tokens.weight"])  # the head kept its values
    assert all(not torch.equal(p, torch.zeros_like(p)) for n, p in after.items() if n.endswith("lora_b"))


def test_longlora_run_s2_interpolation_adapter_and_merged_export(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tests.conftest import write_chats
    from tunesmith.export.merged import export_merged
    from tunesmith.export.tuned import load_tuned
    from tunesmith.models.attention import use_attention
    from tunesmith.models.load import load_model
    from tunesmith.recipe import load_recipe
    from tunesmith.train.loop import train

    recipe = load_recipe(None, [
        f"model.name={tiny_model_dir}", f"data.train={write_chats(tmp_path / 'chats.jsonl')}",
        f"output_dir={tmp_path / 'runs'}", "name=t", "train.batch_tokens=256", "train.steps=4", "train.lr=1e-2",
        "train.precision=fp32", "train.warmup=1", "method.name=longlora", "method.longlora.target_length=5000",
        "model.s2_group=16"])
    model, tok = load_model(str(tiny_model_dir))
    base_embeddings = model.model.embed_tokens.weight.detach().clone()
    seen, blocked = [], s2attn._blocked
    monkeypatch.setattr(s2attn, "_blocked",
                        lambda q, k, v, mask, size, *a: seen.append(size) or blocked(q, k, v, mask, size, *a))
    result = train(recipe, model=model, tokenizer=tok)
    assert result.status == "completed" and seen and max(seen) == 16  # trained in blocks of model.s2_group
    rope = model.config.rope_parameters
    assert (rope["rope_type"], rope["factor"], model.config.max_position_embeddings) == ("linear", 3, 6144)
    use_attention(model, "sdpa")
    model.eval()
    fresh, _ = load_model(str(tiny_model_dir))
    load_tuned(fresh, result.run_dir / "adapter")
    merged_dir = export_merged(str(tiny_model_dir), result.run_dir / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not merged.config.tie_word_embeddings
    assert torch.equal(merged.lm_head.weight, base_embeddings)  # the head never trained
    assert not torch.equal(merged.model.embed_tokens.weight, base_embeddings)
    ids = torch.randint(5, 1000, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(fresh.eval()(ids).logits, want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(merged(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_longlora_options_pick_the_training_attention_and_positions(tiny_model):
    from tunesmith.config import RopeConfig
    from tunesmith.recipe import load_recipe
    from tunesmith.train.prepare import rope_config, training_attention

    def longlora(*overrides):
        return load_recipe(None, ["method.name=longlora", *overrides])

    assert training_attention(longlora()) == "s2"
    assert training_attention(longlora("method.longlora.shifted_attention=false")) == "packed"
    assert training_attention(longlora("method.longlora.shifted_attention=false", "model.attention=sdpa")) == "sdpa"
    assert training_attention(load_recipe(None, ["model.attention=s2"])) == "s2"
    assert training_attention(load_recipe(None, [])) == "packed"
    # ⌈5000 / 2048⌉ = 3; a target within the model's context stretches nothing; model.rope.* wins
    stretched = rope_config(longlora("method.longlora.target_length=5000"), tiny_model)
    assert stretched == RopeConfig(scaling="linear", factor=3)
    assert rope_config(longlora("method.longlora.target_length=2048"), tiny_model) == RopeConfig()
    own = longlora("method.longlora.target_length=5000", "model.rope.scaling=yarn", "model.rope.factor=2")
    assert rope_config(own, tiny_model) == own.model.rope
