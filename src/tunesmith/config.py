"""The bottom layer of the recipe: the base every options block shares, RecipeError and how a validation error
reads, and the sections that belong to no method or objective (model, data, train, eval). Method options live
beside their methods (`methods/lora.py` ...); `recipe.py` assembles the whole recipe from these and the registry.
Every field has a default that works and a one-line doc (the string under it), which `tunesmith recipe` and the
README reference print. An unknown key names the nearest valid key; a bad value names the path and what is allowed.
"""
from __future__ import annotations

import contextvars
import difflib
import re
import types
import typing
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model, model_serializer, model_validator
from pydantic_core import PydanticCustomError


class RecipeError(ValueError):
    """A mistake in a recipe or an override: the message says which field and what is allowed.
    `loc` is the field's path as a tuple (None when the mistake is not one field's)."""

    def __init__(self, message: str, loc: tuple | None = None):
        super().__init__(message)
        self.loc = loc


# messages


def nearest(key: str, options) -> str:
    """`; did you mean `x`?` for the closest of `options`, else the list of them."""
    match = difflib.get_close_matches(str(key), list(options), n=1, cutoff=0.5)
    return f"; did you mean `{match[0]}`?" if match else f"; valid keys: {', '.join(sorted(options))}"


def invalid(message: str, field: str | None = None) -> PydanticCustomError:
    """A validator's error: `message` about `field` of the model (or about the value itself)."""
    return PydanticCustomError("recipe", "{message}", {"message": message, "field": field})


def bare(tp):
    """`X | None` -> X; anything else unchanged."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _walk(root: type, loc: tuple):
    """(model, field info, type) at an error's location: the model holding the last field, that
    field's info (None for an unknown key) and the type the location points at."""
    model, info, tp = root, None, root
    for part in loc:
        tp = bare(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            model, info = tp, tp.model_fields.get(part)
            if info is None:
                return model, None, None
            tp = info.annotation
        elif get_origin(tp) is list and isinstance(part, int):
            tp = get_args(tp)[0]
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
    return model, info, bare(tp)


def _range(info) -> str:
    """`> 0`, `>= 0` or `in [0, 1)` from a field's bounds."""
    bounds = {k: getattr(m, k) for m in info.metadata for k in ("gt", "ge", "lt", "le")
              if getattr(m, k, None) is not None}
    low = ("(", bounds["gt"]) if "gt" in bounds else ("[", bounds["ge"]) if "ge" in bounds else None
    high = (")", bounds["lt"]) if "lt" in bounds else ("]", bounds["le"]) if "le" in bounds else None
    if low and high:
        return f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    if low:
        return f"{'>' if low[0] == '(' else '>='} {low[1]:g}"
    return f"{'<' if high[0] == ')' else '<='} {high[1]:g}"


_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
             "list": "a list", "dict": "a mapping", "model": "a mapping of options"}
_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _path(loc) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def message(error: dict, root: type, prefix: tuple = ()) -> tuple[str, tuple]:
    """One pydantic error as (a line in recipe terms, the field's full path)."""
    loc, kind, ctx = tuple(error["loc"]), error["type"], error.get("ctx") or {}
    value, full = error.get("input"), prefix + tuple(error["loc"])
    model, info, tp = _walk(root, loc)
    path = _path(full)
    if kind == "recipe":
        if ctx.get("field"):
            full += (ctx["field"],)
        return f"{_path(full)}: {ctx['message']}", full
    if kind == "other_block":
        where = _path(full)
        return (f"{_path(full + (ctx['key'],))}.* given but {_path(full + ('name',))}={ctx['name']}; set "
                f"{where}.name={ctx['key']} to use it, or drop the {ctx['key']} block"), full
    if kind == "extra_forbidden":
        return f"unknown recipe key `{path}`{nearest(loc[-1], model.model_fields)}", full
    if kind == "literal_error" and get_origin(tp) is Literal:
        return f"{path}: {value!r} is not allowed; choose one of {', '.join(map(str, get_args(tp)))}", full
    if kind == "too_short" and ctx.get("min_length") == 1:
        item = get_args(tp)[0] if get_origin(tp) is list and get_args(tp) else None
        if get_origin(item) is Literal:
            return f"{path}: name at least one of {', '.join(get_args(item))}", full
        return f"{path}: must not be empty", full
    if kind in _BOUNDS and info is not None:
        return f"{path}: must be {_range(info)}, got {_short(value)}", full
    head = kind.split("_")[0]
    if kind.endswith(("_type", "_parsing", "_from_float", "_attributes_type")) and head in _EXPECTED:
        return f"{path}: expected {_EXPECTED[head]}, got {_short(value)}", full
    text = str(error.get("msg", "")).removeprefix("Value error, ")
    return f"{path}: {text[:1].lower() + text[1:]}, got {_short(value)}", full


