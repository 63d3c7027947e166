"""LoRA adapters as HF PEFT folders: `adapter_config.json` plus `adapter_model.safetensors`.

PEFT stores a LoRA layer's A (r, in) as `base_model.model.<module path>.lora_A.weight` and B (out, r)
as `...lora_B.weight`; ours are `<module path>.lora_a` and `.lora_b`, the same matrices. Both scale
the update by lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA. DoRA's magnitude (out,) is
`...lora_magnitude_vector` (ours `.lora_magnitude`) with `use_dora: true`. So saving is a rename,
and so is loading, for the plain/rsLoRA/DoRA subset of PEFT's options; anything outside it is refused
by name. A PiSSA adapter is saved converted to plain LoRA of rank 2r on the original weights (PEFT's
`path_initial_model_for_weight_conversion` layout); PEFT folders still holding PiSSA's mutated
initialisation are refused. Only safetensors are read: a pickled `adapter_model.bin` can run code.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunesmith.methods.base import MethodError
from tunesmith.methods.lora import LoRA, lora_modules, saved_config
from tunesmith.recipe import LoraConfig

from .atomic import ExportError, atomic_folder

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")
_OURS = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b", "lora_magnitude_vector": "lora_magnitude"}

# adapter_config.json keys whose values do not change what the saved tensors mean, or that we read
# (use_dora). Every other key must be empty/false: rank/alpha patterns, modules_to_save, lora_bias,
# ... all change the forward pass or add tensors we would silently drop.
_DESCRIPTIVE = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "r", "lora_alpha", "lora_dropout",
    "use_rslora", "use_dora", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "inference_mode", "auto_mapping", "peft_version", "init_lora_weights", "bias", "fan_in_fan_out",
    "megatron_core", "qalora_group_size", "runtime_config", "ensure_weight_tying",
    "eva_config", "corda_config", "loftq_config", "lora_ga_config",  # settings of an initialisation
}
# Initialisations that only pick the starting A and B; pissa/olora/corda/loftq/... also rewrite
# the base weights, so their adapters are meaningless on the original base.
_PLAIN_INITS = {"gaussian", "eva", "orthogonal"}


def lora_payload(model: nn.Module, lora_cfg, base_model: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors in PEFT's names) for the model's LoRA layers; a PiSSA model's as
    the equivalent plain LoRA of rank 2r on the original base weights."""
    mods = lora_modules(model)
    if not mods:
        raise ExportError("the model has no LoRA layers to save")
    want = (lora_cfg.rank, float(lora_cfg.alpha), bool(lora_cfg.rslora), bool(lora_cfg.dora), lora_cfg.init)
    for name, m in mods.items():
        if (m.rank, float(m.alpha), bool(m.rslora), bool(m.dora), m.init) != want:
            raise ExportError(
                f"{name} has rank={m.rank}, alpha={m.alpha}, rslora={m.rslora}, dora={m.dora}, init={m.init} but the "
                f"config says rank={lora_cfg.rank}, alpha={lora_cfg.alpha}, rslora={lora_cfg.rslora}, "
                f"dora={lora_cfg.dora}, init={lora_cfg.init}"
            )
    saved = saved_config(lora_cfg)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in mods})
    # PEFT wraps every module whose name ends in a listed leaf; name the ones we left alone
    # (e.g. a subset of layers) so PEFT wraps exactly our set.
    skipped = sorted(n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in leaves and n not in mods)
    alpha = int(saved.alpha) if float(saved.alpha).is_integer() else float(saved.alpha)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model),
        "revision": None,
        "r": saved.rank,
        "lora_alpha": alpha,
        "lora_dropout": float(saved.dropout),
        "use_rslora": bool(saved.rslora),
        "target_modules": leaves,
        "exclude_modules": skipped or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": bool(saved.dora),
        "lora_bias": False,
    }
    tensors = {}
    for name, m in mods.items():
        a, b = m.plain_factors()
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().to("cpu", torch.float32).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().to("cpu", torch.float32).contiguous()
        if m.dora:
            tensors[f"base_model.model.{name}.lora_magnitude_vector"] = \
                m.lora_magnitude.detach().to("cpu", torch.float32).contiguous()
    return config, tensors


