"""Logit fusion and layer pruning.

Fusion: α = 0 is the large model alone and proxy tuning with L = S is the expert alone (token for
token, through tunesmith's own generate); the α search finds the minimum a brute-force grid finds;
the KL terms match hand computation; batched equals one-by-one and KV-cached decoding equals
recomputing the whole prefix each step; models with another vocabulary are refused.
Pruning: kept layers keep their weights, the config follows, the pruned model runs and differs.

The tiny models get lively weights (as in test_generate): at the default init a tiny model's
residual stream just repeats its input, and every comparison would pass trivially.
"""
import importlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import PROMPTS, lively_model, make_tiny_model

from tunesmith.infer.fuse import (FuseError, FusedLM, check_vocab, format_stats, fuse_logits, fusion_objective, kl,
                                  search_alpha)
from tunesmith.models.load import ModelError
from tunesmith.models.prune import kept_layers, prune_layers, prune_model

gen = importlib.import_module("tunesmith.infer.generate")


@pytest.fixture(scope="module")
def trio(tokenizer):
    """(large, small, expert, expert2): different seeds and depths, one tokenizer."""
    return lively_model(tokenizer, 0, layers=3), lively_model(tokenizer, 1), lively_model(tokenizer, 2), lively_model(tokenizer, 3)


def run(model, tokenizer, prompts=PROMPTS, **kw):
    kw.setdefault("max_new_tokens", 12)
    return gen.generate(model, tokenizer, prompts, **kw)


