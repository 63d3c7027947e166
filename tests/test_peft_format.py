"""PEFT's layout read back: a folder holding only PEFT's files (ours with our own files removed, or
one PEFT wrote) loads as its method through `load_tuned`, for every method in `peft_format.FORMATS`,
with the logits the adapter had; folders outside what a reader supports are one-line errors."""
import json

import peft  # a test dependency (the `test` extra): parity must fail, not skip, without it
import pytest
import torch

from tests.conftest import make_tiny_model
from tunesmith.export.atomic import ExportError
from tunesmith.export.peft_format import ADAPTER_CONFIG, FORMATS
from tunesmith.export.tuned import DELTA_FILE, METHOD_FILE, load_tuned, read_method, save_tuned
from tunesmith.methods import attach, build_method
from tunesmith.recipe import method_from_dict

L = 4  # prefix length
IDS = torch.randint(5, 1000, (2, 10), generator=torch.Generator().manual_seed(3))
OPTIONS = {
    "lora": {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]},
    "dora": {"rank": 4, "alpha": 8, "dora": True, "rslora": True, "targets": ["q_proj", "up_proj"]},
    "ia3": {"targets": ["k_proj", "v_proj", "layers.1.mlp.down_proj"], "feedforward": ["down_proj"]},
    "prefix": {"length": L, "hidden": 16, "reparam": True},
}


def logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model.eval()(input_ids=ids, **kw).logits


def perturb(model, std=0.2, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def peft_only(tokenizer, tmp_path, case):
    """Our adapter of `case`, trained a little (perturbed), saved, then stripped to PEFT's files."""
    name = "lora" if case == "dora" else case
    model = make_tiny_model(tokenizer)
    method = build_method(method_from_dict(name, OPTIONS[case]))
    torch.manual_seed(1)
    attach(model, method)
    perturb(model)
    folder = save_tuned(model, method, "tiny", tmp_path / "adapter")
    (folder / METHOD_FILE).unlink()
    (folder / DELTA_FILE).unlink()
    return model, folder


@pytest.mark.parametrize("case", OPTIONS)
def test_a_peft_only_folder_loads_as_its_method_with_the_same_logits(tokenizer, tmp_path, case):
    ours, folder = peft_only(tokenizer, tmp_path, case)
    name = "lora" if case == "dora" else case
    assert read_method(folder)[0].name == name
    fresh = make_tiny_model(tokenizer)
    method, cfg = load_tuned(fresh, folder)
    assert method.name == cfg.name == name
    assert set(method.trained_names) == {n for n, p in fresh.named_parameters() if p.requires_grad}
    torch.testing.assert_close(logits(fresh), logits(ours), atol=1e-5, rtol=1e-4)
    assert (logits(fresh) - logits(make_tiny_model(tokenizer))).abs().max() > 1e-3, "the adapter is live"


def test_every_format_reads_what_it_writes(tokenizer, tmp_path):
    """The table's writer and reader agree on the config they exchange: the reader rebuilds options
    that write the same adapter_config.json again (the names PEFT matches and the flags it reads)."""
    for case in ("ia3", "prefix", "lora"):
        _, folder = peft_only(tokenizer, tmp_path / case, case)
        written = json.loads((folder / ADAPTER_CONFIG).read_text())
        fresh = make_tiny_model(tokenizer)
        method, _ = load_tuned(fresh, folder)
        again, _ = FORMATS[method.name].write(fresh, method, "tiny")
        assert again == written


def test_peft_saved_ia3_folder_loads_with_peft_logits(tokenizer, tmp_path):
    theirs = peft.get_peft_model(make_tiny_model(tokenizer), peft.IA3Config(
        task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    perturb(theirs)
    theirs.save_pretrained(str(tmp_path / "peft"))
    fresh = make_tiny_model(tokenizer)
    method, cfg = load_tuned(fresh, tmp_path / "peft")
    assert cfg.name == "ia3" and len(cfg.ia3.feedforward) == 2 and len(cfg.ia3.targets) == 6
    torch.testing.assert_close(logits(fresh), logits(theirs), atol=1e-5, rtol=1e-4)
    assert (logits(fresh) - logits(make_tiny_model(tokenizer))).abs().max() > 1e-3


def test_peft_saved_prefix_folder_loads_with_peft_logits(tokenizer, tmp_path):
    """PEFT places real tokens at positions l.. (the prefix sits in its cache); ours start at 0."""
    theirs = peft.get_peft_model(make_tiny_model(tokenizer), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=L))
    perturb(theirs, std=0.5)
    theirs.save_pretrained(str(tmp_path / "peft"))
    fresh = make_tiny_model(tokenizer)
    method, cfg = load_tuned(fresh, tmp_path / "peft")
    assert cfg.name == "prefix" and cfg.prefix.length == L and cfg.prefix.reparam is False
    pos = torch.arange(IDS.shape[1])[None].expand(IDS.shape[0], -1)
    expected = logits(theirs.eval())
    torch.testing.assert_close(logits(fresh, position_ids=pos + L), expected, atol=1e-5, rtol=1e-4)
    assert (expected - logits(make_tiny_model(tokenizer), position_ids=pos + L)).abs().max() > 1e-3


def _edit(**changes):
    def spoil(folder):
        path = folder / ADAPTER_CONFIG
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return spoil


BAD = {
    "unknown peft type": ("ia3", _edit(peft_type="LOHA"), r"peft_type 'LOHA' is not supported \(LORA, IA3, PREFIX_TUNING\)"),
    "ia3 modules_to_save": ("ia3", _edit(modules_to_save=["lm_head"]), r"`modules_to_save`=\['lm_head'\] is not supported"),
    "ia3 fan_in_fan_out": ("ia3", _edit(fan_in_fan_out=True), "fan_in_fan_out=true"),
    "prefix layers": ("prefix", _edit(num_layers=3), r"expected one tensor `prompt_embeddings` of shape \(4, 192\)"),
    "prefix submodules": ("prefix", _edit(num_transformer_submodules=2), "only decoder-only models"),
    "prefix length": ("prefix", _edit(num_virtual_tokens="4"), "`num_virtual_tokens` must be a positive integer"),
}


@pytest.mark.parametrize("case", BAD)
def test_unsupported_peft_folders_are_one_line_errors(tokenizer, tmp_path, case):
    method, spoil, message = BAD[case]
    _, folder = peft_only(tokenizer, tmp_path, method)
    spoil(folder)
    with pytest.raises(ExportError, match=message) as e:
        load_tuned(make_tiny_model(tokenizer), folder)
    assert "\n" not in str(e.value)


def test_a_prefix_folder_for_another_depth_names_both(tokenizer, tmp_path):
    _, folder = peft_only(tokenizer, tmp_path, "prefix")
    with pytest.raises(ExportError, match="prefixes for 2 layers, this model has 3: is it for another base model"):
        load_tuned(make_tiny_model(tokenizer, layers=3), folder)
