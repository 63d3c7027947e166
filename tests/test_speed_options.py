"""The speed switches change how a step runs, never what it computes: the whole-logits loss equals
the chunked one, selective checkpointing equals none, the AdamW implementations agree; and each
switch does what it says (which layers are checkpointed, which are compiled)."""
import copy

import pytest
import torch

from tests.conftest import make_tiny_model
from tests.conftest import grads
from tunesmith.data import collate
from tunesmith.models.attention import use_packed_attention
from tunesmith.recipe import RecipeError, TrainConfig, load_recipe
from tunesmith.train.prepare import training_mode
from tunesmith.train.step import LossModule, backward_window
from tunesmith.train.optim import build_optimizer
from tunesmith.objectives.sft import SFT

CPU = torch.device("cpu")


def step_grads(tokenizer, samples, chunk: int, cfg: TrainConfig | None = None, layers: int = 2):
    model = make_tiny_model(tokenizer, layers=layers)
    use_packed_attention(model)
    if cfg is not None:
        training_mode(model, cfg)
    batch = collate(samples, packing=True, pad_id=tokenizer.pad_token_id)
    loss, units, _, _ = backward_window(LossModule(model, SFT(chunk)), [batch], CPU, "fp32")
    return loss, grads(model), model


def test_whole_logits_loss_equals_chunked(tokenizer, samples):  # noqa: F811
    whole, g_whole, _ = step_grads(tokenizer, samples, chunk=0)
    chunked, g_chunked, _ = step_grads(tokenizer, samples, chunk=7)  # several chunks, a ragged last one
    assert whole == pytest.approx(chunked, rel=1e-6)
    assert g_whole.keys() == g_chunked.keys() and g_whole
    for name in g_whole:
        torch.testing.assert_close(g_whole[name], g_chunked[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("every", [1, 2])
def test_selective_checkpointing_same_gradients_on_the_chosen_layers(tokenizer, samples, every):  # noqa: F811
    plain, g_plain, _ = step_grads(tokenizer, samples, chunk=1024, layers=4)
    cfg = TrainConfig(activation_checkpointing=True, checkpoint_every=every)
    ckpt, g_ckpt, model = step_grads(tokenizer, samples, chunk=1024, cfg=cfg, layers=4)
    flags = [layer.gradient_checkpointing for layer in model.model.layers]
    assert flags == ([True] * 4 if every == 1 else [True, False, True, False])
    assert plain == pytest.approx(ckpt, rel=1e-6)
    for name in g_plain:
        torch.testing.assert_close(g_plain[name], g_ckpt[name], atol=1e-6, rtol=1e-5)


def test_adamw_implementations_agree(tokenizer, samples):  # noqa: F811
    _, _, reference = step_grads(tokenizer, samples, chunk=1024)
    results = {}
    for impl in ("fused", "foreach", "loop"):
        model = copy.deepcopy(reference)
        for p, ref in zip(model.parameters(), reference.parameters()):
            p.grad = ref.grad.clone()
        cfg = TrainConfig(adamw=impl, lr=1e-2, weight_decay=0.1)
        opt = build_optimizer(model, cfg)
        expected = {"fused": ("fused", True), "foreach": ("foreach", True), "loop": ("foreach", False)}[impl]
        assert opt.defaults[expected[0]] is expected[1]
        for _ in range(3):
            opt.step()
        results[impl] = {n: p.detach().clone() for n, p in model.named_parameters()}
    moved = max((results["fused"][n] - p).abs().max() for n, p in reference.named_parameters())
    assert moved > 1e-3
    for impl in ("foreach", "loop"):
        for name, value in results["fused"].items():
            torch.testing.assert_close(results[impl][name], value, atol=1e-6, rtol=1e-5)


def test_regional_compile_wraps_every_decoder_layer(tokenizer):
    model = make_tiny_model(tokenizer, layers=3)
    training_mode(model, TrainConfig(compile=True))
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert model.model.embed_tokens._compiled_call_impl is None  # regional: the layers only
    assert model.training and model.config.use_cache is False


def test_recipe_checks_the_new_switches():
    with pytest.raises(RecipeError, match="checkpoint_every"):
        load_recipe(None, ["train.checkpoint_every=0"])
    with pytest.raises(RecipeError, match="adamw"):
        load_recipe(None, ["train.adamw=sgd"])
    assert load_recipe(None, ["train.loss_chunk=0"]).train.loss_chunk == 0


def test_length_buckets_bound_the_padding():
    from tunesmith.models.attention import length_buckets, segments_from_ids

    lengths = [2048, 40, 35, 1600, 500, 45, 390, 2000]
    buckets = length_buckets(lengths, 0.75)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for b in buckets:
        assert min(lengths[i] for i in b) >= 0.75 * max(lengths[i] for i in b)
    assert [sorted(b) for b in buckets] == [[0, 3, 7], [4, 6], [1, 2, 5]]
    assert length_buckets(lengths, 0.0) == [sorted(range(8), key=lambda i: -lengths[i])]  # one bucket
    # a padded batch of two rows: every real token is scattered back exactly once, padding never
    ids = torch.tensor([[1] * 5 + [2] * 3 + [3] * 4 + [0] * 2, [1] * 9 + [2] * 2 + [0] * 3])
    seg = segments_from_ids(ids)
    real = torch.nonzero(ids.reshape(-1) > 0).flatten()
    assert sorted(seg.scatter.tolist()) == real.tolist()
    assert sum(int(b.valid.sum()) for b in seg.buckets) == real.numel()
    assert len(seg.buckets) > 1
