"""RoPE scaling (`model.rope.*`): the rebuilt rotary module equals what transformers computes for a
config written by hand in its own terms (inverse frequencies, YaRN's attention factor, and a model built
natively from that config gives the same logits); static NTK is the θ of its formula; a scaled model's
position 0 is unchanged and its later positions are not; a trained run's saved model or adapter, loaded
again, computes the scaled positions (and differs from the same weights on plain RoPE); GGUF writes
llama.cpp's scaling keys; nonsense is a one-line error naming the key."""
import json
from types import SimpleNamespace

import gguf
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from conftest import make_tiny_model, tiny_recipe
from tunesmith.config import RopeConfig
from tunesmith.export import ExportError
from tunesmith.export.gguf import export_gguf, export_gguf_lora
from tunesmith.export.merged import export_merged
from tunesmith.infer.generate import load_for_inference
from tunesmith.models.load import ModelError
from tunesmith.models.rope import apply_rope, describe_rope, rope_parameters, rope_record, set_rope
from tunesmith.train.loop import train
from tunesmith.train.prepare import prepare_model
from tunesmith.train.safety import TrainError

THETA, LENGTH = 5000.0, 32  # a small original context, so a few dozen tokens reach past it
SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, attn_implementation="sdpa")


def tiny(**rope) -> LlamaForCausalLM:
    """A tiny Llama with lively weights; `rope`: transformers' own rope_parameters for it."""
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPE, max_position_embeddings=rope.pop("max_position_embeddings", LENGTH),
                         rope_parameters={"rope_type": "default", "rope_theta": THETA, **rope})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return model


def logits(model, n=LENGTH * 3):
    ids = (torch.arange(n) * 7 % 300).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids).logits


# (model.rope.*, the same scaling as transformers' rope_parameters, written by hand)
CASES = {
    "linear": (dict(scaling="linear", factor=4.0),
               dict(rope_type="linear", factor=4.0, max_position_embeddings=4 * LENGTH)),
    "linear-target": (dict(scaling="linear", target_length=3 * LENGTH, theta=20000.0),
                      dict(rope_type="linear", factor=3.0, rope_theta=20000.0, max_position_embeddings=3 * LENGTH)),
    "dynamic": (dict(scaling="dynamic", factor=2.0), dict(rope_type="dynamic", factor=2.0)),
    "yarn": (dict(scaling="yarn", factor=4.0),
             dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=LENGTH,
                  max_position_embeddings=4 * LENGTH)),
    "yarn-betas": (dict(scaling="yarn", target_length=8 * LENGTH, beta_fast=16.0, beta_slow=2.0),
                   dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=LENGTH, beta_fast=16.0,
                        beta_slow=2.0, max_position_embeddings=8 * LENGTH)),
}


@pytest.mark.parametrize("case", CASES)
def test_rebuilt_rotary_matches_transformers(case):
    ours, theirs = CASES[case]
    model = tiny()
    plain = logits(model)
    record = apply_rope(model, RopeConfig(**ours))
    reference = tiny(**theirs)  # same weights (same seed), scaled natively by transformers
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[theirs["rope_type"]](reference.config)
    rotary = model.model.rotary_emb
    torch.testing.assert_close(rotary.inv_freq, inv_freq, rtol=1e-6, atol=0)
    assert rotary.attention_scaling == pytest.approx(scaling)
    assert model.config.max_position_embeddings == reference.config.max_position_embeddings
    scaled = logits(model)
    torch.testing.assert_close(scaled, logits(reference), rtol=0, atol=1e-5)
    torch.testing.assert_close(scaled[0, 0], plain[0, 0], rtol=0, atol=1e-5)  # position 0 has no rotation
    assert (scaled[0, -1] - plain[0, -1]).abs().max() > 1e-3
    assert record == rope_record(model) and describe_rope(record).startswith(theirs["rope_type"])


def test_yarn_attention_factor_is_the_papers():
    model = tiny()
    apply_rope(model, RopeConfig(scaling="yarn", factor=8.0))
    assert model.model.rotary_emb.attention_scaling == pytest.approx(0.1 * torch.log(torch.tensor(8.0)).item() + 1)


def test_dynamic_leaves_the_original_context_alone():
    model = tiny()
    plain = logits(model, LENGTH)
    apply_rope(model, RopeConfig(scaling="dynamic", target_length=4 * LENGTH))
    assert model.config.max_position_embeddings == LENGTH  # transformers scales from it at run time
    assert model.config.rope_parameters["factor"] == 4.0
    torch.testing.assert_close(logits(model, LENGTH), plain, rtol=0, atol=1e-6)


