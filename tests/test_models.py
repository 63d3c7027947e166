"""Model loading: local folders, the local HF cache (offline), and clear errors."""
import pytest
import torch

from tunesmith.models.load import ModelError, load_model, resolve


def test_hub_id_from_local_cache(tmp_path, tiny_model_dir, monkeypatch):
    snap = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(tiny_model_dir, snap)
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve("acme/tiny") == snap
    model, tok = load_model("acme/tiny")
    ref, _ = load_model(str(tiny_model_dir))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    with pytest.raises(ModelError, match="nor in the local HF cache"):
        resolve("acme/absent")


def test_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="model not found"):
        resolve(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="model file not found"):
        resolve(str(tmp_path / "x.gguf"))
    bad = tmp_path / "weird"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "not-a-real-architecture"}')
    with pytest.raises(ModelError, match="unsupported|architecture"):
        load_model(str(bad))


def test_bf16_dtype(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
