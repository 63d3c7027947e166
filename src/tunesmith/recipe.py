"""The recipe: one typed schema, mirrored by a YAML file, overridden by `a.b=c` on the command line.

The pieces live where they belong: `config.py` holds the shared base, RecipeError and the model,
data, train and eval sections; each method's options live beside the method (`methods/lora.py`
...). This module assembles them: the `method` section is derived from `methods.REGISTRY` and the
`objective` section from the objective option blocks below, each a union keyed on its `name`
(only the chosen block is held and saved). It loads YAML files, applies overrides, and lists every
field for `tunesmith recipe` and the README.

Every field has a default that works and a one-line doc (the string right under it). Unknown keys
are errors that name the nearest valid key; bad values name the field and what is allowed; errors
in a file name the file and the line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, model_validator

from .config import (Config, DataConfig, EvalConfig, ModelConfig, OneOf, RecipeError, StageConfig, TrainConfig,
                     bare, invalid, one_of)
from .data.pipeline.config import PrepareConfig
from .methods.adapters import AdapterConfig
from .methods.compose import LongLoraConfig, MamConfig
from .methods.freeze import FreezeConfig
from .methods.full import FullConfig
from .methods.hft import HftConfig
from .methods.ia3 import Ia3Config
from .methods.lora import LoraConfig
from .methods.options import MethodConfig, method_from_dict
from .methods.prefix import PrefixConfig
from .methods.sparse import SparseConfig
from .objectives import REGISTRY as OBJECTIVE_REGISTRY
from .objectives import objective_class
from .objectives.grpo import GrpoConfig
from .objectives.preference import PREFERENCE_BETA, PreferenceConfig

# --------------------------------------------------------------------------------------------------
# the objective section: one options block per registered objective (blocks may be shared, e.g. the
# preference losses read `preference`), keyed on objective.name

OBJECTIVES = ("sft", *(n for n in OBJECTIVE_REGISTRY if n != "sft"))  # the default first


def _objective_section() -> type[OneOf]:
    names = OBJECTIVES
    classes = {n: objective_class(n) for n in names}
    blocks = {c.block: c.Options for c in classes.values() if c.Options is not None}
    docs = {c.block: c.block_doc for c in classes.values() if c.Options is not None}
    return one_of(
        "ObjectiveConfig", "What training minimises: `name` picks the objective, its block holds its options.",
        names, blocks=blocks, uses={n: c.block for n, c in classes.items()},
        name_doc=f"Training objective: {', '.join(names)} (README: objectives); its block below holds its options.",
        block_docs=docs, base=_Objective, module=__name__)


class _Objective(OneOf):
    @model_validator(mode="after")
    def _resolve(self):
        """Defaults that depend on the chosen objective (e.g. a preference loss's own β), filled in so
        the resolved recipe shows them."""
        block = objective_class(self.name).block
        if block is not None and getattr(self, block, None) is not None:
            objective_class(self.name).resolve(self.name, getattr(self, block))
        return self


ObjectiveConfig = _objective_section()


# --------------------------------------------------------------------------------------------------
# the recipe


class Recipe(Config):
    name: str = "run"
    "Run name; the run folder is `<output_dir>/<name>`."
    output_dir: str = "runs"
    "Where run folders go."
    resume: bool = False
    "Continue from the newest checkpoint in the run folder."
    nproc: int = Field(1, gt=0)
    "Processes on this node: `tunesmith train` relaunches itself under torchrun when > 1."
    model: ModelConfig = Field(default_factory=ModelConfig)
    "The base model."
    data: DataConfig = Field(default_factory=DataConfig)
    "The training data."
    method: MethodConfig = Field(default_factory=MethodConfig)
    "The tuning method."
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    "What the training minimises."
    train: TrainConfig = Field(default_factory=TrainConfig)
    "The training loop."
    eval: EvalConfig = Field(default_factory=EvalConfig)
    "Task evaluation during training."
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    "Data preparation (`tunesmith data prepare`): cleaning, dedup, filters and shards."
    stages: list[StageConfig] = Field(default_factory=list)
    "Training stages run in order as one resumable job, the model carried from each to the next; each stage overrides data/train/eval keys (README: stages)."
    stage_mode: Literal["phased", "stacked"] = "phased"
    "`phased`: the stages in order; `stacked`: one run over all the stages' data at once (the recipe's own train section)."

    @model_validator(mode="after")
    def _stage_names(self):
        """Unnamed stages are `stage1`, `stage2` ...; each name is its own run folder, so names differ."""
        for i, stage in enumerate(self.stages):
            stage.name = stage.name or f"stage{i + 1}"
        names = [s.name for s in self.stages]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise invalid(f"stage names must differ: `{twice[0]}` names two stages", "stages")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# sections whose `name` picks an options block
CHOICES: dict[str, type[OneOf]] = {k: f.annotation for k, f in Recipe.model_fields.items()
                                   if isinstance(f.annotation, type) and issubclass(f.annotation, OneOf)}


# --------------------------------------------------------------------------------------------------
# loading, overrides, saving


def _parse_scalar(text: str):
    """`key=value` values are parsed as YAML scalars/lists: 3 -> int, 1e-4 -> float, [a,b] -> list."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:  # YAML 1.1 reads `1e-4` as a string
            return float(value)
        except ValueError:
            return value
    return value


def _switch(node: dict, section: type[OneOf], new) -> None:
    """An override that changes `<section>.name` drops the block of the choice it replaces (from the
    file or an earlier override): `tunesmith train recipes/lora-sft.yaml method.name=hft` trains HFT.
    A block given for another choice than the final one is still an error."""
    old = node.get("name", section.model_fields["name"].default)
    if not isinstance(old, str) or not isinstance(new, str):
        return
    old_block = section.uses.get(old)
    if old_block and old_block != section.uses.get(new):
        node.pop(old_block, None)


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides to a nested dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override `{item}` is not of the form key=value (e.g. train.lr=1e-4)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = values
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override `{item}`: `{p}` is not a section")
        value = _parse_scalar(text)
        if len(parts) == 2 and parts[0] in CHOICES and parts[1] == "name":
            _switch(node, CHOICES[parts[0]], value)
        node[parts[-1]] = value
    return values


def _line(text: str, loc: tuple) -> int | None:
    """The line (from 1) of the deepest key of `loc` found in the YAML `text`."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if getattr(k, "value", None) == str(part)), None)
            if hit is None:
                break
            line, node = hit[0].start_mark.line + 1, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _where(path: Path, text: str, error: RecipeError, overrides: list[str]) -> str:
    """`file:line` of a mistake in a recipe file; only `file` when an override set the field."""
    loc = tuple(str(p) for p in (error.loc or ()))
    keys = [tuple(o.split("=", 1)[0].strip().split(".")) for o in overrides if "=" in o]
    overridden = any(k[:len(loc)] == loc or loc[:len(k)] == k for k in keys)
    line = None if overridden or not loc else _line(text, error.loc)
    return f"{path}:{line}" if line else str(path)


def read_mapping(path: Path, error: type[Exception], what: str, holds: str) -> tuple[dict, str]:
    """The YAML mapping in `path` and the file's text (for line numbers in later errors); a missing
    file, bad YAML or another top-level type raises `error` naming the file."""
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    text = path.read_text()
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise error(f"{path}: a {what} is a mapping {holds}")
    return values, text


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe (or the defaults when `path` is None) and apply `a.b=c` overrides."""
    values: dict = {}
    overrides = list(overrides or [])
    text = ""
    if path is not None:
        values, text = read_mapping(Path(path), RecipeError, "recipe", "of sections (model, data, method, train)")
    apply_overrides(values, overrides)
    try:
        return Recipe.build(values)
    except RecipeError as e:
        if path is None:
            raise
        raise RecipeError(f"{_where(Path(path), text, e, overrides)}: {e}", e.loc) from None


def recipe_from_dict(values: dict) -> Recipe:
    return Recipe.build(values)


def to_dict(recipe: BaseModel) -> dict:
    """Plain data: only the chosen method's and objective's blocks."""
    return recipe.model_dump()


def to_yaml(recipe: BaseModel) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False, allow_unicode=True)


def reference(cls: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every field, for `tunesmith recipe --help` and the README."""
    rows = []
    for name, info in cls.model_fields.items():
        tp = bare(info.annotation)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            rows += reference(tp, f"{prefix}{name}.")
            continue
        default = info.get_default(call_default_factory=True)
        rows.append((prefix + name, default if isinstance(default, str) else repr(default), info.description or ""))
    return rows


__all__ = ["Recipe", "RecipeError", "load_recipe", "recipe_from_dict", "method_from_dict", "apply_overrides",
           "to_dict", "to_yaml", "reference", "PREFERENCE_BETA", "OBJECTIVES", "CHOICES",
           "Config", "ModelConfig", "DataConfig", "TrainConfig", "EvalConfig", "MethodConfig", "ObjectiveConfig",
           "PreferenceConfig", "GrpoConfig", "LoraConfig", "FullConfig", "FreezeConfig", "HftConfig", "SparseConfig",
           "AdapterConfig", "PrefixConfig", "Ia3Config", "MamConfig", "LongLoraConfig"]
