"""Export parity: our adapter folders load in PEFT with PEFT's logits, PEFT's folders load in ours,
and a merged export equals base + adapter in plain transformers. Every adapter has a non-zero B,
and every test also checks the adapter changes the logits, so none can pass on a no-op."""
import json

import peft  # a test dependency (the `test` extra): parity must fail, not skip, without it
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_model
from tunesmith.export import ExportError, export_merged, load_adapter, save_adapter
from tunesmith.methods.lora import LoRA, lora_modules
from tunesmith.recipe import LoraConfig

IDS = torch.tensor([[1, 415, 2891, 314, 260, 1345, 30, 2]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def randomise(model, pattern: str, seed: int, std: float = 0.1) -> None:
    """Fill every parameter whose name contains `pattern` (A and B of LoRA) with seeded noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if pattern in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def lora_model(tokenizer, cfg: LoraConfig, seed: int = 1):
    model = make_tiny_model(tokenizer)
    LoRA(cfg).apply(model)
    randomise(model, ".lora_", seed)
    return model


def assert_changed(a, b):
    assert (a - b).abs().max() > 1e-3, "the adapter does not change the logits: the test would be vacuous"


CASES = {
    "all-linear": LoraConfig(rank=4, alpha=8, targets=["all-linear"]),
    "rslora": LoraConfig(rank=4, alpha=8, targets=["all-linear"], rslora=True),
    "q,v": LoraConfig(rank=8, alpha=16, targets=["q_proj", "v_proj"]),
    "one-layer": LoraConfig(rank=2, alpha=3, targets=["layers.1.mlp.down_proj"]),  # needs exclude_modules
}


@pytest.mark.parametrize("case", CASES)
def test_peft_loads_our_adapter_with_same_logits(tokenizer, tmp_path, case):
    cfg = CASES[case]
    ours = lora_model(tokenizer, cfg)
    path = save_adapter(ours, cfg, "tiny", tmp_path / "adapter")

    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    pcfg = peft.PeftConfig.from_pretrained(str(path))
    assert pcfg.peft_type == "LORA" and pcfg.r == cfg.rank and pcfg.use_rslora == cfg.rslora
    tensors = load_file(path / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors.values())
    assert len(tensors) == 2 * len(lora_modules(ours))

    theirs = peft.PeftModel.from_pretrained(make_tiny_model(tokenizer), str(path)).eval()
    wrapped = {n for n, m in theirs.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert {n.removeprefix("base_model.model.") for n in wrapped} == set(lora_modules(ours))
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=0)
    assert_changed(logits(ours), logits(make_tiny_model(tokenizer)))


@pytest.mark.parametrize("case", ["all-linear", "one-layer"])
def test_round_trip_through_our_loader(tokenizer, tmp_path, case):
    cfg = CASES[case]
    ours = lora_model(tokenizer, cfg, seed=2)
    save_adapter(ours, cfg, "tiny", tmp_path / "run" / "adapter")

    loaded = load_adapter(make_tiny_model(tokenizer), tmp_path / "run")  # a run folder resolves to run/adapter
    mods = lora_modules(loaded)
    assert set(mods) == set(lora_modules(ours))
    assert all((m.rank, m.alpha, m.rslora) == (cfg.rank, cfg.alpha, cfg.rslora) for m in mods.values())
    torch.testing.assert_close(logits(loaded), logits(ours), atol=1e-6, rtol=0)
    assert_changed(logits(loaded), logits(make_tiny_model(tokenizer)))


PEFT_CASES = {
    "plain": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "regex": dict(r=2, lora_alpha=4, target_modules=r".*\.(gate|up)_proj"),
    "one layer": dict(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"], layers_to_transform=[1]),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_saved_adapter_loads_with_same_logits(tokenizer, tmp_path, case):
    theirs = peft.get_peft_model(make_tiny_model(tokenizer), peft.LoraConfig(task_type="CAUSAL_LM", **PEFT_CASES[case]))
    randomise(theirs, "lora_", seed=3)
    theirs.eval()
    theirs.save_pretrained(str(tmp_path / "peft"))

    ours = load_adapter(make_tiny_model(tokenizer), tmp_path / "peft")
    n_theirs = sum(1 for _, m in theirs.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    assert len(lora_modules(ours)) == n_theirs
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)
    assert_changed(logits(ours), logits(make_tiny_model(tokenizer)))


def test_merged_export_matches_base_plus_adapter(tokenizer, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = CASES["all-linear"]
    ours = lora_model(tokenizer, cfg, seed=4)  # make_tiny_model(seed 0) is the model in tiny_model_dir
    save_adapter(ours, cfg, str(tiny_model_dir), tmp_path / "adapter")
    out = export_merged(str(tiny_model_dir), tmp_path / "adapter", tmp_path / "merged")

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    torch.testing.assert_close(logits(merged), logits(ours), atol=1e-5, rtol=0)
    assert_changed(logits(merged), logits(make_tiny_model(tokenizer)))
    assert safetensors_keys(out) == safetensors_keys(tiny_model_dir)

    # bf16 export: same keys, weights in bf16, close to the fp32 merge
    out16 = export_merged(str(tiny_model_dir), tmp_path / "adapter", tmp_path / "merged16", dtype="bf16")
    st = load_st(out16)
    assert set(st) == safetensors_keys(tiny_model_dir) and all(t.dtype == torch.bfloat16 for t in st.values())
    fp32 = load_st(out)
    assert all(torch.allclose(st[k].float(), fp32[k], atol=1e-2, rtol=1e-2) for k in st)


def test_resave_full_model_in_bf16_and_replace(tokenizer, tiny_model_dir, tmp_path):
    out = export_merged(str(tiny_model_dir), None, tmp_path / "m", dtype="bf16")
    base, again = load_st(tiny_model_dir), load_st(out)
    assert set(again) == set(base)
    assert all(torch.equal(again[k], base[k].to(torch.bfloat16)) for k in base)
    out = export_merged(str(tiny_model_dir), None, tmp_path / "m", dtype="fp32")  # replaces the bf16 folder
    assert all(torch.equal(t, base[k]) for k, t in load_st(out).items())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_save_replaces_adapter_but_not_unrelated_folder(tokenizer, tmp_path):
    cfg = CASES["q,v"]
    save_adapter(lora_model(tokenizer, cfg, seed=5), cfg, "tiny", tmp_path / "a")
    second = lora_model(tokenizer, cfg, seed=6)
    save_adapter(second, cfg, "tiny", tmp_path / "a")
    torch.testing.assert_close(logits(load_adapter(make_tiny_model(tokenizer), tmp_path / "a")), logits(second),
                               atol=1e-6, rtol=0)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="refusing to replace"):
        save_adapter(second, cfg, "tiny", tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ExportError, match="rank"):
        save_adapter(second, LoraConfig(rank=4, alpha=16), "tiny", tmp_path / "b")


def _edit_config(**changes):
    def edit(folder):
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def _rename_module(folder):
    path = folder / "adapter_model.safetensors"
    st = load_file(path)
    save_file({k.replace("layers.1.", "layers.7."): v for k, v in st.items()}, str(path))


def _drop_weights(folder):
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")


def _drop_b(folder):
    path = folder / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if "lora_B" not in k}, str(path))


BAD = {
    "not LoRA": (_edit_config(peft_type="PREFIX_TUNING"), "only LORA"),
    "DoRA": (_edit_config(use_dora=True), "use_dora"),
    "rank pattern": (_edit_config(rank_pattern={"q_proj": 8}), "rank_pattern"),
    "bias": (_edit_config(bias="all"), "bias"),
    "fan_in_fan_out": (_edit_config(fan_in_fan_out=True), "fan_in_fan_out"),
    "pissa": (_edit_config(init_lora_weights="pissa"), "base weights"),
    "modules_to_save": (_edit_config(modules_to_save=["lm_head"]), "modules_to_save"),
    "unknown module": (_rename_module, "lacks: model.layers.7"),
    "no safetensors": (_drop_weights, "only safetensors"),
    "half a pair": (_drop_b, "not both"),
    "no config": (lambda f: (f / "adapter_config.json").unlink(), "no adapter_config.json"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_adapter_folder_is_a_clear_error(tokenizer, tmp_path, case):
    cfg = CASES["q,v"]
    folder = save_adapter(lora_model(tokenizer, cfg), cfg, "tiny", tmp_path / "adapter")
    spoil, message = BAD[case]
    spoil(folder)
    model = make_tiny_model(tokenizer)
    with pytest.raises(ExportError, match=message) as info:
        load_adapter(model, folder)
    assert isinstance(info.value, ValueError)
    assert not lora_modules(model), "a failed load must leave the model untouched"


def test_missing_folder_is_a_clear_error(tokenizer, tmp_path):
    with pytest.raises(ExportError, match="not found"):
        load_adapter(make_tiny_model(tokenizer), tmp_path / "nope")


def load_st(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def safetensors_keys(folder):
    return set(load_st(folder))