def test_ntk_is_the_formulas_larger_theta():
    model = tiny()
    plain = logits(model)
    apply_rope(model, RopeConfig(scaling="ntk", factor=4.0))
    d = 64 // 4
    theta = THETA * 4.0 ** (d / (d - 2))
    expected = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq.double(), expected, rtol=1e-6, atol=0)
    assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": pytest.approx(theta)}
    assert model.config.max_position_embeddings == 4 * LENGTH
    scaled = logits(model)
    torch.testing.assert_close(scaled[0, 0], plain[0, 0], rtol=0, atol=1e-5)
    assert (scaled[0, -1] - plain[0, -1]).abs().max() > 1e-3


def test_new_theta_alone_keeps_plain_rope():
    model = tiny()
    apply_rope(model, RopeConfig(theta=50000.0, target_length=LENGTH * 2))
    reference = tiny(rope_theta=50000.0)
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-5)
    assert model.config.max_position_embeddings == 2 * LENGTH
    assert apply_rope(tiny(), RopeConfig()) is None


@pytest.mark.parametrize("settings, message", [
    (dict(factor=2.0), r"model.rope.factor needs model.rope.scaling"),
    (dict(original_length=16), r"model.rope.original_length needs model.rope.scaling"),
    (dict(target_length=64), r"model.rope.target_length without model.rope.scaling or model.rope.theta"),
    (dict(scaling="linear"), r"model.rope.scaling=linear needs model.rope.factor or model.rope.target_length"),
    (dict(scaling="yarn", target_length=16), r"model.rope.target_length 16 is below the original length 32"),
    (dict(scaling="linear", factor=2.0, target_length=100), r"model.rope.factor 2.0 and model.rope.target_length 100"),
    (dict(scaling="linear", factor=2.0, beta_fast=8.0), r"model.rope.beta_fast/beta_slow apply to scaling=yarn"),
    (dict(scaling="yarn", factor=2.0, beta_fast=1.0, beta_slow=2.0), r"model.rope.beta_fast \(1.0\) must exceed"),
])
def test_nonsense_is_refused_naming_the_key(settings, message):
    model = tiny()
    with pytest.raises(ModelError, match=message):
        apply_rope(model, RopeConfig(**settings))
    assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": THETA}


def test_models_it_cannot_scale_are_refused():
    with pytest.raises(ModelError, match=r"model.rope: `gpt2` has no rotary position embeddings"):
        apply_rope(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, bos_token_id=0,
                                              eos_token_id=0)),
                   RopeConfig(scaling="linear", factor=2.0))
    config = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": THETA}, head_dim=16)
    with pytest.raises(ModelError, match=r"model.rope.original_length: the model config has no max_position"):
        rope_parameters(config, RopeConfig(scaling="yarn", factor=2.0))
    scaled = tiny(rope_type="linear", factor=2.0)
    with pytest.raises(ModelError, match=r"model.rope.scaling=yarn: the model already has `linear` RoPE scaling"):
        apply_rope(scaled, RopeConfig(scaling="yarn", factor=2.0))


def test_recipe_refuses_a_factor_below_one():
    from tunesmith.recipe import load_recipe

    with pytest.raises(ValueError, match=r"model.rope.factor: must be >= 1"):
        load_recipe(None, ["model.rope.factor=0.5"])


# ---- saved runs carry the positions

def _ids():
    return (torch.arange(40) * 13 % 900 + 5).unsqueeze(0)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _trained(tokenizer, tmp_path, model_dir, *extra):
    model = make_tiny_model(tokenizer)
    base = rope_record(model)
    recipe = tiny_recipe(tmp_path, model_dir, "train.steps=2", "train.save_every=100", "model.rope.scaling=linear",
                         "model.rope.factor=2", *extra)
    result = train(recipe, model=model)
    assert result.status == "completed"
    return model.eval(), base, result


def test_full_model_saves_rope_in_config(tokenizer, tiny_model_dir, tmp_path):
    model, base, result = _trained(tokenizer, tmp_path, tiny_model_dir, "method.name=full")
    config = json.loads((result.output / "config.json").read_text())
    assert config["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert config["max_position_embeddings"] == 2 * 2048
    loaded, _ = load_for_inference(str(result.run_dir))
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-5)
    set_rope(loaded, base)  # the same weights on the base positions
    assert (_logits(loaded)[0, -1] - _logits(model)[0, -1]).abs().max() > 1e-4


