"""HF PEFT's adapter layout, `adapter_config.json` plus `adapter_model.safetensors`, for the methods
PEFT has. FORMATS maps a method's name to its writer and its reader; the methods themselves know
nothing of this layout: a writer reads what it needs from the method's options and the model.

- LoRA: PEFT stores A (r, in) as `base_model.model.<module>.lora_A.weight` and B (out, r) as
  `...lora_B.weight`; ours are `<module>.lora_a` and `.lora_b`, the same matrices. Both scale the
  update by lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA. DoRA's magnitude (out,) is
  `...lora_magnitude_vector` (ours `.lora_magnitude`) with `use_dora: true`. Saving and loading
  are renames, for the plain/rsLoRA/DoRA subset of PEFT's options; anything outside it is refused
  by name. A PiSSA adapter is saved converted to plain LoRA of rank 2r on the original weights
  (PEFT's `path_initial_model_for_weight_conversion` layout); PEFT folders still holding PiSSA's
  mutated initialisation are refused.
- IA3: `base_model.model.<module>.ia3_l`, shaped (out, 1), or (1, in) for a feed-forward module
  (ours: `<module>.ia3_l`, flat). Modules are listed by full name, which PEFT matches exactly.
- Prefix tuning (PREFIX_TUNING): `prompt_embeddings` (l, L·2·kv_dim), row j holding, layer by
  layer, [key; value] of prefix j (heads, then head_dim). It is written folded (no MLP). PEFT
  places real tokens at positions l..l+T−1, tunesmith at 0..T−1 (prefix keys carry no rotary
  embedding, so the logits agree when the positions agree).

Only safetensors are read: a pickled `adapter_model.bin` can run code.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunesmith.config import RecipeError
from tunesmith.methods import method_class
from tunesmith.methods.base import MethodError
from tunesmith.methods.ia3 import IA3Linear
from tunesmith.methods.lora import LoRA, lora_modules, saved_config
from tunesmith.methods.prefix import attention_modules

from .atomic import ExportError, atomic_folder

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ROOT = "base_model.model."
_LORA_KEY = re.compile(r"base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")
_OURS = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b", "lora_magnitude_vector": "lora_magnitude"}
_IA3_KEY = re.compile(r"base_model\.model\.(.+)\.ia3_l")

# adapter_config.json keys that describe an adapter without changing what its tensors mean (or that
# a reader reads itself); every other key must be empty/false: rank/alpha patterns, modules_to_save,
# lora_bias, ... change the forward pass or add tensors a reader would silently drop.
_COMMON = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
           "peft_version"}
_LORA_KEYS = _COMMON | {
    "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "init_lora_weights", "bias", "fan_in_fan_out", "megatron_core",
    "qalora_group_size", "runtime_config", "ensure_weight_tying",
    "eva_config", "corda_config", "loftq_config", "lora_ga_config",  # settings of an initialisation
}
_IA3_KEYS = _COMMON | {"target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out", "init_ia3_weights"}
_PREFIX_KEYS = _COMMON | {"num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers",
                          "num_transformer_submodules", "encoder_hidden_size", "prefix_projection", "init_weights"}
# Initialisations that only pick the starting A and B; pissa/olora/corda/loftq/... also rewrite
# the base weights, so their adapters are meaningless on the original base.
_PLAIN_INITS = {"gaussian", "eva", "orthogonal"}


class PeftFormat(NamedTuple):
    peft_type: str
    write: Callable  # (model, method, base_model) -> (adapter_config.json, tensors in PEFT's names)
    read: Callable  # (folder, config, model | None) -> (options, delta in our names; None without a model)


def _header(peft_type: str, base_model: str) -> dict:
    return {"peft_type": peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
            "revision": None, "inference_mode": True}


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous()


def _refuse_others(raw: dict, allowed: set[str], where, what: str) -> None:
    for key, value in raw.items():
        if key not in allowed and value not in (None, False, 0, "", [], {}):
            raise ExportError(f"{where}: `{key}`={value!r} is not supported ({what})")


def _options(name: str, options: dict, where) -> object:
    """The options block of method `name` (its class's `Options`), checked like a recipe's."""
    try:
        return method_class(name).Options.build(options, prefix=("method", name))
    except RecipeError as e:
        raise ExportError(f"{where}: {e}") from None


# ---- LoRA (plain, rsLoRA, DoRA; PiSSA saved converted)

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
    config = {**_header("LORA", base_model), "r": saved.rank, "lora_alpha": alpha,
              "lora_dropout": float(saved.dropout), "use_rslora": bool(saved.rslora), "target_modules": leaves,
              "exclude_modules": skipped or None, "bias": "none", "fan_in_fan_out": False,  # ours wraps nn.Linear only
              "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
              "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": bool(saved.dora),
              "lora_bias": False}
    tensors = {}
    for name, m in mods.items():
        a, b = m.plain_factors()
        tensors[f"{ROOT}{name}.lora_A.weight"], tensors[f"{ROOT}{name}.lora_B.weight"] = _cpu(a), _cpu(b)
        if m.dora:
            tensors[f"{ROOT}{name}.lora_magnitude_vector"] = _cpu(m.lora_magnitude)
    return config, tensors


def _lora_options(raw: dict, where: Path) -> dict:
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
    _refuse_others(raw, _LORA_KEYS, where, "plain, rsLoRA or DoRA adapters only")
    dropout = float(raw.get("lora_dropout") or 0.0)
    return {"rank": int(raw["r"]), "alpha": float(raw["lora_alpha"]), "dropout": dropout if 0 <= dropout < 1 else 0.0,
            "rslora": bool(raw.get("use_rslora", False)), "dora": bool(raw.get("use_dora", False))}


def _lora_layers(folder: Path, raw: dict) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(LoRA options, {module path: {"lora_a": A, "lora_b": B[, "lora_magnitude": m]}}), checked. The
    module set comes from the tensors, not from `target_modules` (which may be a regex, or be narrowed
    by layers_to_transform): the weights are what PEFT would load."""
    opts = _lora_options(raw, folder / ADAPTER_CONFIG)
    dora, rank, weights_path = opts["dora"], opts["rank"], folder / ADAPTER_WEIGHTS
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in _weights(folder).items():
        m = _LORA_KEY.fullmatch(key)
        if m is None:
            raise ExportError(f"{weights_path}: unsupported tensor `{key}` (only Linear layers' LoRA A and B"
                              f"{', and DoRA magnitudes' if dora else ''})")
        layers.setdefault(m.group(1), {})[_OURS[m.group(2)]] = t
    if not layers:
        raise ExportError(f"{weights_path}: holds no LoRA tensors")
    for name, parts in sorted(layers.items()):
        if not {"lora_a", "lora_b"} <= set(parts):
            held = ", ".join(k for k in ("lora_A", "lora_B") if k.lower() in parts) or "no A or B"
            raise ExportError(f"{weights_path}: `{name}` has {held} but not both lora_A and lora_B")
        if ("lora_magnitude" in parts) != dora:
            raise ExportError(f"{weights_path}: `{name}` " + (
                "has no lora_magnitude_vector but the config says use_dora=true" if dora else
                "has a lora_magnitude_vector (DoRA) but the config says use_dora=false"))
        a, b = parts["lora_a"], parts["lora_b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ExportError(f"{weights_path}: `{name}` has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                              f"expected (r, in) and (out, r) with r={rank}")
        if dora and tuple(parts["lora_magnitude"].shape) != (b.shape[0],):
            raise ExportError(f"{weights_path}: `{name}` has a magnitude of shape "
                              f"{tuple(parts['lora_magnitude'].shape)}; expected ({b.shape[0]},), one per output")
    opts["targets"] = sorted(layers)
    return opts, dict(sorted(layers.items()))


def _check_lora_modules(model: nn.Module, layers: dict, where) -> None:
    """Every module the adapter names is a Linear of the adapter's shape in `model`."""
    missing = []
    for name, parts in layers.items():
        a, b = parts["lora_a"], parts["lora_b"]
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            missing.append(name)
            continue
        if not isinstance(mod, nn.Linear):
            raise ExportError(f"{where}: `{name}` is a {type(mod).__name__} in this model, not a Linear layer")
        if (a.shape[1], b.shape[0]) != (mod.in_features, mod.out_features):
            raise ExportError(f"{where}: `{name}` is {mod.in_features}->{mod.out_features} in this model but the "
                              f"adapter is for {a.shape[1]}->{b.shape[0]}: is it for another base model?")
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ExportError(f"{where}: the adapter names modules this model lacks: {shown}")


def _write_lora(model: nn.Module, method, base_model: str):
    return lora_payload(model, method.cfg, base_model)


def _read_lora(folder: Path, raw: dict, model: nn.Module | None):
    opts, layers = _lora_layers(folder, raw)
    if model is not None:
        _check_lora_modules(model, layers, folder)
    delta = {f"{name}.{part}": t for name, parts in layers.items() for part, t in parts.items()}
    return _options("lora", opts, folder / ADAPTER_CONFIG), delta if model is not None else None


# ---- IA3

def _write_ia3(model: nn.Module, method, base_model: str):
    mods = {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}
    if not mods:
        raise ExportError("the model has no IA3 layers to save")
    config = {**_header("IA3", base_model), "target_modules": sorted(mods), "exclude_modules": None,
              "feedforward_modules": sorted(n for n, m in mods.items() if m.feedforward),
              "fan_in_fan_out": False, "modules_to_save": None, "init_ia3_weights": True}
    tensors = {}
    for name, m in mods.items():
        l = _cpu(m.ia3_l)
        tensors[f"{ROOT}{name}.ia3_l"] = (l[None, :] if m.feedforward else l[:, None]).contiguous()
    return config, tensors


def _listed(name: str, patterns) -> bool:
    """Whether PEFT's module patterns (a regex, or names matched whole or as a dotted suffix) select `name`."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns or ())


def _read_ia3(folder: Path, raw: dict, model: nn.Module | None):
    where, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if raw.get("fan_in_fan_out"):
        raise ExportError(f"{where}: fan_in_fan_out=true (Conv1D-style weights) is not supported")
    _refuse_others(raw, _IA3_KEYS, where, "IA3 on Linear layers only")
    delta, feedforward = {}, []
    for key, t in _weights(folder).items():
        m = _IA3_KEY.fullmatch(key)
        if m is None or t.ndim != 2 or 1 not in t.shape:
            raise ExportError(f"{weights_path}: unsupported tensor `{key}` {tuple(t.shape)} (only IA3 vectors "
                              "`...ia3_l`, shaped (out, 1) or (1, in))")
        name = m.group(1)
        # PEFT shapes a feed-forward module's vector (1, in), any other's (out, 1); a (1, 1) one asks the config
        ff = t.shape[1] != 1 if tuple(t.shape) != (1, 1) else _listed(name, raw.get("feedforward_modules"))
        delta[f"{name}.ia3_l"] = t.reshape(-1)
        if ff:
            feedforward.append(name)
    if not delta:
        raise ExportError(f"{weights_path}: holds no IA3 tensors")
    targets = sorted(k.removesuffix(".ia3_l") for k in delta)
    return _options("ia3", {"targets": targets, "feedforward": sorted(feedforward)}, where), \
        delta if model is not None else None


# ---- prefix tuning

def _write_prefix(model: nn.Module, method, base_model: str):
    tensors, _ = method.export_delta(model)  # folded: the prefixes themselves, whatever the training form
    names = [n for n, _ in attention_modules(model)]
    kv_heads, length, head_dim = tensors[f"{names[0]}.prefix_key"].shape
    rows = [tensors[f"{n}.{part}"].permute(1, 0, 2).reshape(length, kv_heads * head_dim)
            for n in names for part in ("prefix_key", "prefix_value")]
    config = {**_header("PREFIX_TUNING", base_model), "num_virtual_tokens": length,
              "token_dim": kv_heads * head_dim, "num_attention_heads": kv_heads, "num_layers": len(names),
              "num_transformer_submodules": 1, "encoder_hidden_size": method.cfg.hidden,
              "prefix_projection": False}  # folded: the tensors are the prefixes themselves
    return config, {"prompt_embeddings": _cpu(torch.cat(rows, 1))}


def _read_prefix(folder: Path, raw: dict, model: nn.Module | None):
    where, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for key in ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers"):
        if not isinstance(raw.get(key), int) or isinstance(raw.get(key), bool) or raw[key] <= 0:
            raise ExportError(f"{where}: `{key}` must be a positive integer, got {raw.get(key)!r}")
    if raw.get("num_transformer_submodules") not in (None, 1):
        raise ExportError(f"{where}: num_transformer_submodules={raw['num_transformer_submodules']!r}: only "
                          "decoder-only models (1) are supported")
    _refuse_others(raw, _PREFIX_KEYS, where, "prefix tuning of a decoder-only model only")
    length, layers, heads = raw["num_virtual_tokens"], raw["num_layers"], raw["num_attention_heads"]
    if raw["token_dim"] % heads:
        raise ExportError(f"{where}: token_dim={raw['token_dim']} is not a multiple of num_attention_heads={heads}")
    tensors = _weights(folder)
    emb = tensors.get("prompt_embeddings")
    if set(tensors) != {"prompt_embeddings"} or tuple(emb.shape) != (length, layers * 2 * raw["token_dim"]):
        raise ExportError(f"{weights_path}: expected one tensor `prompt_embeddings` of shape "
                          f"{(length, layers * 2 * raw['token_dim'])} (folded prefixes), found "
                          f"{ {k: tuple(t.shape) for k, t in tensors.items()} }")
    hidden = raw.get("encoder_hidden_size")
    opts = {"length": length, "reparam": False, **({"hidden": hidden} if isinstance(hidden, int) and hidden > 0 else {})}
    cfg = _options("prefix", opts, where)
    if model is None:
        return cfg, None
    try:
        names = [n for n, _ in attention_modules(model)]
    except MethodError as e:
        raise ExportError(f"{folder}: {e}") from None
    if len(names) != layers:
        raise ExportError(f"{where}: the adapter has prefixes for {layers} layers, this model has {len(names)}: "
                          "is it for another base model?")
    kv = emb.view(length, layers, 2, heads, raw["token_dim"] // heads).permute(1, 2, 3, 0, 4)  # (L, 2, kv, l, d)
    delta = {}
    for i, n in enumerate(names):
        delta[f"{n}.prefix_key"], delta[f"{n}.prefix_value"] = kv[i, 0].contiguous(), kv[i, 1].contiguous()
    return cfg, delta


FORMATS = {
    "lora": PeftFormat("LORA", _write_lora, _read_lora),
    "ia3": PeftFormat("IA3", _write_ia3, _read_ia3),
    "prefix": PeftFormat("PREFIX_TUNING", _write_prefix, _read_prefix),
}


# ---- folders

def peft_payload(model: nn.Module, method, base_model: str) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(adapter_config.json, tensors in PEFT's names) where PEFT has the method, else None."""
    fmt = FORMATS.get(method.name)
    return None if fmt is None else fmt.write(model, method, base_model)


def write_peft(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write adapter_config.json + adapter_model.safetensors into `folder`."""
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(folder / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})


def adapter_folder(path) -> Path:
    """The adapter folder `path` names: itself, or `<path>/adapter` for a tunesmith run folder."""
    p = Path(path).expanduser()
    markers = (ADAPTER_CONFIG, "tunesmith_method.json")
    if not any((p / m).is_file() for m in markers) and any((p / "adapter" / m).is_file() for m in markers):
        return p / "adapter"
    return p


def read_config(folder: Path) -> dict:
    """A PEFT folder's adapter_config.json, after checking the folder holds both of PEFT's files."""
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
    return raw


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(folder / ADAPTER_WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for a corrupt file
        raise ExportError(f"{folder / ADAPTER_WEIGHTS}: cannot read ({e})") from None


def read_peft(path, model: nn.Module | None = None):
    """(method name, its options, adapter_config.json, delta in our names) of a PEFT folder of any
    method in FORMATS; the delta (None without `model`) fits the model once the method is attached."""
    folder = adapter_folder(path)
    raw = read_config(folder)
    name = next((n for n, f in FORMATS.items() if f.peft_type == raw.get("peft_type")), None)
    if name is None:
        known = ", ".join(f.peft_type for f in FORMATS.values())
        raise ExportError(f"{folder / ADAPTER_CONFIG}: peft_type {raw.get('peft_type')!r} is not supported ({known})")
    options, delta = FORMATS[name].read(folder, raw, model)
    return name, options, raw, delta


# ---- the LoRA-only public API

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


def read_adapter(path):
    """Read and check a LoRA adapter folder: (our LoraConfig, {module path: {"lora_a": A, "lora_b": B}}),
    plus "lora_magnitude" per module for a DoRA adapter."""
    folder = adapter_folder(path)
    opts, layers = _lora_layers(folder, read_config(folder))
    return _options("lora", opts, folder / ADAPTER_CONFIG), layers


def load_adapter(model: nn.Module, adapter_dir) -> nn.Module:
    """Apply our LoRA to `model` as the adapter folder describes and load its weights; return `model`.

    `adapter_dir` is a PEFT LoRA folder (ours or PEFT's) or a tunesmith run folder holding one in
    `adapter/`. Raises ExportError for a bad folder, an unsupported option, or modules the model lacks.
    """
    cfg, layers = read_adapter(adapter_dir)
    if lora_modules(model):
        raise ExportError("the model already has LoRA layers; load the adapter onto a fresh base model")
    _check_lora_modules(model, layers, adapter_dir)
    try:
        with torch.random.fork_rng(devices=[]):  # LoRALinear draws a random A we overwrite at once
            LoRA(cfg).apply(model)
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
