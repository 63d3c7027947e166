"""Depth up-scaling: the SOLAR and repeat plans, the grown stack's config and weights, the KV cache
on the new layer indices, the identity copies, the saved folder, the CLI, and training it on."""
import json

import pytest
import torch
from transformers import DynamicCache

from tests.conftest import lively_model, make_tiny_model, tiny_recipe, train_losses
from tunesmith.models.grow import (grow_layers, grow_model, plan, repeat_layers, repeated_positions,
                                   solar_layers)
from tunesmith.models.load import ModelError

IDS = torch.tensor([[1, 17, 230, 5, 99, 4, 812, 33, 7, 250, 41, 3]])


def test_the_plans():
    assert solar_layers(4, 1) == [0, 1, 2, 1, 2, 3]            # 2(n - m) = 6
    assert len(solar_layers(32, 8)) == 48                      # SOLAR 10.7B: 32 → 48
    assert solar_layers(3, 0) == [0, 1, 2, 0, 1, 2]
    assert repeat_layers(5, 1, 3) == [0, 1, 2, 1, 2, 3, 4]
    assert repeat_layers(4, 0, 4) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert plan(5, repeat="2:4") == [0, 1, 2, 3, 2, 3, 4]
    assert repeated_positions([0, 1, 2, 1, 2, 3]) == [3, 4]
    for bad in (lambda: solar_layers(4, 4), lambda: solar_layers(4, -1), lambda: repeat_layers(4, 3, 3),
                lambda: repeat_layers(4, 2, 5), lambda: plan(4), lambda: plan(4, solar=1, repeat="0:1"),
                lambda: plan(4, repeat="1-3")):
        with pytest.raises(ModelError):
            bad()


def test_grown_layers_are_their_sources_own_copies(tokenizer):
    original = lively_model(tokenizer, 3, layers=4)
    model = grow_layers(lively_model(tokenizer, 3, layers=4), solar_layers(4, 1))
    sources = [0, 1, 2, 1, 2, 3]
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(6))
    for new, old in enumerate(sources):
        for key, value in original.model.layers[old].state_dict().items():
            assert torch.equal(model.model.layers[new].state_dict()[key], value), (new, key)
    # a copy owns its weights: changing one leaves its source alone
    first, copy = model.model.layers[1].mlp.down_proj.weight, model.model.layers[3].mlp.down_proj.weight
    assert first.data_ptr() != copy.data_ptr()
    with torch.no_grad():
        copy.add_(1.0)
    assert torch.equal(first, original.model.layers[1].mlp.down_proj.weight)
    with torch.no_grad():
        grown, full = model(IDS).logits, original(IDS).logits
    assert grown.shape == full.shape and not torch.allclose(grown, full, atol=1e-3)


def cached_logits(model, ids, prefix: int = 4) -> torch.Tensor:
    """Logits of positions prefix-1.. computed through the KV cache: the prefix at once, then one token at a time."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = [model(input_ids=ids[:, :prefix], cache=cache, use_cache=True).logits[:, -1]]
        for t in range(prefix, ids.shape[1]):
            out.append(model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits[:, -1])
    return torch.stack(out, 1)


def test_the_kv_cache_follows_the_new_layer_indices(tokenizer):
    model = grow_layers(lively_model(tokenizer, 4, layers=3), repeat_layers(3, 0, 2)).eval()
    with torch.no_grad():
        full = model(IDS).logits[:, 3:]
    torch.testing.assert_close(cached_logits(model, IDS), full, rtol=1e-4, atol=1e-4)
    greedy = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(IDS, use_cache=True, **greedy), model.generate(IDS, use_cache=False, **greedy))
    # the control: copies left with their sources' indices share cache slots, and the cache goes wrong
    for layer, stale in zip(model.model.layers, repeat_layers(3, 0, 2)):
        layer.self_attn.layer_idx = stale
    assert not torch.allclose(cached_logits(model, IDS), full, atol=1e-3)


def test_per_layer_config_lists_follow_the_layers(tokenizer):
    """A model whose layers differ (Qwen2 with sliding-window layers): `layer_types` is rearranged with
    the layers, and cached decoding still equals full forwards."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                         layer_types=["full_attention", "sliding_attention", "full_attention"])
    model = Qwen2ForCausalLM(config).eval()
    grow_layers(model, repeat_layers(3, 1, 3))
    assert model.config.layer_types == ["full_attention", "sliding_attention", "full_attention",
                                        "sliding_attention", "full_attention"]
    with torch.no_grad():
        full = model(IDS).logits[:, 3:]
    torch.testing.assert_close(cached_logits(model, IDS), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sources", [repeat_layers(4, 1, 3), solar_layers(4, 1), solar_layers(4, 0)])
def test_identity_copies_give_the_original_output(tokenizer, sources):
    original = lively_model(tokenizer, 5, layers=4)
    model = grow_layers(lively_model(tokenizer, 5, layers=4), sources, identity=True)
    assert len(model.model.layers) == len(sources)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, original(IDS).logits, rtol=1e-5, atol=1e-5)
    for position in repeated_positions(sources):  # what made it so: the copies write nothing
        layer = model.model.layers[position]
        assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
        assert layer.self_attn.q_proj.weight.any()
    torch.testing.assert_close(cached_logits(model, IDS), model(IDS).logits[:, 3:].detach(), rtol=1e-4, atol=1e-4)


