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

from ..models.embedding import DOMAINS_FILE, SPEC_FILE, EmbeddingSpec, load_any, load_projector, model_folder
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
    spec, afolder = None, None
    if adapter is not None:
        afolder = adapter_folder(adapter)
        method, _ = load_tuned(m, adapter)
        if method.mergeable:
            method.merge(m)
        spec = _spec_near(afolder, afolder.parent)
    spec = spec or _spec_near(folder, run) or st_pooling(folder) or EmbeddingSpec()
    places = [p for p in ([afolder] if adapter is not None else []) + [folder, run] if p is not None]
    for place in places:  # a trained projector, if any
        if load_projector(m, place):
            break
    m.tunesmith_domains = _domains_near(places)
    m.eval()
    m.requires_grad_(False)
    return m, tokenizer, spec


def _domains_near(places) -> list[str]:
    """The domain names a domain-routed (MoE) embedder was trained with; [] without any."""
    for place in places:
        path = Path(place) / DOMAINS_FILE
        if path.is_file():
            try:
                names = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ModelError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
            if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                raise ModelError(f"{path}: expected a JSON list of domain names")
            return names
    return []


def domain_index(model, name: str) -> int:
    """The expert number of domain `name` for an embedder load_embedder loaded."""
    names = getattr(model, "tunesmith_domains", None) or []
    if not names:
        raise ModelError(f"--domain {name}: this embedder was not trained with domains (no {DOMAINS_FILE} beside it)")
    if name not in names:
        raise ModelError(f"--domain {name}: unknown domain; this embedder knows {', '.join(names)}")
    return names.index(name)


def read_texts(path) -> list[str]:
    """The texts of a file: JSONL with {"text": ...} per line, or plain text (.txt) one per line.
    Blank lines are skipped; a bad line raises InferError naming `file:line`."""
    from ..jsonl import read_jsonl
    from .generate import InferError

    path = Path(path)
    if not path.is_file():
        raise InferError(f"input file not found: {path}")
    if path.suffix == ".txt":
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise InferError(f"{path}: not valid UTF-8 ({e.reason}); save the file as UTF-8") from None
        return [line for line in lines if line.strip()]
    texts = []
    for where, rec in read_jsonl(path, InferError):
        if not isinstance(rec, dict) or "text" not in rec:
            raise InferError(f"{where}: expected a JSON object with `text` (a string)")
        if not isinstance(rec["text"], str):
            raise InferError(f"{where}: `text` must be a string, got {type(rec['text']).__name__}")
        texts.append(rec["text"])
    return texts


def embed_file(model, tokenizer, spec: EmbeddingSpec, in_path, out_path, *, kind: str = "document",
               batch_size: int = 32, domain: str | None = None) -> Path:
    """Embed every text of `in_path` (see `read_texts`) into a float32 (n, d) .npy at `out_path`,
    row i for the file's i-th text. The whole file is read (and checked) before any encoding; the
    .npy appears all at once (written aside, then renamed). `domain`: a domain-routed (MoE) embedder
    runs every text through that domain's expert (without it, expert 0)."""
    import contextlib
    import os

    import numpy as np

    from ..models.embedding import embed_texts
    from .generate import InferError

    texts = read_texts(in_path)
    if not texts:
        raise InferError(f"{in_path}: no texts")
    route = contextlib.nullcontext()
    if domain is not None:
        from ..models.moe import routing

        route = routing(model, domain_index(model, domain))
    with route:
        vectors = embed_texts(model, tokenizer, texts, spec, batch_size=batch_size, kind=kind, progress=True)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, vectors.numpy().astype(np.float32))
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path
