"""What `tunesmith merge` reads: the recipe (`merge:` section) and its inputs — LoRA adapters, other
foldable adapters and full models — checked against one base and turned into LoRA factors or task
vectors (`export/merge.py` merges and writes them)."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file
from torch import nn

from tunesmith.config import Config, RecipeError, invalid
from tunesmith.methods import MethodError, method_class
from tunesmith.models import merging
from tunesmith.models.rope import describe_rope

from .atomic import ExportError
from .peft_format import ADAPTER_CONFIG, adapter_folder, read_adapter
from .tuned import DELTA_FILE, METHOD_FILE, load_tuned, read_method


class MergeModel(Config):
    path: str
    "An adapter folder (ours or a PEFT LoRA), a run folder, or a full model folder."
    weight: float = 1.0
    "w_i: this model's weight (negative subtracts its task vector)."


class MergeSpec(Config):
    method: Literal[merging.METHODS] = "ties"
    "linear (weighted average), task_arithmetic (Σ w_i τ_i), ties, dare_linear, dare_ties, magnitude_prune or slerp."
    base: str | None = None
    "The base the task vectors are taken from; default: the base the adapters record."
    models: list[MergeModel] = Field(min_length=1)
    "The models to merge: {path, weight} each (or just a path)."
    density: float = Field(0.5, gt=0, le=1)
    "ties / dare / magnitude_prune: share of each task vector kept (1 = all)."
    lambda_: float = Field(1.0, alias="lambda")
    "λ in θ = θ_base + λ·τ_merged."
    t: float = Field(0.5, ge=0, le=1)
    "slerp: 0 = the first model, 1 = the second."
    seed: int = 0
    "Seed of DARE's drop masks."
    space: Literal["auto", "adapter", "delta"] = "auto"
    "LoRA inputs: merge in adapter space (A, B) or on the dense ΔW = s·B·A; auto: adapter space where exact."
    rank: int | None = Field(None, gt=0)
    "Write a LoRA of this rank from the merged ΔW (truncated SVD) instead of a full model."
    output: str = "merged"
    "The folder to write (an adapter folder or a transformers model folder)."
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    "Dtype of a full-model output's weights."

    @model_validator(mode="before")
    @classmethod
    def _paths(cls, values):
        """`models: [a, b]` is `models: [{path: a}, {path: b}]`."""
        if isinstance(values, dict) and isinstance(values.get("models"), list):
            values = {**values, "models": [{"path": m} if isinstance(m, str) else m for m in values["models"]]}
        return values

    @model_validator(mode="after")
    def _consistent(self):
        if self.method == "slerp":
            if len(self.models) != 2:
                raise invalid(f"slerp merges exactly two models, got {len(self.models)}", "models")
            if any(m.weight != 1 for m in self.models) or self.lambda_ != 1:
                raise invalid("slerp takes `t`, not weights or lambda; leave them at 1", "models")
        if self.method == "linear" and abs(sum(m.weight for m in self.models)) < 1e-12:
            raise invalid("linear averages with the weights, which sum to 0; use task_arithmetic", "models")
        if self.rank is not None and self.space == "adapter":
            raise invalid("a rank is for merging on ΔW (space: delta or auto); space: adapter keeps the inputs' rank",
                          "rank")
        return self


class MergeRecipe(Config):
    merge: MergeSpec
    "The merge: method, models, options and output."


def read_merge_recipe(values, where: str = "merge recipe") -> MergeSpec:
    """The MergeSpec of a parsed recipe (a mapping with a `merge` section); a mistake is a RecipeError
    naming `where` and the field."""
    if not isinstance(values, dict):
        raise RecipeError(f"{where}: a merge recipe is a mapping with a `merge` section")
    try:
        return MergeRecipe.build(values).merge
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}", e.loc) from None


# ---- the inputs


@dataclass
class Source:
    """One input: a LoRA's factors {module: (A, B, scale)}, or a task vector {parameter: τ}."""

    label: str  # `models[i] (path)`, for messages
    kind: str  # "lora" | "adapter" | "model"
    path: Path
    weight: float
    recorded_base: str | None = None
    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    delta: dict[str, torch.Tensor] = field(default_factory=dict)
    what: str = ""

    def dense(self, module: str, like: nn.Linear) -> torch.Tensor:
        """ΔW of `module`: s·B·A for a LoRA, else the task vector of its weight (zero where it has none)."""
        if self.kind == "lora":
            if module not in self.lora:
                return torch.zeros_like(like.weight, dtype=torch.float32)
            a, b, s = self.lora[module]
            return s * (b @ a)
        return self.delta.get(f"{module}.weight", torch.zeros_like(like.weight, dtype=torch.float32))


def _model_folder(p: Path) -> Path | None:
    if (p / "config.json").is_file():
        return p
    return p / "model" if (p / "model" / "config.json").is_file() else None


def _run_base(p: Path) -> str | None:
    """The base a full-tuning run recorded (`model.name` in its recipe.yaml), if it is a run folder."""
    import yaml

    recipe = p / "recipe.yaml"
    try:
        values = yaml.safe_load(recipe.read_text()) if recipe.is_file() else None
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return None
    name = (values or {}).get("model", {}).get("name") if isinstance(values, dict) else None
    return name if isinstance(name, str) else None


