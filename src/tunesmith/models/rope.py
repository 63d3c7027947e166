"""RoPE scaling from the recipe's `model.rope.*` keys, written into the model's own config.

Long-context fine-tuning stretches the rotary positions the model was pretrained with (ProLong §4 raises
θ; LongLoRA trains with position interpolation). Whatever the recipe asks becomes transformers'
`config.rope_parameters` plus `max_position_embeddings`, and the loaded model's rotary module(s) are
rebuilt from that config, so training, a saved config.json, an adapter's metadata and every later
load compute the same positions:

- `linear`: position interpolation (Chen et al. 2023), every frequency divided by the factor;
- `ntk`: NTK-aware scaling as a static larger base, θ' = θ·factor^(d/(d−2)) with d the rotary
  dimension (transformers has only the dynamic form, so this one is a θ change);
- `dynamic`: dynamic NTK, recomputed by transformers at run time from the sequence length; it
  scales from `max_position_embeddings`, which therefore stays at the original length;
- `yarn`: YaRN (Peng et al. 2023): per-frequency blend of interpolation and extrapolation between
  beta_slow and beta_fast rotations, plus an attention temperature 0.1·ln(factor)+1.

A record of what a model runs with is `{"rope_parameters": {...}, "max_position_embeddings": N}`:
`apply_rope` returns it, `set_rope` writes it (and marks the model with it, `changed_rope`), an adapter
saved from a marked model keeps it, and loading that adapter sets it on the freshly loaded base.
"""
from __future__ import annotations

import math

import torch

from tunesmith.config import RopeConfig

from .load import ModelError

MARK = "tunesmith_rope"  # the record set_rope wrote, kept on the model object (not in its config)

def _text_config(config):
    """The config that holds the decoder's RoPE (a composite model's text config)."""
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def _current(config) -> dict:
    params = getattr(config, "rope_parameters", None)
    if not params:
        kind = getattr(config, "model_type", None) or type(config).__name__
        raise ModelError(f"model.rope: `{kind}` has no rotary position embeddings (no rope_parameters in its config)")
    if "rope_type" not in params and "rope_theta" not in params:
        raise ModelError("model.rope: the model's rope_parameters are per layer type; tunesmith scales one RoPE only")
    return dict(params)


def rotary_dim(config) -> int:
    """d in the RoPE formulas: the head dimension times any partial_rotary_factor."""
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head * (config.rope_parameters or {}).get("partial_rotary_factor", 1.0))


def _lengths(config, cfg: RopeConfig) -> tuple[int, float]:
    """(original length, factor) of a scaling, from factor and/or target_length."""
    original = cfg.original_length or getattr(config, "max_position_embeddings", None)
    if original is None:
        raise ModelError("model.rope.original_length: the model config has no max_position_embeddings; "
                         "give the context length it was pretrained at")
    if cfg.factor is None and cfg.target_length is None:
        raise ModelError(f"model.rope.scaling={cfg.scaling} needs model.rope.factor or model.rope.target_length")
    if cfg.target_length is not None and cfg.target_length < original:
        raise ModelError(f"model.rope.target_length {cfg.target_length} is below the original length {original}: "
                         "scaling stretches the context, it cannot shrink it")
    factor = cfg.factor if cfg.factor is not None else cfg.target_length / original
    both = cfg.factor is not None and cfg.target_length is not None
    if both and not math.isclose(factor * original, cfg.target_length):
        raise ModelError(f"model.rope.factor {cfg.factor} and model.rope.target_length {cfg.target_length} disagree "
                         f"({original} × {cfg.factor} = {original * cfg.factor:g}); give one of them")
    return int(original), float(factor)


def _check_keys(cfg: RopeConfig) -> None:
    if cfg.scaling == "none":
        for key in ("factor", "original_length"):
            if getattr(cfg, key) is not None:
                raise ModelError(f"model.rope.{key} needs model.rope.scaling (linear, ntk, dynamic or yarn)")
        if cfg.target_length is not None and cfg.theta is None:
            raise ModelError("model.rope.target_length without model.rope.scaling or model.rope.theta changes no "
                             "position: set a scaling, or a new θ as ProLong does")
    defaults = RopeConfig()
    if cfg.scaling != "yarn" and (cfg.beta_fast, cfg.beta_slow) != (defaults.beta_fast, defaults.beta_slow):
        raise ModelError(f"model.rope.beta_fast/beta_slow apply to scaling=yarn only (scaling is {cfg.scaling})")
    if cfg.scaling == "yarn" and cfg.beta_fast <= cfg.beta_slow:
        raise ModelError(f"model.rope.beta_fast ({cfg.beta_fast}) must exceed model.rope.beta_slow ({cfg.beta_slow})")