def write_peft(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write adapter_config.json + adapter_model.safetensors into `folder`."""
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(folder / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})


def save_adapter(model: nn.Module, lora_cfg, base_model: str, out_dir) -> Path:
    """Write the model's LoRA layers as a PEFT adapter folder (atomically); return its path.

    Args:
        model: a model with our LoRA applied.
        lora_cfg: the `LoraConfig` it was applied with (rank, alpha, rslora, dora and init must match the
            layers). A PiSSA model is saved as the equivalent plain LoRA of rank 2r on the original base.
        base_model: recorded as `base_model_name_or_path`.
        out_dir: the folder to write; an existing adapter folder there is replaced.
    """
    config, tensors = lora_payload(model, lora_cfg, base_model)
    with atomic_folder(out_dir, marker=ADAPTER_CONFIG) as tmp:
        write_peft(tmp, config, tensors)
    return Path(out_dir)


def adapter_folder(path) -> Path:
    """The adapter folder `path` names: itself, or `<path>/adapter` for a tunesmith run folder."""
    p = Path(path).expanduser()
    markers = (ADAPTER_CONFIG, "tunesmith_method.json")
    if not any((p / m).is_file() for m in markers) and any((p / "adapter" / m).is_file() for m in markers):
        return p / "adapter"
    return p


def read_adapter(path) -> tuple[LoraConfig, dict[str, dict[str, torch.Tensor]]]:
    """Read and check an adapter folder: (our LoraConfig, {module path: {"lora_a": A, "lora_b": B}}),
    plus "lora_magnitude" per module for a DoRA adapter.

    The module set comes from the tensors, not from `target_modules` (which may be a regex, or
    be narrowed by layers_to_transform): the weights are what PEFT would load.
    """
    folder = adapter_folder(path)
    if not folder.is_dir():
        raise ExportError(f"adapter folder not found: {folder}")
    cfg_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise ExportError(f"{folder} has no {ADAPTER_CONFIG}: not a PEFT adapter folder")
    if not weights_path.is_file():
        hint = " (only safetensors are read: a pickled .bin can run code; re-save it with safetensors)" \
            if (folder / "adapter_model.bin").is_file() else ""
        raise ExportError(f"{folder} has no {ADAPTER_WEIGHTS}{hint}")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ExportError(f"{cfg_path}: expected a JSON object")
    cfg = _lora_config(raw, cfg_path)

    try:
        state = load_file(str(weights_path))
    except Exception as e:  # safetensors raises its own error types for a corrupt file
        raise ExportError(f"{weights_path}: cannot read ({e})") from None
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise ExportError(f"{weights_path}: unsupported tensor `{key}` (only Linear layers' LoRA A and B"
                              f"{', and DoRA magnitudes' if cfg.dora else ''})")
        layers.setdefault(m.group(1), {})[_OURS[m.group(2)]] = t
    if not layers:
        raise ExportError(f"{weights_path}: holds no LoRA tensors")
    for name, parts in sorted(layers.items()):
        if not {"lora_a", "lora_b"} <= set(parts):
            held = ", ".join(k for k in ("lora_A", "lora_B") if k.lower() in parts) or "no A or B"
            raise ExportError(f"{weights_path}: `{name}` has {held} but not both lora_A and lora_B")
        if ("lora_magnitude" in parts) != cfg.dora:
            raise ExportError(f"{weights_path}: `{name}` " + (
                "has no lora_magnitude_vector but the config says use_dora=true" if cfg.dora else
                "has a lora_magnitude_vector (DoRA) but the config says use_dora=false"))
        a, b = parts["lora_a"], parts["lora_b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != cfg.rank or b.shape[1] != cfg.rank:
            raise ExportError(
                f"{weights_path}: `{name}` has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                f"expected (r, in) and (out, r) with r={cfg.rank}"
            )
        if cfg.dora and tuple(parts["lora_magnitude"].shape) != (b.shape[0],):
            raise ExportError(f"{weights_path}: `{name}` has a magnitude of shape "
                              f"{tuple(parts['lora_magnitude'].shape)}; expected ({b.shape[0]},), one per output")
    cfg.targets = list(layers)
    return cfg, dict(sorted(layers.items()))


def _lora_config(raw: dict, where: Path) -> LoraConfig:
    if raw.get("peft_type") != "LORA":
        raise ExportError(f"{where}: peft_type is {raw.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("r", "lora_alpha"):
        if not isinstance(raw.get(key), (int, float)) or isinstance(raw.get(key), bool) or raw[key] <= 0:
            raise ExportError(f"{where}: `{key}` must be a positive number, got {raw.get(key)!r}")
    if not float(raw["r"]).is_integer():
        raise ExportError(f"{where}: `r` must be an integer, got {raw['r']!r}")
    if raw.get("bias", "none") != "none":
        raise ExportError(f"{where}: bias={raw['bias']!r} is not supported (only \"none\")")
    if raw.get("fan_in_fan_out"):
        raise ExportError(f"{where}: fan_in_fan_out=true (Conv1D-style weights) is not supported")
    init = raw.get("init_lora_weights", True)
    if not (isinstance(init, bool) or (isinstance(init, str) and init in _PLAIN_INITS)):
        raise ExportError(
            f"{where}: init_lora_weights={init!r} also changes the base weights; convert the adapter to plain "
            "LoRA first (PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    for key, value in raw.items():
        if key not in _DESCRIPTIVE and value not in (None, False, 0, "", [], {}):
            raise ExportError(f"{where}: `{key}`={value!r} is not supported (plain, rsLoRA or DoRA adapters only)")
    dropout = float(raw.get("lora_dropout") or 0.0)
    return LoraConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=dropout if 0 <= dropout < 1 else 0.0,
                      targets=[], rslora=bool(raw.get("use_rslora", False)), dora=bool(raw.get("use_dora", False)))


def load_adapter(model: nn.Module, adapter_dir) -> nn.Module:
    """Apply our LoRA to `model` as the adapter folder describes and load its weights; return `model`.

    `adapter_dir` is a PEFT adapter folder (ours or PEFT's) or a tunesmith run folder holding one
    in `adapter/`. Raises ExportError for a bad folder, an unsupported option, or modules the
    model lacks.
    """
    cfg, layers = read_adapter(adapter_dir)
    if lora_modules(model):
        raise ExportError("the model already has LoRA layers; load the adapter onto a fresh base model")
    missing = []
    for name, parts in layers.items():
        a, b = parts["lora_a"], parts["lora_b"]
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            missing.append(name)
            continue
        if not isinstance(mod, nn.Linear):
            raise ExportError(f"{adapter_dir}: `{name}` is a {type(mod).__name__} in this model, not a Linear layer")
        if (a.shape[1], b.shape[0]) != (mod.in_features, mod.out_features):
            raise ExportError(
                f"{adapter_dir}: `{name}` is {mod.in_features}->{mod.out_features} in this model but the adapter "
                f"is for {a.shape[1]}->{b.shape[0]}: is it for another base model?"
            )
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ExportError(f"{adapter_dir}: the adapter names modules this model lacks: {shown}")

    method = LoRA(cfg)
    try:
        with torch.random.fork_rng(devices=[]):  # LoRALinear draws a random A we overwrite at once
            method.apply(model)
    except MethodError as e:
        raise ExportError(f"{adapter_dir}: {e}") from None
    wrapped = lora_modules(model)
    if set(wrapped) != set(layers):
        odd = sorted(set(layers) ^ set(wrapped))
        raise ExportError(f"{adapter_dir}: could not wrap exactly the adapter's modules (differing: {odd[:5]})")
    with torch.no_grad():
        for name, parts in layers.items():
            for attr, t in parts.items():
                getattr(wrapped[name], attr).copy_(t.to(torch.float32))
    return model