def classify(spec: MergeSpec) -> list[Source]:
    """Each input's kind and recorded base, from its files only (no tensors yet)."""
    sources = []
    for i, m in enumerate(spec.models):
        p = Path(m.path).expanduser()
        label = f"merge.models[{i}] ({m.path})"
        folder = adapter_folder(p)
        if (folder / METHOD_FILE).is_file() or (folder / ADAPTER_CONFIG).is_file():
            try:
                cfg, meta = read_method(folder)
            except ExportError as e:
                raise ExportError(f"{label}: {e}") from None
            if meta.get("rope"):
                raise ExportError(f"{label}: trained on stretched positions ({describe_rope(meta['rope'])}), which a "
                                  "merge into the base's config would drop; export it alone (tunesmith export)")
            lora = cfg.name == "lora" and not cfg.lora.dora
            if not lora and not method_class(cfg.name).mergeable:
                raise ExportError(f"{label}: a `{cfg.name}` adapter does not fold into the weights, so it has no "
                                  "task vector to merge")
            what = f"{cfg.name} r{cfg.lora.rank}" if cfg.name == "lora" else cfg.name
            sources.append(Source(label, "lora" if lora else "adapter", folder, m.weight,
                                  meta.get("base_model_name_or_path"), what=what))
        elif _model_folder(p) is not None:
            sources.append(Source(label, "model", _model_folder(p), m.weight, _run_base(p), what="full model"))
        else:
            raise ExportError(f"{label}: not an adapter folder (no {METHOD_FILE} or {ADAPTER_CONFIG}) nor a model "
                              "folder (no config.json)")
    return sources


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def pick_base(spec: MergeSpec, sources: list[Source]) -> str:
    """The base: `merge.base`, else the one the inputs record; inputs recording another are refused."""
    recorded = [(s, s.recorded_base) for s in sources if s.recorded_base]
    base = spec.base or (recorded[0][1] if recorded else None)
    if base is None:
        raise ExportError("merge.base: none of the models records its base; set merge.base (task vectors are "
                          "taken against it)")
    for s, b in recorded:
        if not _same_model(b, base):
            raise ExportError(f"{s.label} was tuned from `{b}`, not `{base}`: task vectors of different bases "
                              "do not add up; merge models of one base")
    return base


def _lora_factors(source: Source) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module: (A, B, scale)} of a LoRA folder, ours (delta.safetensors) or PEFT's."""
    cfg, _ = read_method(source.path)
    opts = cfg.lora
    scale = opts.alpha / (math.sqrt(opts.rank) if opts.rslora else opts.rank)
    if (source.path / METHOD_FILE).is_file():
        try:
            tensors = load_file(str(source.path / DELTA_FILE))
        except Exception as e:  # safetensors raises its own error types for a corrupt file
            raise ExportError(f"{source.label}: cannot read {DELTA_FILE} ({e})") from None
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            module, _, part = key.rpartition(".")
            if part not in ("lora_a", "lora_b"):
                raise ExportError(f"{source.label}: unexpected tensor `{key}` in a LoRA adapter")
            layers.setdefault(module, {})[part] = t
    else:
        _, layers = read_adapter(source.path)
    out = {}
    for module, parts in layers.items():
        if set(parts) != {"lora_a", "lora_b"}:
            raise ExportError(f"{source.label}: `{module}` lacks its lora_a or lora_b")
        out[module] = (parts["lora_a"].float(), parts["lora_b"].float(), scale)
    return out


def _check_lora(source: Source, base: nn.Module) -> None:
    """Every module the LoRA names is a Linear of its shape in the base (checked in the base's order)."""
    modules = dict(base.named_modules())
    missing = sorted(set(source.lora) - set(modules))
    if missing:
        raise ExportError(f"{source.label}: the base has no module `{missing[0]}`: is it for another base model?")
    for name, mod in modules.items():
        if name not in source.lora:
            continue
        a, b, _ = source.lora[name]
        if not isinstance(mod, nn.Linear) or (mod.in_features, mod.out_features) != (a.shape[1], b.shape[0]):
            shape = f"{mod.in_features}->{mod.out_features}" if isinstance(mod, nn.Linear) else type(mod).__name__
            raise ExportError(f"{source.label}: `{name}` is {shape} in the base but the adapter is for "
                              f"{a.shape[1]}->{b.shape[0]}: is it for another base model?")


def _task_vector(source: Source, base: nn.Module, tuned: nn.Module) -> dict[str, torch.Tensor]:
    """τ = tuned − base, parameter by parameter (names and shapes must match); all-zero entries left out."""
    ours, theirs = dict(base.named_parameters()), dict(tuned.named_parameters())
    if set(ours) != set(theirs):
        odd = sorted(set(ours) ^ set(theirs))[:3]
        raise ExportError(f"{source.label}: its parameters differ from the base's ({', '.join(odd)}): not a "
                          "fine-tune of this base")
    delta = {}
    for name, p in ours.items():
        q = theirs[name]
        if q.shape != p.shape:
            raise ExportError(f"{source.label}: `{name}` is {tuple(q.shape)} but {tuple(p.shape)} in the base: "
                              "not a fine-tune of this base")
        d = q.detach().float() - p.detach().float()
        if torch.any(d != 0):
            delta[name] = d
    return delta


def _full_model(source: Source) -> nn.Module:
    """A full model input's weights (its tokenizer is not needed: the base's is written)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"{source.label}: cannot load this model folder ({e})") from None


def load_sources(sources: list[Source], base: nn.Module) -> None:
    """Read each input's tensors: a LoRA's factors, or the task vector of a full model / other adapter."""
    for s in sources:
        if s.kind == "lora":
            s.lora = _lora_factors(s)
            _check_lora(s, base)
        elif s.kind == "adapter":
            tuned = copy.deepcopy(base)
            try:
                method, _ = load_tuned(tuned, s.path)
            except ExportError as e:
                raise ExportError(f"{s.label}: {e}") from None
            try:
                method.merge(tuned)
            except MethodError as e:
                raise ExportError(f"{s.label}: {e}") from None
            s.delta = _task_vector(s, base, tuned)
        else:
            s.delta = _task_vector(s, base, _full_model(s))


# ---- the plan and the merges