def rope_parameters(config, cfg: RopeConfig) -> dict | None:
    """What `config.rope_parameters` should hold for `cfg` (transformers' keys: rope_type, rope_theta,
    factor, original_max_position_embeddings, beta_fast, beta_slow); None when `cfg` asks for nothing.
    Raises ModelError naming the key for settings that make no sense on this model."""
    _check_keys(cfg)
    if cfg.scaling == "none" and cfg.theta is None:
        return None
    config = _text_config(config)
    params = _current(config)
    kind = params.get("rope_type", "default")
    if cfg.scaling != "none" and kind != "default":
        raise ModelError(f"model.rope.scaling={cfg.scaling}: the model already has `{kind}` RoPE scaling; "
                         "set model.rope.scaling=none to keep it (a new model.rope.theta may still be given)")
    theta = cfg.theta if cfg.theta is not None else params.get("rope_theta", getattr(config, "default_theta", 1e4))
    theta = float(theta)
    keep = {k: params[k] for k in ("partial_rotary_factor",) if k in params}
    if cfg.scaling == "none":
        return {**params, "rope_theta": theta}
    original, factor = _lengths(config, cfg)
    if cfg.scaling == "ntk":
        d = rotary_dim(config)
        return {"rope_type": "default", "rope_theta": theta * factor ** (d / (d - 2)), **keep}
    out = {"rope_type": cfg.scaling, "rope_theta": theta, "factor": factor, **keep}
    if cfg.scaling == "yarn":
        out.update(original_max_position_embeddings=original, beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow)
    return out


def _context(config, cfg: RopeConfig) -> int:
    """max_position_embeddings after scaling: the target length (dynamic NTK: the original length,
    which transformers scales from)."""
    if cfg.scaling == "none":
        return cfg.target_length or config.max_position_embeddings
    original, factor = _lengths(config, cfg)
    if cfg.scaling == "dynamic":
        return original
    return cfg.target_length or round(original * factor)


def rope_record(model) -> dict | None:
    """{"rope_parameters", "max_position_embeddings"} the model runs with; None for a model without RoPE."""
    if getattr(model, "config", None) is None:
        return None
    config = _text_config(model.config)
    params = getattr(config, "rope_parameters", None)
    if not params:
        return None
    return {"rope_parameters": dict(params),
            "max_position_embeddings": getattr(config, "max_position_embeddings", None)}


def changed_rope(model) -> dict | None:
    """The record tunesmith set on this model (apply_rope, set_rope, loading an adapter that has one);
    None for a model on the positions it was loaded with."""
    return getattr(model, MARK, None)


def apply_rope(model, cfg: RopeConfig) -> dict | None:
    """Scale the model's RoPE as `cfg` asks (config and rotary modules); return the record written, or
    None when `cfg` asks for nothing (the model is left alone)."""
    params = rope_parameters(model.config, cfg)
    if params is None:
        return None
    record = {"rope_parameters": params, "max_position_embeddings": _context(_text_config(model.config), cfg)}
    set_rope(model, record)
    return record


def set_rope(model, record: dict) -> None:
    """Write a rope record into the model's config and rebuild its rotary embedding module(s) from it
    (no-op when the model already runs with it). Raises ModelError for a model without RoPE."""
    modules = [(n, m) for n, m in model.named_modules() if hasattr(m, "inv_freq") and hasattr(m, "config")]
    if not modules:
        kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        raise ModelError(f"model.rope: `{kind}` has no rotary embedding module built from its config")
    setattr(model, MARK, record)
    if rope_record(model) == record:
        return
    configs = {id(c): c for c in [_text_config(model.config)] + [m.config for _, m in modules]}
    for config in configs.values():
        config.rope_parameters = dict(record["rope_parameters"])
        if record.get("max_position_embeddings") is not None:
            config.max_position_embeddings = record["max_position_embeddings"]
    for name, old in modules:
        _rebuild(model, name, old)


def _rebuild(model, name: str, old) -> None:
    """Replace a rotary module by a new one of its class built from its (updated) config, on the old
    buffer's device and dtype."""
    buffer = old.inv_freq
    try:
        with torch.device(buffer.device):
            new = type(old)(old.config)
    except (TypeError, KeyError, ValueError) as e:
        raise ModelError(f"model.rope: cannot rebuild `{name}` ({type(old).__name__}) from the new config: "
                         f"{e}") from None
    new.to(dtype=buffer.dtype)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def describe_rope(record: dict | None) -> str:
    """One line for the run log, e.g. `yarn ×4 (θ 10000, 2048 → 8192 tokens)`."""
    if not record:
        return "no RoPE"
    p = record["rope_parameters"]
    kind, theta = p.get("rope_type", "default"), p.get("rope_theta")
    context = record.get("max_position_embeddings")
    if kind == "default":
        return f"plain RoPE (θ {theta:g}, {context} tokens)"
    original = p.get("original_max_position_embeddings")
    span = f"{original} → {context}" if original else f"{context}"
    return f"{kind} ×{p.get('factor', 0):g} (θ {theta:g}, {span} tokens)"