def describe(error: ValidationError, root: type, prefix: tuple = ()) -> RecipeError:
    """A RecipeError for a pydantic ValidationError: the first few mistakes on one line."""
    found = [message(e, root, prefix) for e in error.errors(include_url=False)]
    text = "; ".join(m for m, _ in found[:3])
    if len(found) > 3:
        text += f" (and {len(found) - 3} more)"
    return RecipeError(text, found[0][1] if found else None)


# the shared base


_VALIDATING: contextvars.ContextVar[bool] = contextvars.ContextVar("tunesmith_validating", default=False)


class Config(BaseModel):
    """The base of every recipe section and options block."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True,
                              coerce_numbers_to_str=True)

    def __init__(self, **values):
        """Built in Python, a mistake reads as from a recipe file (a RecipeError). Inside another
        section's validation pydantic calls this too: there its errors stay pydantic's, so the outer
        section reports them with their full paths."""
        if _VALIDATING.get():
            super().__init__(**values)
            return
        token = _VALIDATING.set(True)
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise describe(e, type(self)) from None
        finally:
            _VALIDATING.reset(token)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs):
        """pydantic's, with the sections inside keeping pydantic's errors (see `__init__`)."""
        token = _VALIDATING.set(True)
        try:
            return super().model_validate(obj, **kwargs)
        finally:
            _VALIDATING.reset(token)

    @classmethod
    def build(cls, values: Any, prefix: tuple = ()):
        """Validate a mapping into this section; a mistake is a RecipeError whose path starts at `prefix`."""
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise describe(e, cls, prefix) from None

    @model_validator(mode="before")
    @classmethod
    def _gentle(cls, values):
        """A scalar where a list is wanted is a one-item list (`targets=q_proj`); a bool is no number."""
        if not isinstance(values, dict):
            return values
        out = dict(values)
        for key, value in values.items():
            info = cls.model_fields.get(key)
            tp = bare(info.annotation) if info else None
            if get_origin(tp) is list and isinstance(value, (str, int, float)):
                out[key] = [value]
            elif tp in (int, float) and isinstance(value, bool):
                raise invalid(f"expected {_EXPECTED[tp.__name__]}, got {value!r}", key)
        return out


class OneOf(Config):
    """A section whose `name` picks one of several options blocks: a union keyed on `name`. Only the
    chosen block is held (filled with its defaults when absent), a block of another choice is an
    error naming both, and the saved form holds the chosen block alone."""

    uses: ClassVar[dict[str, str | None]] = {}  # choice -> the field of its block (None: it has none)

    @model_validator(mode="before")
    @classmethod
    def _pick(cls, values):
        if not isinstance(values, dict):
            return values
        name = values.get("name", cls.model_fields["name"].default)
        if not isinstance(name, str) or name not in cls.uses:
            return values  # the name's own check reports it
        chosen, blocks = cls.uses[name], set(cls.uses.values()) - {None}
        for key, value in values.items():
            if key in blocks and key != chosen and value is not None:
                raise PydanticCustomError("other_block", "{key} given for {name}", {"key": key, "name": name})
        if chosen and values.get(chosen) is None:
            values = {**values, chosen: {}}
        return values

    @model_serializer(mode="wrap")
    def _chosen_only(self, handler):
        data = handler(self)
        others = set(self.uses.values()) - {None, self.uses.get(self.name)}
        return {k: v for k, v in data.items() if k not in others}


def one_of(model_name: str, doc: str, names: tuple[str, ...], blocks: dict[str, type], uses: dict[str, str | None],
           name_doc: str, block_docs: dict[str, str], base: type = OneOf, module: str = __name__) -> type:
    """A OneOf section: `name` (one of `names`, the first the default) and an optional block per
    entry of `blocks`; `uses` maps each name to the block it reads."""
    fields: dict[str, Any] = {"name": (Literal[names], Field(names[0], description=name_doc))}
    for key, cls in blocks.items():
        fields[key] = (cls | None, Field(None, description=block_docs[key]))
    model = create_model(model_name, __base__=base, __doc__=doc, __module__=module, **fields)
    model.uses = dict(uses)
    return model


# the sections that belong to no method or objective


class RopeConfig(Config):
    """How rotary positions are stretched; saved with the model/adapter, so every loader uses them."""

    scaling: Literal["none", "linear", "ntk", "dynamic", "yarn"] = "none"
    "`linear` = position interpolation; `ntk` = NTK-aware (a larger θ); `dynamic` = dynamic NTK; `yarn` = YaRN."
    factor: float | None = Field(None, ge=1)
    "How many times the original context to reach; default: target_length / original_length."
    target_length: int | None = Field(None, gt=0)
    "The context to reach, in tokens (sets factor and the saved max_position_embeddings; `dynamic` keeps the original max_position_embeddings)."
    original_length: int | None = Field(None, gt=0)
    "The context the model was trained at; default: its config's max_position_embeddings."
    theta: float | None = Field(None, gt=0)
    "A new RoPE base θ (ProLong raises it), applied with or without a scaling."
    beta_fast: float = Field(32.0, gt=0)
    "YaRN only: rotations above this count per context keep their frequency (extrapolate)."
    beta_slow: float = Field(1.0, gt=0)
    "YaRN only: rotations below this count per context are fully interpolated."


class ModelConfig(Config):
    name: str = "smollm2-135m-instruct"
    "A local HF folder, a .gguf file, a hub id already in the local HF cache, or `smollm2-135m-instruct`."
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    "Dtype the weights are stored in. Trainable weights stay fp32 whatever the compute precision."
    frozen_dtype: Literal["same", "bf16", "fp16"] = "same"
    "Store frozen base weights in this dtype (saves memory for LoRA); `same` keeps `dtype`."
    quantize: Literal["none", "int8", "int4", "nf4"] = "none"
    "QLoRA: store the frozen base's decoder Linears quantised (int8 per row, int4 in groups of 64, nf4 = NormalFloat-4 in blocks of 64); compute stays in the activations' dtype. Only with a method that keeps the base frozen."
    adapter: str | None = None
    "Start from this adapter (an adapter folder, a PEFT LoRA or a run folder), e.g. an SFT stage's, and keep training it."
    attention: Literal["packed", "sdpa", "eager", "s2"] = "packed"
    "Training attention: `packed` runs sdpa per sample (no O(T²) mask); `sdpa`/`eager` use a block-causal mask; `s2` = shifted sparse attention (LongLoRA; full attention at inference)."
    s2_group: int = Field(0, ge=0)
    "S²-Attn group size in tokens; 0 = a quarter of the row length."
    rope: RopeConfig = Field(default_factory=RopeConfig)
    "RoPE position scaling (see model.rope.*)."


COLUMN_ROLES = ("text", "instruction", "input", "output", "system", "messages", "prompt", "chosen", "rejected", "tools")


class MixSource(Config):
    """One source of `data.mix`: where its records are and its share of the epoch's tokens."""

    path: str
    "A file or source `data.train` takes (e.g. `a.jsonl`, `task:sql/train`) or a shard folder."
    weight: float = Field(gt=0)
    "Its share of the mixed epoch's tokens (weights are normalised to sum to 1)."


