"""A tunesmith embedder as a sentence-transformers folder: `SentenceTransformer(path)` loads it and
gives the vectors `embed_texts` gives (cosine >= 0.9999), so it drops into any RAG stack.

    model, tokenizer, spec = load_embedder(adapter="runs/emb")   # tunesmith.infer.embed
    export_sentence_transformers(model, tokenizer, spec, "st-model/")

The folder is the classic sentence-transformers layout, written by hand (sentence-transformers is
not needed to export):
- the transformer body (LoRA already merged by `load_embedder`) and its tokenizer at the root,
  saved to pad on the right with a pad token, as tunesmith tokenizes;
- `1_Pooling/config.json`: tunesmith's pooling under its sentence-transformers name. Both define
  weighted-mean as weights 1..L over the real tokens (right padding) and last-token as the last
  real token, so they agree exactly;
- one `Dense` per Linear of the projector, each carrying the activation that follows it
  (Linear-ReLU-Linear = Dense(ReLU) + Dense(Identity)); sentence-transformers' Dense is
  `activation(linear(x))`, which is exactly that split;
- `Normalize` if the spec normalises; `config_sentence_transformers.json` with the spec's query and
  document prefixes as the `query` / `document` prompts (prepended to the text, as tunesmith does).

**Bidirectional decoders.** sentence-transformers runs a decoder as its config says: causally.
transformers >= 5.2 reads `is_causal: false` in a decoder's config and then builds a padding-only
(bidirectional) mask, the mask tunesmith's switch builds, so the exported body carries that flag
and `requirements` asks for transformers >= 5.2 (an older one would silently attend causally;
sentence-transformers refuses to load instead). The folder holds the body only (no LM head): with
the flag set, the weights no longer generate text, so they are not offered as a causal LM.
A sliding-window decoder (Mistral-style) keeps its window in transformers' bidirectional mask, so
an export whose max_length exceeds the window is refused.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from tunesmith.models.embedding import EmbeddingSpec, body, is_decoder

from .atomic import ExportError, atomic_folder

# tunesmith pooling -> the sentence-transformers Pooling flag (the classic config keys, read by
# every sentence-transformers release since 2.x and converted by 6.x)
_ST_POOLING = {"mean": "pooling_mode_mean_tokens", "last": "pooling_mode_lasttoken",
               "weighted_mean": "pooling_mode_weightedmean_tokens", "cls": "pooling_mode_cls_token"}
_ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.GELU, nn.Sigmoid, nn.SiLU, nn.Identity)
ST_MARKER = "modules.json"


def projector_layers(projector) -> list[tuple[nn.Linear, nn.Module]]:
    """A projector (a Linear, or a Sequential of Linears and activations) as (linear, activation)
    pairs, one sentence-transformers Dense each."""
    if projector is None:
        return []
    parts = list(projector) if isinstance(projector, nn.Sequential) else [projector]
    pairs: list[tuple[nn.Linear, nn.Module]] = []
    for part in parts:
        if isinstance(part, nn.Linear):
            pairs.append((part, nn.Identity()))
        elif isinstance(part, _ACTIVATIONS) and pairs and isinstance(pairs[-1][1], nn.Identity):
            pairs[-1] = (pairs[-1][0], part)
        else:
            raise ExportError(f"the projector's `{type(part).__name__}` has no sentence-transformers Dense form "
                              "(supported: Linear, each optionally followed by one of "
                              f"{', '.join(a.__name__ for a in _ACTIVATIONS)})")
    return pairs


def _check_plain(net) -> None:
    """Refuse a body that still carries unmerged adapter weights: the folder would drop them."""
    with torch.device("meta"):
        fresh = type(net)(net.config)
    extra = sorted(set(net.state_dict()) - set(fresh.state_dict()))
    if extra:
        raise ExportError(f"the model carries weights a plain {type(net).__name__} has not (e.g. `{extra[0]}`): an "
                          "adapter that cannot be merged has no sentence-transformers form")


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _save_body(net, tokenizer, spec: EmbeddingSpec, folder: Path) -> bool:
    """The transformer and tokenizer at the folder's root; True if the body was made bidirectional."""
    bidirectional = spec.bidirectional and is_decoder(net)
    config = net.config
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if bidirectional and window and spec.max_length > window:
        # transformers' bidirectional mask keeps the sliding window; tunesmith's padding-only mask does not
        raise ExportError(f"max_length {spec.max_length} exceeds the model's sliding window ({window}): "
                          "sentence-transformers would attend within the window, tunesmith across the whole text")
    if bidirectional:
        net.config = copy.deepcopy(config)
        net.config.is_causal = False  # transformers >= 5.2: a padding-only mask instead of the causal one
    try:
        net.save_pretrained(folder)
    finally:
        net.config = config
    tok = copy.deepcopy(tokenizer)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"  # positions 0..L-1 on real tokens, as tunesmith encodes
    tok.save_pretrained(folder)
    return bidirectional