def test_adapter_records_rope_and_every_loader_restores_it(tokenizer, tiny_model_dir, tmp_path):
    model, base, result = _trained(tokenizer, tmp_path, tiny_model_dir)
    meta = json.loads((result.output / "tunesmith_method.json").read_text())
    assert meta["rope"] == {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                            "max_position_embeddings": 4096}
    loaded, _ = load_for_inference(str(tiny_model_dir), adapter=str(result.run_dir), merge=False)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-5)
    set_rope(loaded, base)
    assert (_logits(loaded)[0, -1] - _logits(model)[0, -1]).abs().max() > 1e-4

    merged = export_merged(str(tiny_model_dir), result.output, tmp_path / "merged")
    assert json.loads((merged / "config.json").read_text())["rope_parameters"]["rope_type"] == "linear"
    torch.testing.assert_close(_logits(load_for_inference(str(merged))[0]), _logits(model), rtol=0, atol=1e-4)

    with pytest.raises(ExportError, match=r"trained with other RoPE positions .* export a merged GGUF"):
        export_gguf_lora(result.output, tmp_path / "a.gguf", base=str(tiny_model_dir), progress=False)
    other = tiny_recipe(tmp_path, tiny_model_dir, f"model.adapter={result.output}", "model.rope.scaling=linear",
                        "model.rope.factor=4")
    with pytest.raises(TrainError, match=r"model.rope.\*: the adapter at .* \(linear ×2"):
        prepare_model(other, make_tiny_model(tokenizer))


def test_adapter_on_unchanged_positions_records_none(tokenizer, tiny_model_dir, tmp_path):
    from tunesmith.export.tuned import save_tuned
    from tunesmith.methods.lora import LoRA
    from tunesmith.recipe import LoraConfig

    model = make_tiny_model(tokenizer)
    method = LoRA(LoraConfig())
    method.apply(model)
    save_tuned(model, method, str(tiny_model_dir), tmp_path / "plain")
    assert "rope" not in json.loads((tmp_path / "plain" / "tunesmith_method.json").read_text())
    apply_rope(model, RopeConfig(scaling="yarn", factor=2.0))
    save_tuned(model, method, str(tiny_model_dir), tmp_path / "yarn")
    saved = json.loads((tmp_path / "yarn" / "tunesmith_method.json").read_text())["rope"]
    assert saved == rope_record(model) and saved["rope_parameters"]["rope_type"] == "yarn"
    # the multi-LoRA server shares one base: an adapter on other positions gets a base of its own
    from tunesmith.serve.multilora import lora_factors

    # (without the check it would read the adapter's tensors and return its factors, or refuse them)
    assert lora_factors(tmp_path / "yarn", make_tiny_model(tokenizer)) is None
    # a merge writes the base's config: an adapter on stretched positions is refused, a plain one is not
    from tunesmith.export.merge import read_merge_recipe
    from tunesmith.export.merge_inputs import classify

    assert classify(read_merge_recipe({"merge": {"method": "linear", "models": [str(tmp_path / "plain")]}}))
    with pytest.raises(ExportError, match=r"stretched positions \(yarn ×2"):
        classify(read_merge_recipe({"merge": {"method": "linear", "models": [str(tmp_path / "yarn")]}}))


# ---- GGUF

def _fields(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k.startswith("llama.")}


@pytest.mark.parametrize("settings, expected", [
    (dict(scaling="linear", factor=4.0), {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0,
                                          "llama.context_length": 4 * 2048}),
    (dict(scaling="yarn", factor=2.0, beta_fast=16.0), {
        "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 2.0,
        "llama.rope.scaling.original_context_length": 2048, "llama.rope.scaling.yarn_beta_fast": 16.0,
        "llama.rope.scaling.yarn_beta_slow": 1.0}),
])
def test_gguf_writes_llama_cpp_scaling_keys(tokenizer, tmp_path, settings, expected):
    model = make_tiny_model(tokenizer)
    apply_rope(model, RopeConfig(**settings))
    fields = _fields(export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, progress=False).path)
    assert {k: fields.get(k) for k in expected} == expected
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)


def test_gguf_refuses_dynamic_ntk(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer)
    apply_rope(model, RopeConfig(scaling="dynamic", factor=2.0))
    with pytest.raises(ExportError, match=r"rope scaling `dynamic` is not supported by the GGUF export"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, progress=False)