class DataConfig(Config):
    train: str = ""
    "Training file (.jsonl, .json, .csv, .parquet), an HF `save_to_disk` folder or a shard folder (`data prepare`)."
    mix: list[MixSource] = Field(default_factory=list)
    "Mix sources by tokens instead of `train`: [{path: a.jsonl, weight: 0.7}, {path: b.jsonl, weight: 0.3}]; each gets weight × the epoch's tokens (repeated or subsampled, seeded)."
    mix_tokens: int | None = Field(None, gt=0)
    "Tokens of one mixed epoch (default: all sources' tokens together)."
    validation: str | None = None
    "Validation file; if unset, `val_fraction` of the training records are held out."
    val_fraction: float = Field(0.0, ge=0, lt=1)
    "Fraction of training records held out for validation when no validation file is given."
    format: Literal["auto", "text", "instruction", "chat", "preference"] = "auto"
    "Record format; `auto` picks preference if `chosen`/`rejected` exist, chat if `messages`, instruction if `instruction`/`output`, else text."
    columns: dict[str, str] = Field(default_factory=dict)
    "Column mapping, e.g. {messages: conversation, output: response}; keys: text, instruction, input, output, system, messages, prompt, chosen, rejected, tools."
    system_prompt: str | None = None
    "System prompt added to chat/instruction records that have none."
    train_on_prompt: bool = False
    "Also train on prompt (system/user) tokens, not only on assistant tokens."
    assistant_turns: Literal["all", "last"] = "all"
    "Which assistant turns carry loss in multi-turn chats."
    tool_format: Literal["template", "inline"] = "template"
    "Tool-calling chats (`tools`, `tool_calls`, role `tool`): `template` renders them with the model's chat template (an error if it cannot render tools); `inline` writes them into the messages as <tools>/<tool_call>/<tool_response> text, for templates without tool support."
    max_length: int = Field(1024, gt=0)
    "Longest sample in tokens."
    overflow: Literal["truncate", "drop"] = "truncate"
    "What to do with a sample longer than max_length."
    packing: bool = True
    "Pack samples into rows of `train.batch_tokens` with per-sample attention isolation; else pad."
    shuffle: bool = True
    "Shuffle samples every epoch (seeded)."
    limit: int | None = None
    "Use only the first N records (quick experiments)."

    @model_validator(mode="after")
    def _roles(self):
        if self.mix and self.train:
            raise invalid("set data.train or data.mix, not both", "mix")
        if self.mix_tokens is not None and not self.mix:
            raise invalid("is set but data.mix is empty", "mix_tokens")
        for role in self.columns:
            if role not in COLUMN_ROLES:
                raise invalid(f"unknown column role `{role}`{nearest(role, COLUMN_ROLES)}", "columns")
        return self


