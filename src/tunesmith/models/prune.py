"""Layer pruning: a smaller model cut from a larger one by keeping some of its decoder layers.

Logit fusion (`tunesmith.infer.fuse`) needs a small model that shares the large one's vocabulary.
Cutting decoder layers out of the large model gives one whose embeddings, head and kept layers are
the large model's own, so it starts close to the large model and a short distillation run from
it ("healing", e.g. `objective.name=distill`) recovers much of what the removed layers did.

    tunesmith prune --model smollm2-135m-instruct --keep 10 --output small/

Kept layers are evenly spaced and always include the first and the last: the first layers build
token features every later layer reads, and the last one shapes the residual stream for the head
(deep layers in the middle are the most redundant; Gromov et al., 2024, "The Unreasonable
Ineffectiveness of the Deeper Layers").
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .load import ModelError, load_model, write_model_folder


def kept_layers(total: int, keep: int) -> list[int]:
    """Indices of `keep` of `total` layers, evenly spaced, first and last included."""
    if not 1 <= keep <= total:
        raise ModelError(f"--keep must be between 1 and the model's {total} layers, got {keep}")
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a Llama-family causal LM (`model.model.layers`)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelError(f"{type(model).__name__}: pruning or growing layers needs a Llama-family model "
                         "(model.model.layers)")
    return layers


def arrange_layers(model, sources: list[int]):
    """Make the decoder `[layers[i] for i in sources]` (in place; returns `model`): shared by pruning
    (increasing indices, some left out) and growing (`models.grow`: indices repeated).

    An index that appears again gets a deep copy, so every layer of the new stack owns its weights
    (they train apart, and save without shared tensors). Each attention module gets its new
    position as `layer_idx` (the KV cache is indexed by it), and the config's `num_hidden_layers`
    (and per-layer lists such as `layer_types`) follow."""
    layers = decoder_layers(model)
    total = len(layers)
    if not sources or min(sources) < 0 or max(sources) >= total:
        raise ModelError(f"layer indices must lie in [0, {total}), got {sources}")
    config = model.config
    if getattr(config, "is_heterogeneous", False):
        raise ModelError(f"{type(model).__name__}: its config sets options per layer (per_layer_config); "
                         "rearranging its layers is not supported")
    seen: set[int] = set()
    arranged = []
    for i in sources:
        arranged.append(copy.deepcopy(layers[i]) if i in seen else layers[i])
        seen.add(i)
    model.model.layers = torch.nn.ModuleList(arranged)
    for new, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    for name, value in list(vars(config).items()):  # per-layer settings, e.g. layer_types
        if isinstance(value, list) and len(value) == total and name != "architectures":
            setattr(config, name, [value[i] for i in sources])
    config.num_hidden_layers = len(sources)
    return model


def prune_layers(model, keep: list[int]):
    """Keep only the decoder layers at indices `keep` (in place; returns `model`); see `arrange_layers`."""
    total = len(decoder_layers(model))
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= total:
        raise ModelError(f"layers to keep must be increasing indices in [0, {total}), got {keep}")
    return arrange_layers(model, list(keep))


def save_model_folder(model, tokenizer, out_dir, note_file: str, note: str) -> Path:
    """Write `model` and `tokenizer` as a transformers folder at `out_dir` atomically, with `note`
    (where it came from) in `<out>/<note_file>`; an existing model folder there is replaced, any
    other existing path is refused."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        write_model_folder(model, tokenizer, tmp)
        (tmp / note_file).write_text(note)
        if out.exists():
            if not (out / "config.json").is_file():
                raise ModelError(f"{out} exists and is not a model folder: choose another --output")
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def prune_model(name: str, keep: int, out_dir, dtype: str = "fp32") -> Path:
    """Load `name`, keep `keep` evenly spaced decoder layers, save an HF folder (atomically)."""
    model, tokenizer = load_model(name, dtype)
    indices = kept_layers(len(decoder_layers(model)), keep)
    prune_layers(model, indices)
    return save_model_folder(model, tokenizer, out_dir, "pruned_from.txt", f"{name}\nkept layers: {indices}\n")
