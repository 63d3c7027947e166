"""The recipe: one typed schema, mirrored by a YAML file, overridden by `a.b=c` on the command line.

Every field has a default that works and a one-line doc (the string right under it, which
`tunesmith recipe --help` and the README reference print). Unknown keys are errors that name
the nearest valid key; bad values name the field and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class RecipeError(ValueError):
    """A mistake in a recipe or an override: the message says which field and what is allowed."""


# --------------------------------------------------------------------------------------------------
# the schema


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    "A local HF folder, a .gguf file, a hub id already in the local HF cache, or `smollm2-135m-instruct`."
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    "Dtype the weights are stored in. Trainable weights stay fp32 whatever the compute precision."
    frozen_dtype: Literal["same", "bf16", "fp16"] = "same"
    "Store frozen base weights in this dtype (saves memory for LoRA); `same` keeps `dtype`."
    adapter: str | None = None
    "Start from this adapter (an adapter folder, a PEFT LoRA or a run folder), e.g. an SFT stage's, and keep training it."
    attention: Literal["packed", "sdpa", "eager"] = "packed"
    "Training attention: `packed` runs sdpa per sample (no O(T²) mask); `sdpa`/`eager` use a block-causal mask."


@dataclass(kw_only=True)
class DataConfig:
    train: str = ""
    "Training file (.jsonl, .json, .csv, .parquet) or an HF `save_to_disk` folder."
    validation: str | None = None
    "Validation file; if unset, `val_fraction` of the training records are held out."
    val_fraction: float = 0.0
    "Fraction of training records held out for validation when no validation file is given."
    format: Literal["auto", "text", "instruction", "chat", "preference"] = "auto"
    "Record format; `auto` picks preference if `chosen`/`rejected` exist, chat if `messages`, instruction if `instruction`/`output`, else text."
    columns: dict[str, str] = field(default_factory=dict)
    "Column mapping, e.g. {messages: conversation, output: response}; keys: text, instruction, input, output, system, messages, prompt, chosen, rejected."
    system_prompt: str | None = None
    "System prompt added to chat/instruction records that have none."
    train_on_prompt: bool = False
    "Also train on prompt (system/user) tokens, not only on assistant tokens."
    assistant_turns: Literal["all", "last"] = "all"
    "Which assistant turns carry loss in multi-turn chats."
    max_length: int = 1024
    "Longest sample in tokens."
    overflow: Literal["truncate", "drop"] = "truncate"
    "What to do with a sample longer than max_length."
    packing: bool = True
    "Pack samples into rows of `train.batch_tokens` with per-sample attention isolation; else pad."
    shuffle: bool = True
    "Shuffle samples every epoch (seeded)."
    limit: int | None = None
    "Use only the first N records (quick experiments)."


@dataclass(kw_only=True)
class LoraConfig:
    rank: int = 16
    "LoRA rank r."
    alpha: float = 32.0
    "LoRA alpha; the update is scaled by alpha/r (or alpha/sqrt(r) with rslora)."
    dropout: float = 0.0
    "Dropout on the LoRA input."
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    "Module names or regexes to adapt; `all-linear` = every Linear in the decoder layers (not lm_head)."
    rslora: bool = False
    "Rank-stabilised scaling alpha/sqrt(r) (Kalajdzievski, 2023)."
    dora: bool = False
    "DoRA (Liu et al., 2024): train a per-output magnitude and the LoRA direction of W + s·BA separately."
    plus_ratio: float = 1.0
    "LoRA+ (Hayou et al., 2024): B learns this many times faster than A (the paper suggests 16); 1 = plain LoRA."
    init: Literal["default", "pissa"] = "default"
    "`default`: A Kaiming, B zero. `pissa` (Meng et al., 2024): A, B from the top-r singular vectors of W, which keeps the residual."


@dataclass(kw_only=True)
class FullConfig:
    train_embeddings: bool = True
    "Train the token embeddings (and a tied lm_head)."


@dataclass(kw_only=True)
class FreezeConfig:
    modules: list[str] = field(default_factory=list)
    "Parameter names or regexes that train (e.g. `mlp`, `layers\\.1\\.self_attn`); empty = use `layers`."
    layers: int = 2
    "Train the top-k decoder layers whole (used when `modules` is empty)."
    embeddings: bool = False
    "Also train the token embeddings (and a tied lm_head)."
    norms: bool = False
    "Also train every norm layer."
    lm_head: bool = False
    "Also train the output head (an untied lm_head; a tied one trains with `embeddings`)."


@dataclass(kw_only=True)
class HftConfig:
    redraw: Literal["stage", "epoch"] = "stage"
    "Draw the trained half once per training stage (the paper), or afresh every epoch."
    seed: int | None = None
    "Seed of the draw; None uses train.seed."
    embeddings: bool = False
    "Also train the token embeddings (HFT leaves this open; frozen by default)."
    norms: bool = False
    "Also train every norm layer."
    lm_head: bool = False
    "Also train an untied output head."


@dataclass(kw_only=True)
class SparseConfig:
    density: float = 0.01
    "Fraction of each target matrix's entries that train (SpIEL's default 1%)."
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    "Linear layers that get sparse deltas, as for LoRA."
    reselect_every: int = 20
    "S: every S optimizer steps, prune and regrow the active entries."
    accumulate_steps: int = 5
    "A: steps over which the growth criterion is accumulated before the swap."
    regrow: float = 0.2
    "Fraction of active entries swapped at a reselection, decaying linearly to 0 over the run."
    criterion: Literal["ag", "ma"] = "ag"
    "`ag`: AdamW, grow by accumulated gradients; `ma`: SM3 (O(d_in+d_out) state per matrix; paper lr 4e-4 to 2e-3), grow by its row×column statistic."
    weight_decay: float = 1.0
    "Pull toward the pretrained weights: values decay by lr·wd each step (SpIEL: wd 1-30 at lr 1e-5)."


@dataclass(kw_only=True)
class AdapterConfig:
    form: Literal["sequential", "parallel"] = "parallel"
    "`sequential` takes the sublayer's output (Houlsby, Pfeiffer); `parallel` its input (He et al., 2022)."
    sublayers: list[Literal["attn", "ffn"]] = field(default_factory=lambda: ["ffn"])
    "Where: after/beside attention, the FFN, or both (Houlsby = sequential at both, Pfeiffer = sequential at ffn)."
    bottleneck: int = 64
    "Bottleneck width of the down/up projection."
    scale: float = 4.0
    "s in h + s·f(x W_down) W_up; 1 = plain add, 4 = He et al.'s scaled parallel adapter."


@dataclass(kw_only=True)
class PrefixConfig:
    length: int = 30
    "Number of prefix key/value vectors per layer."
    reparam: bool = True
    "Train through an MLP reparameterisation (Li & Liang, 2021), folded into plain prefixes at save."
    hidden: int = 512
    "Hidden width of the reparameterisation MLP."


@dataclass(kw_only=True)
class Ia3Config:
    targets: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    "Linear layers whose activations get a learned scale (IA3: keys, values and the FFN)."
    feedforward: list[str] = field(default_factory=lambda: ["down_proj"])
    "Of those, the ones scaled on their input (the FFN's inner activation) rather than their output."


@dataclass(kw_only=True)
class MamConfig:
    prefix_length: int = 30
    "Prefix vectors on attention (He et al., 2022: 30)."
    prefix_hidden: int = 512
    "Hidden width of the prefix reparameterisation MLP."
    prefix_reparam: bool = True
    "Train the prefixes through the MLP (folded into plain prefixes at save)."
    bottleneck: int = 512
    "Bottleneck of the scaled parallel adapter on the FFN (He et al., 2022: 512)."
    scale: float = 4.0
    "Scale s of the parallel adapter."


@dataclass(kw_only=True)
class LongLoraConfig:
    rank: int = 8
    "LoRA rank on attention."
    alpha: float = 16.0
    "LoRA alpha."
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    "Attention projections that get LoRA."
    embeddings: bool = True
    "Train the token embeddings (LongLoRA: yes)."
    norms: bool = True
    "Train every norm layer (LongLoRA: yes)."


@dataclass(kw_only=True)
class MethodConfig:
    name: Literal["lora", "full", "freeze", "hft", "sparse", "adapter", "prefix", "ia3", "mam", "longlora"] = "lora"
    "Tuning method; its block below sets its options (`tunesmith methods` lists them with their sizes)."
    lora: LoraConfig = field(default_factory=LoraConfig)
    "Options of `lora` (also rsLoRA, DoRA, LoRA+ and PiSSA)."
    full: FullConfig = field(default_factory=FullConfig)
    "Options of `full`."
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    "Options of `freeze`: train chosen modules or the top layers, the rest frozen."
    hft: HftConfig = field(default_factory=HftConfig)
    "Options of `hft`, Half Fine-Tuning (Hui et al., 2024)."
    sparse: SparseConfig = field(default_factory=SparseConfig)
    "Options of `sparse`, SpIEL sparse fine-tuning (Ansell et al., 2024)."
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    "Options of `adapter`: bottleneck adapters, sequential or (scaled) parallel."
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    "Options of `prefix`, prefix tuning (Li & Liang, 2021)."
    ia3: Ia3Config = field(default_factory=Ia3Config)
    "Options of `ia3` (Liu et al., 2022)."
    mam: MamConfig = field(default_factory=MamConfig)
    "Options of `mam`: prefix on attention + scaled parallel adapter on the FFN (He et al., 2022)."
    longlora: LongLoraConfig = field(default_factory=LongLoraConfig)
    "Options of `longlora`'s trainable set: LoRA on attention + embeddings and norms (Chen et al., 2024)."


# β of each preference loss when `objective.preference.beta` is null, from its paper: DPO 0.1
# (Rafailov et al., 2023); SimPO 2.0 (Meng et al., 2024, "2.0 or 2.5"; at 0.1 its length-normalised
# reward barely moves); IPO and hinge 0.1 (TRL's default: neither paper fixes one value on this
# scale); ORPO's loss has no β (its λ is `orpo_lambda`), 0.1 scales only its logged rewards.
PREFERENCE_BETA = {"dpo": 0.1, "ipo": 0.1, "hinge": 0.1, "simpo": 2.0, "orpo": 0.1}


@dataclass(kw_only=True)
class PreferenceConfig:
    beta: float | None = None
    "β: KL strength (dpo, ipo, hinge) or reward scale (simpo); null = the loss's paper default (simpo 2.0, others 0.1), resolved in the printed recipe."
    gamma: float = 0.5
    "SimPO's target reward margin as a fraction of β (γ = gamma·β; the paper's 0.5: γ = 1.0 at β = 2.0)."
    orpo_lambda: float = 0.1
    "ORPO's weight of the odds-ratio term next to the SFT loss on the chosen answer."
    label_smoothing: float = 0.0
    "Conservative DPO: the probability that a preference label is flipped."
    reference: Literal["auto", "adapter_off", "copy", "none"] = "auto"
    "Reference model: the base with the LoRA switched off, a frozen copy (full tuning), or none (SimPO, ORPO)."
    precompute_reference: bool = False
    "Compute reference log-probs once before training (frees the reference during training)."


@dataclass(kw_only=True)
class GrpoConfig:
    task: str = "sql"
    "Prompts and verifier: a built-in task (sql, json, humaneval) or a JSONL task file."
    reward: list[str] = field(default_factory=lambda: ["task"])
    "Reward functions summed: task (the task's verifier), exact_match, format, or module:function."
    samples: int = 8
    "Completions per prompt (the group)."
    prompts_per_step: int = 4
    "Prompts per optimizer step."
    temperature: float = 1.0
    "Sampling temperature of the completions."
    max_new_tokens: int = 96
    "Longest completion."
    epsilon: float = 0.2
    "Clip range of the importance ratio."
    kl_beta: float = 0.0
    "Weight of the KL penalty to the reference (0 = none)."
    iterations: int = 1
    "Optimizer steps on each batch of completions (the ratio is 1 on the first)."
    scale_rewards: bool = True
    "Divide advantages by the group's reward std (False: Dr. GRPO)."
    split: str = "train"
    "Task split the prompts come from."


@dataclass(kw_only=True)
class ObjectiveConfig:
    name: Literal["sft", "dpo", "ipo", "hinge", "simpo", "orpo", "grpo"] = "sft"
    "Training objective: causal LM (SFT), a preference loss, or GRPO."
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    "Options of the preference objectives (dpo, ipo, hinge, simpo, orpo)."
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    "Options of grpo."


@dataclass(kw_only=True)
class TrainConfig:
    epochs: float = 1.0
    "Passes over the training data (ignored when `steps` is set)."
    steps: int | None = None
    "Optimizer steps to run; overrides `epochs`."
    batch_tokens: int = 4096
    "Token budget of one micro-batch (packed: one or more rows of at most this many tokens)."
    batch_size: int = 8
    "Samples per micro-batch when packing is off."
    grad_accum: int = 1
    "Micro-batches per optimizer step; the loss is normalised by trained tokens over all of them."
    lr: float = 2e-4
    "Peak learning rate."
    weight_decay: float = 0.0
    "AdamW weight decay (not applied to biases, norms or LoRA)."
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    "AdamW betas."
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    "Learning-rate schedule after warm-up."
    warmup: float = 0.03
    "Warm-up: a fraction of all steps if < 1, else a number of steps."
    min_lr_ratio: float = 0.0
    "Cosine/linear decay ends at lr * min_lr_ratio."
    max_grad_norm: float = 1.0
    "Clip the global gradient norm (0 = no clipping)."
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    "Compute precision (autocast); master weights stay fp32."
    activation_checkpointing: bool = False
    "Recompute layer activations in backward to save memory."
    checkpoint_every: int = 1
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
    dist_timeout: int = 600
    "Seconds a collective may wait before the job fails (a dead rank takes the job down)."
    threads: int = 0
    "CPU threads (0 = number of physical cores)."
    loss_chunk: int = 1024
    "Tokens per chunk of the lm_head + cross-entropy, recomputed in backward (the full logits are never materialised); 0 = one piece."
    eval_every: int = 0
    "Validation loss every N steps (0 = only at the end)."
    eval_batches: int = 0
    "Validation micro-batches per evaluation (0 = all)."
    log_every: int = 1
    "Write metrics every N steps."
    save_every: int = 0
    "Checkpoint every N steps (0 = only at the end)."
    keep_last: int = 2
    "Checkpoints to keep (besides the newest healthy one and the best by validation loss, always kept)."
    divergence_patience: int = 3
    "Steps a collapse (gradient norm 0, loss at ln(vocab)) or an unrecovered loss spike may last before the run stops (0 = never stop for those; NaN/Inf always stop)."


@dataclass(kw_only=True)
class EvalConfig:
    task: str | None = None
    "A task measured during training and by quickstart: sql, json, humaneval, or a JSONL task file."
    metric: str | None = None
    "Metric for a JSONL task file (exact_match, contains, bleu, chrf, sql, python)."
    every: int = 0
    "Measure the task every N steps and at the end of training (0 = not during training)."
    split: str = "validation"
    "Split measured during training (quickstart measures `test`)."
    limit: int | None = 50
    "Examples per measurement (None = the whole split)."
    max_new_tokens: int = 128
    "Longest generated answer."
    batch_size: int = 16
    "Prompts generated together."
    seed: int = 0
    "Seed of the built-in task's generator."


@dataclass(kw_only=True)
class Recipe:
    name: str = "run"
    "Run name; the run folder is `<output_dir>/<name>`."
    output_dir: str = "runs"
    "Where run folders go."
    resume: bool = False
    "Continue from the newest checkpoint in the run folder."
    nproc: int = 1
    "Processes on this node: `tunesmith train` relaunches itself under torchrun when > 1."
    model: ModelConfig = field(default_factory=ModelConfig)
    "The base model."
    data: DataConfig = field(default_factory=DataConfig)
    "The training data."
    method: MethodConfig = field(default_factory=MethodConfig)
    "The tuning method."
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    "What the training minimises."
    train: TrainConfig = field(default_factory=TrainConfig)
    "The training loop."
    eval: EvalConfig = field(default_factory=EvalConfig)
    "Task evaluation during training."

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# --------------------------------------------------------------------------------------------------
# building a recipe from dicts, with errors that help


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _nearest(key: str, options) -> str:
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f"; did you mean `{match[0]}`?" if match else f"; valid keys: {', '.join(sorted(options))}"


def _coerce(path: str, tp, value):
    """Check (and gently convert) `value` against the annotation `tp`; raise RecipeError naming `path`."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(path, arg, value)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{path}: {value!r} is not allowed; choose one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a mapping of options, got {value!r}")
        return _build(tp, value, path + ".")
    if origin is list:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{path}: expected a list, got {value!r}")
        return [_coerce(f"{path}[{i}]", args[0], v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a mapping, got {value!r}")
        return {str(k): _coerce(f"{path}.{k}", args[1], v) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise RecipeError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise RecipeError(f"{path}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise RecipeError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise RecipeError(f"{path}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise RecipeError(f"{path}: expected a string, got {value!r}")
    return value


def _build(cls, values: dict, prefix: str = ""):
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise RecipeError(f"unknown recipe key `{prefix}{key}`{_nearest(key, names)}")
        kwargs[key] = _coerce(prefix + key, hints[key], value)
    obj = cls(**kwargs)
    _validate(obj, prefix)
    return obj


def _validate(obj, prefix: str) -> None:
    def positive(name, allow_zero=False):
        v = getattr(obj, name)
        if v is not None and (v < 0 or (v == 0 and not allow_zero)):
            raise RecipeError(f"{prefix}{name}: must be {'>= 0' if allow_zero else '> 0'}, got {v}")

    if isinstance(obj, Recipe):
        positive("nproc")
    if isinstance(obj, TrainConfig):
        for n in ("batch_tokens", "batch_size", "grad_accum", "lr", "log_every", "keep_last", "dist_timeout",
                  "checkpoint_every"):
            positive(n)
        for n in ("eval_every", "save_every", "eval_batches", "threads", "warmup", "weight_decay", "max_grad_norm",
                  "loss_chunk", "divergence_patience"):
            positive(n, allow_zero=True)
        positive("steps")
        positive("epochs")
        if len(obj.betas) != 2:
            raise RecipeError(f"{prefix}betas: expected two numbers, got {obj.betas}")
    if isinstance(obj, DataConfig):
        positive("max_length")
        if not 0.0 <= obj.val_fraction < 1.0:
            raise RecipeError(f"{prefix}val_fraction: must be in [0, 1), got {obj.val_fraction}")
        allowed = {"text", "instruction", "input", "output", "system", "messages", "prompt", "chosen", "rejected"}
        for k in obj.columns:
            if k not in allowed:
                raise RecipeError(f"{prefix}columns: unknown column role `{k}`{_nearest(k, allowed)}")
    if isinstance(obj, EvalConfig):
        positive("every", allow_zero=True)
        positive("limit")
        positive("max_new_tokens")
        positive("batch_size")
    if isinstance(obj, LoraConfig):
        positive("rank")
        positive("alpha")
        positive("plus_ratio")
        if not 0.0 <= obj.dropout < 1.0:
            raise RecipeError(f"{prefix}dropout: must be in [0, 1), got {obj.dropout}")
    if isinstance(obj, FreezeConfig):
        positive("layers", allow_zero=True)
    if isinstance(obj, PreferenceConfig):
        positive("beta")
    if isinstance(obj, ObjectiveConfig) and obj.preference.beta is None and obj.name in PREFERENCE_BETA:
        obj.preference.beta = PREFERENCE_BETA[obj.name]  # the loss's own default, shown in the resolved recipe
    if isinstance(obj, SparseConfig):
        if not 0.0 < obj.density <= 1.0:
            raise RecipeError(f"{prefix}density: must be in (0, 1], got {obj.density}")
        if not 0.0 <= obj.regrow <= 1.0:
            raise RecipeError(f"{prefix}regrow: must be in [0, 1], got {obj.regrow}")
        positive("reselect_every")
        positive("accumulate_steps")
        positive("weight_decay", allow_zero=True)
        if obj.accumulate_steps >= obj.reselect_every:
            raise RecipeError(f"{prefix}accumulate_steps: must be < reselect_every ({obj.reselect_every}), "
                              f"got {obj.accumulate_steps}")
    if isinstance(obj, AdapterConfig):
        positive("bottleneck")
        positive("scale")
        if not obj.sublayers:
            raise RecipeError(f"{prefix}sublayers: name at least one of attn, ffn")
    if isinstance(obj, PrefixConfig):
        positive("length")
        positive("hidden")
    if isinstance(obj, MamConfig):
        for n in ("prefix_length", "prefix_hidden", "bottleneck", "scale"):
            positive(n)
    if isinstance(obj, LongLoraConfig):
        positive("rank")
        positive("alpha")


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
        node[parts[-1]] = _parse_scalar(text)
    return values


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe (or the defaults when `path` is None) and apply `a.b=c` overrides."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe file not found: {p}")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise RecipeError(f"{p}: a recipe is a mapping of sections (model, data, method, train)")
    apply_overrides(values, overrides or [])
    try:
        return _build(Recipe, values)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}" if path else str(e)) from None


def recipe_from_dict(values: dict) -> Recipe:
    return _build(Recipe, values)


def method_from_dict(name: str, options: dict, where: str = "method") -> MethodConfig:
    """A MethodConfig for method `name` with its options block (e.g. read from a saved adapter)."""
    return _build(MethodConfig, {"name": name, name: options}, f"{where}: ")


def to_dict(recipe) -> dict:
    return dataclasses.asdict(recipe)


def to_yaml(recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


def reference(cls=Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every field, for `tunesmith recipe --help` and the README."""
    import ast
    import inspect

    docs = {}
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = b.value.value
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += reference(tp, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((prefix + f.name, repr(default) if not isinstance(default, str) else default, docs.get(f.name, "")))
    return rows