class TrainConfig(Config):
    epochs: float = Field(1.0, gt=0)
    "Passes over the training data (ignored when `steps` is set)."
    steps: int | None = Field(None, gt=0)
    "Optimizer steps to run; overrides `epochs`."
    batch_tokens: int = Field(4096, gt=0)
    "Token budget of one micro-batch (packed: one or more rows of at most this many tokens)."
    batch_size: int = Field(8, gt=0)
    "Samples per micro-batch when packing is off."
    grad_accum: int = Field(1, gt=0)
    "Micro-batches per optimizer step; the loss is normalised by trained tokens over all of them."
    effective_batch: str | None = None
    "Samples (`3840`, `4k samples`) or tokens (`2M tokens`, `2M`) per optimizer step: sets grad_accum from the micro-batch and the processes (printed)."
    lr: float = Field(2e-4, gt=0)
    "Peak learning rate."
    weight_decay: float = Field(0.0, ge=0)
    "AdamW weight decay (not applied to biases, norms or LoRA)."
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999])
    "AdamW betas."
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    "Learning-rate schedule after warm-up."
    warmup: float = Field(0.03, ge=0)
    "Warm-up: a fraction of all steps if < 1, else a number of steps."
    min_lr_ratio: float = 0.0
    "Cosine/linear decay ends at lr * min_lr_ratio."
    max_grad_norm: float = Field(1.0, ge=0)
    "Clip the global gradient norm (0 = no clipping)."
    speed: Annotated[Literal["auto", "off"], BeforeValidator(lambda v: "off" if v is False else v)] = "auto"
    "`auto`: the train/bench/estimate/quickstart commands choose the unset precision, model.frozen_dtype, loss_chunk, checkpointing and micro-batch × grad_accum from measured matmul peaks and the estimate against free memory, and print why; `off` (YAML's false too): as written."
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    "Compute precision (autocast); master weights stay fp32."
    activation_checkpointing: bool = False
    "Recompute layer activations in backward to save memory."
    checkpoint_every: int = Field(1, gt=0)
    "With activation checkpointing: checkpoint every N-th layer (1 = all; 2 = half: less recompute, more memory)."
    compile: bool = False
    "Compile each decoder layer with torch.compile (regional; on a CPU it needs a C++ compiler)."
    adamw: Literal["fused", "foreach", "loop"] = "fused"
    "AdamW implementation: `fused` (one kernel over all tensors), `foreach` (grouped ops) or `loop`."
    seed: int = 0
    "Seed for initialisation, shuffling and dropout."
    device: str = "auto"
    "`auto`, `cpu`, `cuda` or `cuda:N`."
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    "With several processes: `ddp` (replicas, gradients summed) or `fsdp` (FSDP2 sharding); auto = fsdp on CUDA, ddp on CPU."
    dist_timeout: int = Field(600, gt=0)
    "Seconds a collective may wait before the job fails (a dead rank takes the job down)."
    threads: int = Field(0, ge=0)
    "CPU threads (0 = number of physical cores)."
    loss_chunk: int = Field(1024, ge=0)
    "Tokens per chunk of the lm_head + cross-entropy, recomputed in backward (the full logits are never materialised); 0 = one piece."
    loss_kernel: Literal["auto", "chunked", "fused", "liger"] = "auto"
    "lm_head + cross-entropy: `chunked` (loss_chunk tokens a piece, recomputed in backward), `fused` (gradients in the forward, chunk by chunk: no recompute, no full logits), `liger` (Liger's kernel, CUDA, optional); auto = on CUDA liger when installed, else fused; on a CPU chunked."
    eval_every: int = Field(0, ge=0)
    "Validation loss every N steps (0 = only at the end)."
    eval_batches: int = Field(0, ge=0)
    "Validation micro-batches per evaluation (0 = all)."
    log_every: int = Field(1, gt=0)
    "Write metrics every N steps."
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])
    "Experiment trackers that get every metrics.jsonl row: `tensorboard` (`<run>/tb`), `mlflow` (file store `<run>/mlruns`, or MLFLOW_TRACKING_URI), `wandb` (offline run in `<run>/wandb` unless WANDB_MODE is set); a resume continues their runs; `[]` = metrics.jsonl alone. Naming one that is not installed stops the run at start (TensorBoard alone, the default, is then skipped)."
    save_every: int = Field(0, ge=0)
    "Checkpoint every N steps (0 = only at the end)."
    keep_last: int = Field(2, gt=0)
    "Checkpoints to keep (besides the newest healthy one and the best by validation loss, always kept)."
    divergence_patience: int = Field(3, ge=0)
    "Steps a collapse (gradient norm 0, loss at ln(vocab)) or an unrecovered loss spike may last before the run stops (0 = never stop for those; NaN/Inf always stop)."

    @model_validator(mode="after")
    def _two_betas(self):
        if len(self.betas) != 2:
            raise invalid(f"expected two numbers, got {self.betas}", "betas")
        if self.effective_batch is not None:
            try:
                parse_effective_batch(self.effective_batch)
            except ValueError as e:
                raise invalid(str(e), "effective_batch") from None
        return self