def _save_dense(pairs, folder: Path, first_index: int) -> list[dict]:
    from safetensors.torch import save_file

    entries = []
    for i, (linear, activation) in enumerate(pairs, start=first_index):
        name = f"{i}_Dense"
        _write_json(folder / name / "config.json", {
            "in_features": linear.in_features, "out_features": linear.out_features,
            "bias": linear.bias is not None,
            "activation_function": f"{type(activation).__module__}.{type(activation).__name__}"})
        tensors = {"linear.weight": linear.weight.detach().float().contiguous().cpu()}
        if linear.bias is not None:
            tensors["linear.bias"] = linear.bias.detach().float().contiguous().cpu()
        save_file(tensors, str(folder / name / "model.safetensors"))
        entries.append({"path": name, "type": "sentence_transformers.models.Dense"})
    return entries


def _st_config(spec: EmbeddingSpec, bidirectional: bool) -> dict:
    import transformers

    cfg = {"__version__": {"transformers": transformers.__version__, "pytorch": torch.__version__},
           "prompts": {"query": spec.query_prefix, "document": spec.document_prefix},
           "default_prompt_name": None, "similarity_fn_name": "cosine", "model_type": "SentenceTransformer"}
    if bidirectional:
        cfg["requirements"] = {"transformers": {
            "specifier": ">=5.2", "reason": "the decoder attends bidirectionally through `is_causal: false` in "
                                            "config.json, which older transformers ignore (it would run causally)"}}
    return cfg


def export_sentence_transformers(model, tokenizer, spec: EmbeddingSpec, out_dir) -> Path:
    """Write `model` (an encoder or a causal LM, with `model.tunesmith_projector` if trained with one)
    as a sentence-transformers folder (atomically); return its path.

    Args:
        model, tokenizer, spec: an embedder as `load_embedder` returns it (adapters merged).
        out_dir: the folder to write; an existing sentence-transformers folder there is replaced.
    """
    from transformers.utils import logging as hf_logging

    net = body(model)
    _check_plain(net)
    pairs = projector_layers(getattr(model, "tunesmith_projector", None))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with atomic_folder(out_dir, marker=ST_MARKER) as tmp:
            bidirectional = _save_body(net, tokenizer, spec, tmp)
            _write_json(tmp / "sentence_bert_config.json", {"max_seq_length": spec.max_length, "do_lower_case": False})
            pooling = {"word_embedding_dimension": net.config.hidden_size}
            pooling.update({flag: mode == spec.pooling for mode, flag in _ST_POOLING.items()})
            _write_json(tmp / "1_Pooling" / "config.json", pooling)
            entries = [{"path": "", "type": "sentence_transformers.models.Transformer"},
                       {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
            entries += _save_dense(pairs, tmp, first_index=2)
            if spec.normalize:
                name = f"{len(entries)}_Normalize"
                (tmp / name).mkdir()
                entries.append({"path": name, "type": "sentence_transformers.models.Normalize"})
            _write_json(tmp / ST_MARKER, [{"idx": i, "name": str(i), **e} for i, e in enumerate(entries)])
            _write_json(tmp / "config_sentence_transformers.json", _st_config(spec, bidirectional))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return Path(out_dir)
