"""Any method's adapter as one folder: what it is, and the tensors that make it.

    <run>/adapter/
      tunesmith_method.json   {"method": "sparse", "options": {...}, "base_model_name_or_path": ...}
      delta.safetensors       the method's delta, under the model's own parameter names
      adapter_config.json     } where PEFT has the method (LoRA, rsLoRA, DoRA, IA3, prefix):
      adapter_model.safetensors }  the same adapter in PEFT's layout

Loading rebuilds the method from its recorded options, applies it to the base model and copies
the delta in; every key must match, so an adapter never half-loads. The metadata's `rope` (the
rope_parameters and max_position_embeddings of a run that changed them, model.rope.*) is written onto
the base, so every loader computes the positions the adapter was trained with. A folder holding only PEFT
files (an adapter trained elsewhere) loads through PEFT's reader for its method (`peft_format.FORMATS`):
the same attach-and-copy, from the delta that reader produces.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunesmith.methods import attach, build_method, delta_state
from tunesmith.config import RecipeError
from tunesmith.methods.options import MethodConfig, method_from_dict
from tunesmith.models.load import ModelError
from tunesmith.models.quant import quantization
from tunesmith.models.rope import changed_rope, set_rope

from .atomic import ExportError, atomic_folder
from .peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_folder, peft_payload, read_peft, write_peft

METHOD_FILE = "tunesmith_method.json"
DELTA_FILE = "delta.safetensors"


def unique_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tied weights appear once, under their first name."""
    seen, unique = set(), {}
    for n, t in tensors.items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            unique[n] = t
    return unique


def save_tuned(model: nn.Module, method, base_model: str, out_dir) -> Path:
    """Write the method's adapter folder (atomically): our format, plus PEFT's where PEFT has the method."""
    tensors, options = method.export_delta(model)
    if not tensors:
        raise ExportError(f"method `{method.name}` has no delta to save")
    meta = {"format": 1, "method": method.name, "base_model_name_or_path": str(base_model),
            "options": options.model_dump() if hasattr(options, "model_dump") else options}
    rope = changed_rope(model)
    if rope is not None:  # the positions it trained with (model.rope.*), restored by load_tuned
        meta["rope"] = rope
    quantized = quantization(model)
    if quantized:  # the base format it trained over: the merged export dequantises it
        meta["quantize"] = quantized
    peft = peft_payload(model, method, base_model)
    with atomic_folder(out_dir, marker=METHOD_FILE if not (Path(out_dir) / ADAPTER_CONFIG).is_file() else ADAPTER_CONFIG) as tmp:
        (tmp / METHOD_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in unique_tensors(tensors).items()},
                  str(tmp / DELTA_FILE), metadata={"format": "pt"})
        if peft is not None:
            write_peft(tmp, *peft)
    return Path(out_dir)


def read_method(path) -> tuple[MethodConfig, dict]:
    """(the MethodConfig, the metadata) an adapter folder was saved with; for a PEFT-only folder, the
    method PEFT's config names and that config."""
    folder = adapter_folder(path)
    meta_path = folder / METHOD_FILE
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            cfg = method_from_dict(meta["method"], meta.get("options") or {}, where=str(meta_path))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ExportError(f"{meta_path}: not a valid method description ({e})") from None
        except RecipeError as e:
            raise ExportError(str(e)) from None
        return cfg, meta
    name, options, meta, _ = read_peft(folder)
    return _config(name, options, folder / ADAPTER_CONFIG), meta


def _config(name: str, options, where) -> MethodConfig:
    try:
        return method_from_dict(name, options.model_dump(), where=str(where))
    except RecipeError as e:
        raise ExportError(str(e)) from None


def load_tuned(model: nn.Module, path):
    """Apply the adapter at `path` (ours, or a PEFT folder of LoRA, IA3 or prefix tuning) to `model`;
    return (method, MethodConfig)."""
    folder = adapter_folder(path)
    rope = None
    if (folder / METHOD_FILE).is_file():
        cfg, meta = read_method(folder)
        rope = meta.get("rope")
        weights = folder / DELTA_FILE
        if not weights.is_file():
            raise ExportError(f"{folder} has no {DELTA_FILE}")
        try:
            tensors = load_file(str(weights))
        except Exception as e:  # safetensors raises its own error types for a corrupt file
            raise ExportError(f"{weights}: cannot read ({e})") from None
    else:
        name, options, _, tensors = read_peft(folder, model)
        weights = folder / ADAPTER_WEIGHTS
        cfg = _config(name, options, folder / ADAPTER_CONFIG)
    method = build_method(cfg)
    try:
        with torch.random.fork_rng(devices=[]):  # initial values are overwritten at once
            attach(model, method)
    except ValueError as e:
        raise ExportError(f"{folder}: {e}") from None
    load_delta(model, tensors, where=str(weights), method=method)
    if rope is not None:
        try:
            set_rope(model, rope)
        except (ModelError, KeyError, TypeError) as e:
            raise ExportError(f"{folder / METHOD_FILE}: its `rope` cannot be applied to this model ({e})") from None
    return method, cfg


def load_delta(model: nn.Module, tensors: dict[str, torch.Tensor], where: str, method) -> None:
    """Copy a saved delta into the model's tensors (those of `method`, attached to it); every key must
    match both ways and every shape."""
    expected = unique_tensors(delta_state(model, method))
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unknown or missing:
        raise ExportError(f"{where} does not match its method on this model (unexpected: {unknown[:3]}, "
                          f"missing: {missing[:3]}): is it for another base model?")
    with torch.no_grad():
        for name, t in tensors.items():
            target = expected[name]
            if tuple(target.shape) != tuple(t.shape):
                raise ExportError(f"{where}: `{name}` has shape {tuple(t.shape)}, the model expects "
                                  f"{tuple(target.shape)}: is it for another base model?")
            target.copy_(t)