_SCALES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_effective_batch(text: str) -> tuple[int, str]:
    """`train.effective_batch` as (count, "samples" | "tokens"). A bare number counts samples, as the
    SFT literature writes them (3840); a k/M/B suffix without a unit counts tokens, as pre-training
    batch sizes are written (2M); `samples`/`tokens` says it outright."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMbBgG]?)\s*(tokens?|samples?)?\s*", str(text))
    if not m:
        raise ValueError(f"`{text}` is not a batch size: write e.g. 3840 (samples), `4k samples` or `2M tokens`")
    count = float(m[1]) * _SCALES[m[2].lower()]
    if count < 1 or count != int(count):
        raise ValueError(f"`{text}` is not a whole number of samples or tokens (at least 1)")
    unit = ("tokens" if m[3].startswith("token") else "samples") if m[3] else ("tokens" if m[2] else "samples")
    return int(count), unit


class EvalConfig(Config):
    task: str | None = None
    "A task measured during training and by quickstart: sql, json, translate-XX, humaneval, or a JSONL task file."
    metric: str | None = None
    "Metric for a JSONL task file (exact_match, contains, bleu, chrf, chrf++, sql, python)."
    every: int = Field(0, ge=0)
    "Measure the task every N steps and at the end of training (0 = not during training)."
    split: str = "validation"
    "Split measured during training (quickstart measures `test`)."
    limit: int | None = Field(50, gt=0)
    "Examples per measurement (None = the whole split)."
    max_new_tokens: int = Field(128, gt=0)
    "Longest generated answer."
    batch_size: int = Field(16, gt=0)
    "Prompts generated together."
    seed: int = 0
    "Seed of the built-in task's generator."


# recipe stages: each stage overrides some keys of the data, train and eval sections


class _Partial(Config):
    """Some keys of a section, each unset (None) unless given; the saved form holds the given ones."""

    @model_serializer(mode="wrap")
    def _given_only(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


def partial(section: type[Config], name: str) -> type[Config]:
    """`section` with every field optional and unset: a stage's overrides, checked as the section
    checks them (bounds, allowed values, unknown keys with the nearest valid one)."""
    fields: dict[str, Any] = {}
    for key, info in section.model_fields.items():
        tp = info.annotation | None
        fields[key] = (Annotated[(tp, *info.metadata)] if info.metadata else tp, Field(None, description=info.description))
    return create_model(name, __base__=_Partial, __doc__=f"A stage's overrides of {section.__name__}.",
                        __module__=__name__, **fields)


StageData = partial(DataConfig, "StageData")
StageTrain = partial(TrainConfig, "StageTrain")
StageEval = partial(EvalConfig, "StageEval")


class StageConfig(Config):
    name: str = ""
    "The stage's name and run folder (`<run>/<name>`); empty: `stage1`, `stage2` ..."
    data: StageData = Field(default_factory=StageData)
    "This stage's data keys (any of `data.*`), over the recipe's data section."
    train: StageTrain = Field(default_factory=StageTrain)
    "This stage's training keys (any of `train.*`: lr, schedule, steps, epochs ...), over the recipe's train section."
    eval: StageEval = Field(default_factory=StageEval)
    "This stage's evaluation keys (any of `eval.*`), over the recipe's eval section."

    @model_validator(mode="after")
    def _folder_name(self):
        if self.name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise invalid(f"`{self.name}` is not a folder name: use letters, digits, `.`, `_`, `-`", "name")
        return self


__all__ = ["RecipeError", "Config", "OneOf", "one_of", "invalid", "nearest", "describe", "bare", "ModelConfig",
           "DataConfig", "TrainConfig", "EvalConfig", "COLUMN_ROLES", "StageConfig", "parse_effective_batch"]
