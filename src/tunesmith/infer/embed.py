"""Load a trained embedder and embed files of texts.

    model, tokenizer, spec = load_embedder("runs/emb")          # a run, an adapter or a model folder
    vectors = embed_texts(model, tokenizer, texts, spec)

An embedder is a model plus the `EmbeddingSpec` it was trained with (`tunesmith_embedding.json`,
saved beside the weights). Without one, the model's own sentence-transformers pooling is used if
the folder has it, else mean pooling, unidirectional, normalised.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..models.embedding import SPEC_FILE, EmbeddingSpec, load_any, model_folder
from ..models.load import DEFAULT_MODEL, ModelError


def _spec_near(*folders) -> EmbeddingSpec | None:
    for folder in folders:
        if folder is not None and (Path(folder) / SPEC_FILE).is_file():
            return EmbeddingSpec.load(folder)
    return None


def st_pooling(folder) -> EmbeddingSpec | None:
    """The spec a sentence-transformers folder describes (its 1_Pooling and Normalize modules)."""
    folder = Path(folder)
    modules = folder / "modules.json"
    if not modules.is_file():
        return None
    try:
        entries = json.loads(modules.read_text())
        spec = EmbeddingSpec(normalize=any(e.get("type", "").endswith("Normalize") for e in entries))
        for e in entries:
            if e.get("type", "").endswith("Pooling"):
                cfg = json.loads((folder / e["path"] / "config.json").read_text())
                spec.pooling = ("cls" if cfg.get("pooling_mode_cls_token") else
                                "last" if cfg.get("pooling_mode_lasttoken") else
                                "weighted_mean" if cfg.get("pooling_mode_weightedmean_tokens") else "mean")
        st_cfg = folder / "sentence_bert_config.json"
        if st_cfg.is_file():
            spec.max_length = int(json.loads(st_cfg.read_text()).get("max_seq_length") or spec.max_length)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{modules}: not a readable sentence-transformers description ({e})") from None
    return spec


def load_embedder(model: str | None = None, adapter: str | None = None, dtype: str = "fp32"):
    """(model, tokenizer, spec) ready to embed. `model` is a model name or folder, or a run folder
    (its `model/` or `adapter/` is used); `adapter` a tunesmith or PEFT adapter folder (or run
    folder) applied to `model` (default: the base the adapter names)."""
    from ..export.tuned import adapter_folder, load_tuned
    from .generate import base_model_for

    if model is not None and adapter is None and (Path(model) / "adapter").is_dir() \
            and not (Path(model) / "model" / "config.json").is_file():
        adapter, model = model, None
    if model is None:
        model = base_model_for(adapter) if adapter is not None else DEFAULT_MODEL
    if (Path(model) / "model" / "config.json").is_file():
        run = Path(model)
        model = str(run / "model")
    else:
        run = None
    m, tokenizer = load_any(model, dtype)
    folder = model_folder(model)
    spec = None
    if adapter is not None:
        afolder = adapter_folder(adapter)
        method, _ = load_tuned(m, adapter)
        if method.mergeable:
            method.merge(m)
        spec = _spec_near(afolder, afolder.parent)
    spec = spec or _spec_near(folder, run) or st_pooling(folder) or EmbeddingSpec()
    m.eval()
    m.requires_grad_(False)
    return m, tokenizer, spec