def uncached_greedy(model, tokenizer, prompt, n: int) -> str:
    """Argmax over full forward passes of the whole prefix: no KV cache, no padding."""
    ids, stops, new = gen._encode(tokenizer, prompt, None), set(gen.stop_ids(model, tokenizer)), []
    with torch.no_grad():
        while len(new) < n and (not new or new[-1] not in stops):
            new.append(int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
    return tokenizer.decode([t for t in new if t not in stops], skip_special_tokens=True)


# ---- the fusion rule against its definitions


def test_alpha_zero_is_the_large_model_alone(trio, tokenizer):
    large, small, expert, _ = trio
    fused = FusedLM(large, small, [expert], mode="proxy", alpha=0.0)
    alone = run(large, tokenizer)
    assert run(fused, tokenizer) == alone
    assert any(alone) and len(set(alone)) > 1
    # sampling draws from the same distribution with the same random numbers as transformers' sampler
    kw = dict(temperature=0.9, top_p=0.8, top_k=50, seed=3)
    assert run(fused, tokenizer, **kw) == run(large, tokenizer, **kw)
    # and α ≠ 0 changes the answers (so the comparisons above can fail)
    assert run(FusedLM(large, small, [expert], mode="proxy", alpha=1.0), tokenizer) != alone


def test_proxy_with_large_equal_small_is_the_expert(trio, tokenizer):
    _, small, expert, _ = trio
    fused = FusedLM(small, small, [expert], mode="proxy", alpha=1.0)
    assert run(fused, tokenizer) == run(expert, tokenizer)
    ids = torch.tensor([[1, 17, 230, 5, 99]])
    with torch.no_grad():
        ms, mt = small(ids).logits[:, -1], expert(ids).logits[:, -1]
    out, alpha, _ = fuse_logits(ms, ms, [mt], mode="proxy")
    torch.testing.assert_close(F.log_softmax(out, -1), F.log_softmax(mt, -1), rtol=0, atol=1e-5)
    assert alpha.tolist() == [1.0]


def test_kl_both_directions_on_hand_built_distributions():
    p, q = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.8, 0.1, 0.1])
    forward = 0.5 * math.log(0.5 / 0.8) + 2 * 0.25 * math.log(0.25 / 0.1)
    reverse = 0.8 * math.log(0.8 / 0.5) + 2 * 0.1 * math.log(0.1 / 0.25)
    assert kl(p.log(), q.log()).item() == pytest.approx(forward, rel=1e-6)
    assert kl(q.log(), p.log()).item() == pytest.approx(reverse, rel=1e-6)
    assert forward != pytest.approx(reverse, rel=1e-2)  # the two directions really differ here
    # the objective's closed form equals the KLs computed from the fused distribution directly
    large, small, expert = torch.tensor([[2.0, 0.0, -1.0, 0.5]]), torch.tensor([[0.0, 1.0, 0.0, 0.0]]), \
        torch.tensor([[1.0, 0.0, 0.5, -2.0]])
    for a in (0.0, 0.35, 1.0, 2.0):
        log_p, log_fused = F.log_softmax(large, -1), F.log_softmax(large + a * (expert - small), -1)
        log_q, log_qt = F.log_softmax(small, -1), F.log_softmax(expert, -1)
        want = (kl(log_fused, log_p) - kl(log_qt, log_q)) ** 2 + (kl(log_p, log_fused) - kl(log_q, log_qt)) ** 2
        got = fusion_objective(large, small, expert, torch.tensor([a]))[:, 0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_alpha_search_finds_the_brute_force_minimum():
    g = torch.Generator().manual_seed(0)
    rows, vocab = 64, 500
    large = torch.randn(rows, vocab, generator=g) * 3
    small = torch.randn(rows, vocab, generator=g) * 3
    # experts that moved little, some, or a lot from the small model
    expert = small + torch.randn(rows, vocab, generator=g) * torch.linspace(0.05, 4, rows)[:, None]
    alpha, best = search_alpha(large, small, expert, grid=11, refine=11)
    brute = torch.linspace(0, 2, 2001)
    values = torch.cat([fusion_objective(large, small, expert, brute[i:i + 500]) for i in range(0, 2001, 500)], 1)
    brute_best, brute_where = values.min(-1)
    assert ((alpha >= 0) & (alpha <= 2)).all()
    torch.testing.assert_close(best, fusion_objective(large, small, expert, alpha[:, None])[:, 0])
    # within the refined resolution (0.2 / 5 = 0.04) of the brute-force argmin, and as good as an
    # exhaustive search at that resolution (every multiple of 0.04 in [0, 2])
    assert (alpha - brute[brute_where]).abs().max() <= 0.04 + 1e-6
    exhaustive = fusion_objective(large, small, expert, torch.linspace(0, 2, 51)).min(-1).values
    torch.testing.assert_close(best, exhaustive, rtol=1e-4, atol=1e-9)  # the two grids round apart
    assert (best >= brute_best - 1e-6).all()
    assert best.std() > 0 and alpha.std() > 0.1  # rows really differ: not one α for all
    # a coarse grid alone is worse somewhere: the refinement matters
    _, coarse_best = search_alpha(large, small, expert, grid=11, refine=0)
    assert (coarse_best > best + 1e-6).any()


def test_forbidden_tokens_stay_forbidden_and_nothing_turns_nan():
    """A model may give a token -inf (e.g. a bad-words mask): fusion keeps its probability 0 and
    chooses α as if that token were absent, instead of producing NaN."""
    g = torch.Generator().manual_seed(1)
    large, small = torch.randn(3, 50, generator=g) * 3, torch.randn(3, 50, generator=g) * 3
    expert = small + torch.randn(3, 50, generator=g)
    banned = [large.clone(), small.clone(), expert.clone()]
    for m in banned:
        m[:, 7] = float("-inf")
    for mode in ("proxy", "dynamic"):
        fused, alpha, _ = fuse_logits(banned[0], banned[1], [banned[2]], mode=mode)
        assert torch.isfinite(alpha).all() and not fused.isnan().any()
        assert (fused.softmax(-1)[:, 7] == 0).all()
    # the same α as with token 7 removed from every model's vocabulary
    keep = [i for i in range(50) if i != 7]
    a_banned, _ = search_alpha(*banned)
    a_removed, _ = search_alpha(large[:, keep], small[:, keep], expert[:, keep])
    torch.testing.assert_close(a_banned, a_removed)


def test_multi_expert_picks_the_expert_that_moved(trio, tokenizer):
    large, small, expert, other = trio
    idle_copy = lively_model(tokenizer, 1)  # the small model itself: an expert that learned nothing
    fused = FusedLM(large, small, [idle_copy, expert], mode="dynamic")
    single = FusedLM(large, small, [expert], mode="dynamic")
    assert run(fused, tokenizer) == run(single, tokenizer)
    assert fused.stats.summary()["expert_share"] == [0.0, 1.0]
    both = FusedLM(large, small, [expert, other], mode="dynamic")
    run(both, tokenizer)
    share = both.stats.summary()["expert_share"]
    assert len(share) == 2 and 0 < share[0] < 1 and sum(share) == pytest.approx(1.0)
    assert "active expert share" in format_stats(both)


# ---- decoding: batching and the KV caches


def test_fused_batched_equals_one_by_one(trio, tokenizer):
    large, small, expert, other = trio
    fused = FusedLM(large, small, [expert, other], mode="dynamic")
    batched = run(fused, tokenizer, batch_size=5)
    assert batched == run(fused, tokenizer, batch_size=1)
    assert batched != run(large, tokenizer)  # fusion changed something


def test_kv_cached_fusion_equals_recomputing_the_prefix(trio, tokenizer):
    large, small, expert, other = trio
    fused = FusedLM(large, small, [expert, other], mode="dynamic")
    prompt, steps = PROMPTS[1], 10
    ids = gen._encode(tokenizer, prompt, None)
    stops = set(gen.stop_ids(large, tokenizer))
    new = []
    with torch.no_grad():
        for _ in range(steps):
            x = torch.tensor([ids + new])
            logits = [m(input_ids=x).logits[:, -1] for m in (large, small, expert, other)]
            out, _, _ = fuse_logits(logits[0], logits[1], logits[2:], mode="dynamic")
            new.append(int(out.argmax()))
            if new[-1] in stops:
                break
    want = tokenizer.decode([t for t in new if t not in stops], skip_special_tokens=True)
    fused.stats.alphas.clear()
    assert run(fused, tokenizer, [prompt], max_new_tokens=steps) == [want]
    assert fused.stats.summary()["tokens"] == len(new)
    assert fused.stats.summary()["alpha_max"] > 0  # the large model was steered


# ---- refusals


def test_other_vocabulary_is_refused(trio, tokenizer):
    from transformers import AutoTokenizer

    large, small, expert, _ = trio
    check_vocab([("large", large, tokenizer), ("small", small, tokenizer), ("expert", expert, tokenizer)])
    other_tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other_tok.add_tokens(["<extra-token>"])
    with pytest.raises(FuseError, match="expert: its tokenizer has 49153 tokens"):
        check_vocab([("large", large, tokenizer), ("expert", expert, other_tok)])
    wider = make_tiny_model(tokenizer)
    wider.resize_token_embeddings(len(tokenizer) + 64)
    with pytest.raises(FuseError, match="small: it outputs 49216 logits"):
        check_vocab([("large", large, tokenizer), ("small", wider, tokenizer)])
    with pytest.raises(FuseError, match="needs at least one expert"):
        FusedLM(large, small, [])
    with pytest.raises(FuseError, match="mode must be one of"):
        FusedLM(large, small, [expert], mode="average")


def test_cli_fused_generation_and_refusals(tokenizer, tmp_path, capsys):
    from tunesmith.cli import main

    folders = {}
    for name, seed in (("large", 0), ("small", 1), ("expert", 2)):
        lively_model(tokenizer, seed).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        folders[name] = str(tmp_path / name)
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "Why is the sky blue?"}) + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", folders["large"], "--fuse-small", folders["small"], "--fuse-expert",
            folders["expert"], "--input", str(inp), "--output", str(out), "--max-new-tokens", "6"]
    assert main(argv) == 0
    assert "fusion dynamic, 1 expert(s)" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = run(FusedLM(lively_model(tokenizer, 0), lively_model(tokenizer, 1), [lively_model(tokenizer, 2)]), tokenizer,
               ["hi", "Why is the sky blue?"], max_new_tokens=6)
    assert [r["completion"] for r in rows] == want

    other = tmp_path / "other"
    model = make_tiny_model(tokenizer)
    model.resize_token_embeddings(len(tokenizer) + 64)
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    assert main(argv[:6] + [str(other)] + argv[7:]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (earlier lines: loading progress bars)
    assert last.startswith("tunesmith: error: ") and last.endswith("logit fusion needs one shared vocabulary")
    assert main(argv[:3] + argv[5:]) == 2  # an expert with no small base
    assert "--fuse-expert needs --fuse-small" in capsys.readouterr().err


# ---- pruning


def test_prune_keeps_the_chosen_layers(tokenizer):
    assert kept_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert kept_layers(4, 4) == [0, 1, 2, 3] and kept_layers(5, 1) == [0]
    with pytest.raises(ModelError, match="--keep must be between 1"):
        kept_layers(4, 5)
    original = lively_model(tokenizer, 5, layers=4)
    model = lively_model(tokenizer, 5, layers=4)
    prune_layers(model, [0, 3])
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    before, after = original.state_dict(), model.state_dict()
    for new, old in ((0, 0), (1, 3)):
        for key, value in original.model.layers[old].state_dict().items():
            assert torch.equal(after[f"model.layers.{new}.{key}"], value)
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert not any(k.startswith("model.layers.2.") for k in after)
    ids = torch.tensor([[1, 17, 230, 5, 99]])
    with torch.no_grad():
        pruned, full = model(ids).logits, original(ids).logits
    assert pruned.shape == full.shape and not torch.allclose(pruned, full, atol=1e-3)
    # the KV cache follows the new layer indices: cached decoding equals full forwards
    assert run(model, tokenizer, [PROMPTS[1]]) == [uncached_greedy(model, tokenizer, PROMPTS[1], 12)]
    assert run(model, tokenizer, [PROMPTS[1]]) != run(original, tokenizer, [PROMPTS[1]])
    with pytest.raises(ModelError, match="increasing indices"):
        prune_layers(lively_model(tokenizer, 5, layers=4), [3, 0])


def test_prune_model_writes_a_loadable_folder(tokenizer, tmp_path):
    from tunesmith.models.load import load_model

    src = tmp_path / "src"
    lively_model(tokenizer, 6, layers=5).save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = prune_model(str(src), 3, tmp_path / "small")
    small, tok = load_model(str(out))
    full, _ = load_model(str(src))
    assert small.config.num_hidden_layers == 3 and len(tok) == len(tokenizer)
    for new, old in enumerate(kept_layers(5, 3)):
        for key, value in full.model.layers[old].state_dict().items():
            assert torch.equal(small.model.layers[new].state_dict()[key], value)
    texts = run(small, tok, PROMPTS[:2])
    assert any(texts)
    with pytest.raises(ModelError, match="Llama-family"):
        prune_layers(torch.nn.Linear(2, 2), [0])
