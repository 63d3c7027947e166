"""`freeze` (chosen base parameters train) and `hft` (Half Fine-Tuning, Hui et al., 2024): what
trains, the errors users can hit, HFT's draw (structure, exact half, seeding, per-epoch redraw)."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.conftest import make_tiny_model
from tunesmith.methods import MethodError, attach, build_method
from tunesmith.methods.freeze import Freeze
from tunesmith.methods.hft import ATTENTION, FFN, HFT
from tunesmith.recipe import FreezeConfig, HftConfig, load_recipe, method_from_dict
from tunesmith.train.optim import build_optimizer

IDS = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(3))


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def freeze(tokenizer, n_layers=4, **opts):
    model = make_tiny_model(tokenizer, layers=n_layers)
    attach(model, Freeze(FreezeConfig(**opts)))
    return model


def hft(tokenizer, n_layers=4, model=None, **opts):
    model = model if model is not None else make_tiny_model(tokenizer, layers=n_layers)
    method = HFT(HftConfig(**opts))
    attach(model, method)
    return model, method


def mha_model(tokenizer, layers=4):
    """A tiny Llama without grouped-query attention: q, k, v, o all 64×64; gate, up, down all 8192."""
    from transformers import LlamaForCausalLM

    config = make_tiny_model(tokenizer, layers=layers).config
    config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def projection(name: str) -> str | None:
    last = name.split(".")[-2]
    return last if last in ATTENTION + FFN else None


def per_layer(names: set[str]) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for n in names:
        m = re.search(r"\.layers\.(\d+)\.", n)
        if m and projection(n):
            out.setdefault(int(m.group(1)), set()).add(projection(n))
    return out


# ------------------------------------------------------------------------------------------ freeze


def test_freeze_top_k_trains_exactly_the_top_layers(tokenizer):
    model = freeze(tokenizer, layers=2)
    names = {n for n, _ in model.named_parameters()}
    expected = {n for n in names if n.startswith(("model.layers.2.", "model.layers.3."))}
    assert trainable(model) == expected and len(expected) == 2 * 9
    model.train()
    model(IDS, labels=IDS).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == expected


def test_freeze_layers_zero_trains_only_the_switches(tokenizer):
    # the form longlora uses (methods/compose.py): embeddings and every norm, nothing else
    model = freeze(tokenizer, layers=0, embeddings=True, norms=True)
    norms = {n for n, _ in model.named_parameters() if "norm" in n}
    assert len(norms) == 2 * 4 + 1  # input + post-attention norm per layer, the final norm
    assert trainable(model) == norms | {"model.embed_tokens.weight"}
    assert model.lm_head.weight.requires_grad  # tied: the same tensor as the embeddings


def test_freeze_inside_longlora_adds_embeddings_and_norms_to_lora(tokenizer):
    model = make_tiny_model(tokenizer)
    attach(model, build_method(method_from_dict("longlora", {"rank": 4})))
    extra = {n for n in trainable(model) if ".lora_" not in n}
    assert extra == {n for n, _ in model.named_parameters() if "norm" in n} | {"model.embed_tokens.weight"}


@pytest.mark.parametrize("patterns,expected", [
    (["mlp"], r"\.mlp\."),
    (["self_attn.q_proj"], r"\.self_attn\.q_proj\."),
    ([r"layers\.1\.self_attn"], r"layers\.1\.self_attn\."),
    (["layers.1"], r"\.layers\.1\."),  # a whole component: not layers.10
    (["mlp.down_proj", "embed_tokens"], r"(mlp\.down_proj|embed_tokens)\."),
])
def test_freeze_module_patterns(tokenizer, patterns, expected):
    model = freeze(tokenizer, n_layers=11, modules=patterns)
    names = {n for n, _ in model.named_parameters()}
    want = {n for n in names if re.search(expected, n)}
    assert want and trainable(model) == want


def test_freeze_patterns_ignore_layers_and_add_switches(tokenizer):
    model = freeze(tokenizer, modules=["o_proj"], layers=3, norms=True)
    assert trainable(model) == {n for n, _ in model.named_parameters() if "o_proj" in n or "norm" in n}


def test_freeze_untied_lm_head(tokenizer):
    model = make_tiny_model(tokenizer)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    model.config.tie_word_embeddings = False
    method = Freeze(FreezeConfig(layers=0, lm_head=True))
    attach(model, method)
    assert trainable(model) == {"lm_head.weight"}
    assert "lm_head" in method.describe(model) and "tied" not in method.describe(model)


def test_freeze_tied_lm_head_says_it_trains_with_embeddings(tokenizer):
    with pytest.raises(MethodError, match=r"ties its lm_head to the input embeddings.*freeze\.embeddings=true"):
        freeze(tokenizer, layers=0, lm_head=True)
    model = make_tiny_model(tokenizer)
    method = Freeze(FreezeConfig(layers=0, lm_head=True, embeddings=True))
    attach(model, method)
    assert trainable(model) == {"model.embed_tokens.weight"}
    assert "lm_head (tied: it is the embeddings)" in method.describe(model)


def test_freeze_bad_patterns_and_empty_selection(tokenizer):
    with pytest.raises(MethodError, match=r"`mpl` matches no parameter.*model\.layers\.0\.mlp\.gate_proj\.weight") as e:
        freeze(tokenizer, modules=["mlp", "mpl"])
    assert "layers.1." not in str(e.value)  # examples come from one layer, not all of them
    with pytest.raises(MethodError, match=r"`mlp\(` is not a valid regular expression"):
        freeze(tokenizer, modules=["mlp("])
    with pytest.raises(MethodError, match="freeze trains nothing"):
        freeze(tokenizer, layers=0)
    with pytest.raises(MethodError, match=r"freeze\.layers=5, but this model has 4 decoder layers"):
        freeze(tokenizer, layers=5)


def test_freeze_describe_counts(tokenizer):
    model = make_tiny_model(tokenizer)
    method = Freeze(FreezeConfig(layers=1))
    attach(model, method)
    n = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert method.describe(model) == f"trains the top 1 of 2 layers (1..1): {n:,} of {total:,} parameters " \
                                     f"({100 * n / total:.2f}%)"


# --------------------------------------------------------------------------------------------- hft


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_hft_draw_structure(tokenizer, seed):
    model, _ = hft(tokenizer, seed=seed)
    names = trainable(model)
    assert all(projection(n) for n in names), "embeddings, norms and lm_head stay frozen by default"
    layers = per_layer(names)
    assert sorted(layers) == [0, 1, 2, 3]
    assert all(len(p & set(ATTENTION)) == 2 for p in layers.values()), "2 of 4 attention projections per layer"
    ffn = sorted(len(p & set(FFN)) for p in layers.values())
    assert ffn == [1, 1, 2, 2], "1 of 3 FFN projections in half the layers, 2 of 3 in the other half"


def test_hft_odd_layer_count(tokenizer):
    for seed in range(6):
        model, _ = hft(tokenizer, n_layers=3, seed=seed)
        ffn = sorted(len(p & set(FFN)) for p in per_layer(trainable(model)).values())
        assert ffn in ([1, 1, 2], [1, 2, 2])


@pytest.mark.parametrize("seed", [0, 7])
def test_hft_trains_exactly_half_when_sizes_match(tokenizer, seed):
    """Without GQA every attention projection is 64×64 and every FFN one 8,192 weights, so the
    trained numel is exactly half of the attention numel, of the FFN numel, and of their sum."""
    model, method = hft(tokenizer, model=mha_model(tokenizer), seed=seed)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    live = trainable(model)
    for group in (ATTENTION, FFN, ATTENTION + FFN):
        names = [n for n in sizes if projection(n) in group]
        assert 2 * sum(sizes[n] for n in names if n in live) == sum(sizes[n] for n in names)
    total = sum(sizes.values())
    half = sum(sizes[n] for n in live)
    line = method.describe(model)
    assert line.startswith(f"trains {half:,}/{2 * half:,} = 50.00% of attention+FFN weights")
    assert f"{half:,}/{total:,} = {100 * half / total:.2f}% of all parameters" in line


def test_hft_describe_gives_the_exact_fraction_under_gqa(tokenizer):
    model, method = hft(tokenizer, seed=3, norms=True)  # k, v are half the size of q, o here
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    live = trainable(model)
    attn = [n for n in sizes if projection(n) in ATTENTION]
    a, b = sum(sizes[n] for n in attn if n in live), sum(sizes[n] for n in attn)
    assert f"q,k,v,o: 2 of 4 per layer, {a:,}/{b:,} = {100 * a / b:.2f}%" in method.describe(model)
    everything = sum(sizes[n] for n in live)  # norms included
    assert f"{everything:,}/{sum(sizes.values()):,}" in method.describe(model)
    assert "with norms" in method.describe(model)


def test_hft_seeding(tokenizer):
    same = [trainable(hft(tokenizer, seed=11)[0]) for _ in range(2)]
    assert same[0] == same[1]
    assert trainable(hft(tokenizer, seed=12)[0]) != same[0]
    # seed=None: torch's seed at apply time (the loop seeds torch with train.seed just before)
    model = make_tiny_model(tokenizer, layers=4)
    torch.manual_seed(11)
    attach(model, HFT(HftConfig()))
    assert trainable(model) == same[0]
    drawn_next = torch.rand(3)  # the draw uses its own generator: torch's global stream is untouched
    torch.manual_seed(11)
    assert torch.equal(drawn_next, torch.rand(3))


def test_hft_switches(tokenizer):
    model, _ = hft(tokenizer, seed=0, embeddings=True, norms=True)
    extra = {n for n in trainable(model) if not projection(n)}
    assert extra == {n for n, _ in model.named_parameters() if "norm" in n or "embed" in n}
    with pytest.raises(MethodError, match=r"hft\.embeddings=true"):
        hft(tokenizer, lm_head=True)


def test_hft_needs_llama_style_projections(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    with pytest.raises(MethodError, match=r"layer transformer\.h\.0 has no q_proj.*Llama/Qwen/Mistral"):
        attach(model, HFT(HftConfig()))


def test_hft_epoch_redraw(tokenizer):
    model, method = hft(tokenizer, seed=5, redraw="epoch")
    pool = {n for n, _ in model.named_parameters() if projection(n)}
    assert trainable(model) == pool == set(method.trained_names), "the optimizer must hold the whole pool"
    optimizer = build_optimizer(model, load_recipe(None, ["train.lr=1e-2", "train.weight_decay=0.1"]).train, method)
    model.train()
    params = dict(model.named_parameters())
    drawn = {}
    for epoch in (0, 1):
        method.on_epoch(model, epoch, optimizer)
        drawn[epoch] = trainable(model)
        assert len(drawn[epoch]) < len(pool) and drawn[epoch] <= pool
        held = {n for n, p in params.items() if p in optimizer.state}
        assert held <= drawn[epoch], f"epoch {epoch}: optimizer state kept for {sorted(held - drawn[epoch])[:3]}"
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for _ in range(3):
            model(IDS, labels=IDS).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        after = dict(model.named_parameters())
        frozen = [n for n in before if n not in drawn[epoch]]
        assert all(torch.equal(before[n], after[n]) for n in frozen), f"epoch {epoch}: a frozen parameter moved"
        assert all(not torch.equal(before[n], after[n]) for n in drawn[epoch]), f"epoch {epoch}: a drawn one did not"
        # the optimizer holds moments for exactly the drawn half: the memory HFT promises
        assert {n for n, p in params.items() if p in optimizer.state} == drawn[epoch]
    assert drawn[0] != drawn[1]
    assert drawn[1] - drawn[0] and drawn[0] - drawn[1], "a redraw frees some frozen weights and freezes some trained"
    back = sorted(drawn[1] - drawn[0])[0]  # trained in epoch 1, not in epoch 0: fresh moments (step 3, not 6)
    assert int(optimizer.state[params[back]]["step"]) == 3
    method.on_epoch(model, 0)
    assert trainable(model) == drawn[0], "the draw depends only on (seed, stage, epoch)"
    assert "epoch 0's draw, redrawn every epoch" in method.describe(model)


def stage_two(tokenizer, stage_one, seed, **opts):
    """A second stage: a fresh model loaded with the weights `stage_one` ended with, HFT applied again."""
    model = make_tiny_model(tokenizer, layers=4)
    model.load_state_dict(stage_one.state_dict())
    return hft(tokenizer, model=model, seed=seed, **opts)


@pytest.mark.parametrize("redraw", ["stage", "epoch"])
def test_hft_each_stage_draws_its_own_half(tokenizer, redraw):
    """SFT then DPO from the SFT model: the second stage starts from other weights, so it draws
    another half with the same seed; starting the same stage again draws the same half."""
    first, m1 = hft(tokenizer, seed=11, redraw=redraw)
    drawn1 = m1.drawn()
    with torch.no_grad():  # stage one trains its half
        for n, p in first.named_parameters():
            if n in drawn1:
                p.add_(torch.randn_like(p) * 1e-3)
    second, m2 = stage_two(tokenizer, first, seed=11, redraw=redraw)
    assert m2.stage != m1.stage
    assert m2.drawn() != drawn1, "stage two froze the same half as stage one"
    again, m3 = stage_two(tokenizer, first, seed=11, redraw=redraw)
    assert m3.stage == m2.stage and m3.drawn() == m2.drawn() and trainable(again) == trainable(second)
    assert f"stage {m2.stage}" in m2.describe(second)
    # over many stages the draws spread: a projection trains in some stages and not in others
    stages = [stage_two(tokenizer, first, seed=s)[1].drawn() for s in range(6)]
    assert len({frozenset(d) for d in stages}) == 6


def test_hft_stage_identity_reads_the_pool_only(tokenizer):
    from tunesmith.methods.hft import stage_identity

    model = make_tiny_model(tokenizer)
    pool = {n for n, _ in model.named_parameters() if projection(n)}
    ident = stage_identity(model, pool)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)  # not in the pool
    assert stage_identity(model, pool) == ident
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.001)
    assert stage_identity(model, pool) != ident
    with torch.device("meta"):
        meta = make_tiny_model(tokenizer)
    assert len(stage_identity(meta, pool)) == 16  # no weights: by shape only, no error


def test_hft_epoch_redraw_refuses_several_processes(tokenizer, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(MethodError, match=r"hft\.redraw=epoch cannot run with 2 processes.*use hft\.redraw=stage"):
        hft(tokenizer, redraw="epoch")
    hft(tokenizer, redraw="stage")  # one fixed draw is fine under DDP/FSDP


def test_hft_epoch_run_crosses_epochs_and_resumes(tmp_path, tiny_model_dir, tokenizer):
    """Through the loop, with 2 micro-batches an epoch: 6 steps = epochs 0,0,1,1,2,2; a resume at
    step 3 (mid epoch 1) redraws epoch 1 and reproduces the straight run; only the pool moved."""
    from tests.conftest import tiny_recipe, train_losses
    from tunesmith.train.loop import stopping_after, train

    extra = ["method.name=hft", "method.hft.redraw=epoch", "train.batch_tokens=512"]
    full = train(tiny_recipe(tmp_path / "a", tiny_model_dir, *extra))
    rows = [json.loads(line) for line in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "loss" in r] == [0, 0, 1, 1, 2, 2]
    with stopping_after(3):
        train(tiny_recipe(tmp_path / "b", tiny_model_dir, *extra))
    resumed = train(tiny_recipe(tmp_path / "b", tiny_model_dir, *extra, "resume=true"))
    a, b = train_losses(full.run_dir), train_losses(resumed.run_dir)
    assert len(a) == 6 and all(abs(x - y) < 1e-5 for x, y in zip(a, b)), (a, b)
    saved = load_file(str(full.output / "model.safetensors"))
    base = make_tiny_model(tokenizer).state_dict()
    moved = {n for n, t in saved.items() if not torch.equal(t, base[n])}
    assert moved and all(projection(n) for n in moved)