def test_only_llama_family_models_grow():
    with pytest.raises(ModelError, match="Llama-family"):
        grow_layers(torch.nn.Linear(2, 2), [0, 0])


def test_grow_writes_a_folder_that_trains_on(tokenizer, tmp_path, capsys):
    from tunesmith.cli import main
    from tunesmith.models.load import load_model
    from tunesmith.train.loop import train

    src = tmp_path / "src"
    make_tiny_model(tokenizer, seed=2, layers=3).save_pretrained(src)
    tokenizer.save_pretrained(src)
    assert main(["grow", "--model", str(src), "--repeat", "1:3", "--output", str(tmp_path / "grown")]) == 0
    assert "5 layers, from layers 0-2, 1-2" in capsys.readouterr().out
    grown, tok = load_model(str(tmp_path / "grown"))
    source, _ = load_model(str(src))
    assert grown.config.num_hidden_layers == 5 and len(tok) == len(tokenizer)
    assert json.loads((tmp_path / "grown" / "config.json").read_text())["num_hidden_layers"] == 5
    for new, old in enumerate([0, 1, 2, 1, 2]):
        for key, value in source.model.layers[old].state_dict().items():
            assert torch.equal(grown.model.layers[new].state_dict()[key], value)
    assert "layers from: [0, 1, 2, 1, 2]" in (tmp_path / "grown" / "grown_from.txt").read_text()
    # a bad span is one line, no traceback
    assert main(["grow", "--model", str(src), "--repeat", "2:9", "--output", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("tunesmith: error: --repeat 2:9") and "Traceback" not in err
    # training continues on the grown folder: LoRA and full
    for method in ("lora", "full"):
        recipe = tiny_recipe(tmp_path / method, tmp_path / "grown", f"method.name={method}", "train.steps=4",
                             "data.val_fraction=0", "train.save_every=0", "train.lr=3e-3")
        result = train(recipe)
        losses = train_losses(result.run_dir)
        assert result.status == "completed" and len(losses) == 4 and losses[-1] < losses[0], (method, losses)
    trained, _ = load_model(str(result.run_dir / "model"))
    assert trained.config.num_hidden_layers == 5


def test_identity_growth_through_the_folder_keeps_the_loss(tokenizer, tmp_path):
    """The loss right after growing equals the original's with --identity, and moves without it."""
    from tunesmith.models.load import load_model

    src = tmp_path / "src"
    lively_model(tokenizer, 8, layers=3).save_pretrained(src)
    tokenizer.save_pretrained(src)
    base, _ = load_model(str(src))
    same, _ = load_model(str(grow_model(str(src), tmp_path / "same", solar=1, identity=True)[0]))
    moved, _ = load_model(str(grow_model(str(src), tmp_path / "moved", solar=1)[0]))
    with torch.no_grad():
        losses = [float(m(IDS, labels=IDS).loss) for m in (base, same, moved)]
    assert same.config.num_hidden_layers == moved.config.num_hidden_layers == 4
    assert abs(losses[1] - losses[0]) < 1e-5 and abs(losses[2] - losses[0]) > 1e-3, losses
