"""Getting a model ready to train and saving what a run produces: the seeded method set-up,
training mode (activation checkpointing, regional compile), generation-based evaluation during a
run, the final adapter or model, and the interrupt flag the harness checks between steps.
"""
from __future__ import annotations

import math
import os
import random
import signal
import threading
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import RopeConfig
from ..methods import attach, build_method, cast_frozen
from ..models.attention import use_attention, use_packed_attention
from ..models.load import DTYPES, load_model
from ..models.rope import apply_rope, describe_rope
from ..models.s2attn import use_s2_attention
from ..models.varlen import use_varlen_attention
from . import checkpoint as ckpt
from ..runtime import autocast
from .safety import TrainError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_model(recipe, model=None, tokenizer=None):
    """Load the model, apply the method, mark trainable parameters; returns (model, tokenizer, method)."""
    if model is None:
        model, loaded_tokenizer = _load(recipe)
        tokenizer = tokenizer or loaded_tokenizer
    # before the method: an adapter records the positions it trained with
    rope = apply_rope(model, rope_config(recipe, model))
    attention = training_attention(recipe)
    if attention == "packed":
        use_packed_attention(model)
    elif attention == "varlen":
        use_varlen_attention(model)
    elif attention == "s2":
        use_s2_attention(model, recipe.model.s2_group)
    else:
        use_attention(model, attention)
    torch.manual_seed(recipe.train.seed)  # the method's initialisation is part of the seeded run
    if recipe.model.adapter:
        from ..export.tuned import load_tuned, read_method

        saved, meta = read_method(recipe.model.adapter)
        if saved.name != recipe.method.name:
            raise TrainError(f"model.adapter {recipe.model.adapter} holds a `{saved.name}` adapter: continuing it "
                             f"needs method.name={saved.name} (the recipe says {recipe.method.name})")
        if rope is not None and meta.get("rope") not in (None, rope):
            raise TrainError(f"model.rope.*: the adapter at {recipe.model.adapter} was trained with other RoPE "
                             f"positions ({describe_rope(meta['rope'])}); drop model.rope.* to continue with its own")
        method, recipe.method = load_tuned(model, recipe.model.adapter)  # the adapter's own options win
    else:
        method = build_method(recipe.method)
        attach(model, method)
    if getattr(recipe.model, "quantize", "none") != "none":  # QLoRA: the frozen base's Linears stored quantised
        from ..models.quant import QuantError, quantize_frozen

        try:
            quantize_frozen(model, recipe.model.quantize)
        except QuantError as e:
            raise TrainError(str(e)) from None
    if recipe.model.frozen_dtype != "same":
        base_trained = [n for n in method.trained_names if n in method.base_keys]
        frozen = any(not p.requires_grad and p.is_floating_point() for p in model.parameters())
        if base_trained and frozen and recipe.train.precision == "fp32":
            raise TrainError(f"model.frozen_dtype={recipe.model.frozen_dtype} with train.precision=fp32: method "
                             f"`{method.name}` trains base weights ({base_trained[0]}, ...), which stay fp32 beside "
                             f"{recipe.model.frozen_dtype} frozen ones; train under autocast "
                             f"(train.precision={recipe.model.frozen_dtype}) or set model.frozen_dtype=same")
        cast_frozen(model, DTYPES[recipe.model.frozen_dtype])
    for p in model.parameters():  # master weights of everything that trains stay fp32
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model, tokenizer, method


def training_attention(recipe) -> str:
    """model.attention, or `s2` for a method that trains with S²-Attn (longlora.shifted_attention);
    `packed` becomes `varlen` (one variable-length kernel call per layer, no per-row gather) when the
    run is on CUDA and such a kernel is installed, except for prefix tuning (its keys need `packed`)."""
    options = getattr(recipe.method, recipe.method.name, None)
    if getattr(options, "shifted_attention", False):
        return "s2"
    prefix = any(name in recipe.method.name for name in ("prefix", "mam"))  # methods with prefix keys
    if recipe.model.attention == "packed" and not prefix and _on_cuda(recipe):
        from ..models.varlen import cuda_varlen_available

        return "varlen" if cuda_varlen_available() else "packed"
    return recipe.model.attention


def _on_cuda(recipe) -> bool:
    device = recipe.train.device
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def rope_config(recipe, model) -> RopeConfig:
    """model.rope, or when it asks for nothing and the method has a `target_length` (LongLoRA) beyond the
    model's context, position interpolation to it: linear scaling by ⌈target / original⌉ (Chen et al., 2024)."""
    target = getattr(getattr(recipe.method, recipe.method.name, None), "target_length", None)
    if target is None or recipe.model.rope != RopeConfig():
        return recipe.model.rope
    original = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if original is None:
        raise TrainError(f"{recipe.method.name}.target_length: the model config has no max_position_embeddings "
                         "to interpolate from; set model.rope.* instead")
    if target <= original:
        return recipe.model.rope
    return RopeConfig(scaling="linear", factor=math.ceil(target / original))


def _load(recipe):
    """(model, tokenizer): the causal LM, or for an objective that trains embeddings (`loads =
    "embedder"`) an encoder as transformers' AutoModel or a decoder as its causal LM."""
    from ..objectives import objective_class

    if getattr(objective_class(recipe.objective.name), "loads", None) == "embedder":
        from ..models.embedding import load_any

        return load_any(recipe.model.name, recipe.model.dtype)
    return load_model(recipe.model.name, recipe.model.dtype)


def decoder_layers(model) -> list:
    """The transformer blocks (each becomes its own FSDP group): a decoder's `layers`, a BERT-like
    encoder's `encoder.layer`."""
    from ..models.embedding import body

    inner = body(model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        layers = getattr(getattr(inner, "encoder", None), "layer", [])
    return list(layers)


def training_mode(model, cfg) -> None:
    """Switch the model to training as the recipe asks: activation checkpointing on every
    `checkpoint_every`-th decoder layer (1 = all; selective checkpointing trades memory for less
    recompute), regional compilation (each decoder layer compiled; identical layers share the
    compiled code), no KV cache."""
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for i, layer in enumerate(decoder_layers(model)):
            if hasattr(layer, "gradient_checkpointing"):
                layer.gradient_checkpointing = i % max(cfg.checkpoint_every, 1) == 0
    if cfg.compile:  # TUNESMITH_COMPILE_BACKEND=aot_eager traces without generating kernels (debugging, tests)
        backend = os.environ.get("TUNESMITH_COMPILE_BACKEND", "inductor")
        for layer in decoder_layers(model):
            layer.compile(dynamic=True, backend=backend)
    model.config.use_cache = False
    model.train()


def evaluate_task(model, tokenizer, recipe):
    """Measure the recipe's eval task with the model as it is now (stock attention for generation)."""
    from ..eval.runner import evaluate as run_eval, get_eval_task
    from ..infer.domains import domain_route

    cfg = recipe.eval
    task = get_eval_task(cfg.task, cfg.metric, seed=cfg.seed)
    training_attention = model.config._attn_implementation
    use_attention(model, "sdpa")
    try:  # one expert per data domain: the task's own expert, as `tunesmith eval` picks it
        with autocast(model.device, recipe.train.precision), \
                domain_route(model, None, model_path=recipe.run_dir, default=cfg.task):
            return run_eval(model, tokenizer, task, split=cfg.split, limit=cfg.limit,
                            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, progress=False)
    finally:
        model.set_attn_implementation(training_attention)
        model.train()


def save_output(recipe, model, tokenizer, method, dist=None, objective=None) -> Path | None:
    """An adapter method → `<run>/adapter` (its delta, plus PEFT's layout where PEFT has the method);
    a method that trains base weights (full, freeze, hft) → a transformers folder in `<run>/model`.
    Under FSDP the ranks gather the full weights into rank 0's model, which writes them. An
    objective with `save_beside(folder, model)` (embeddings: the spec and the projector) writes its
    files into that folder; what it adds to the model (`held_out`) stays out of the weights."""
    if dist is not None and dist.strategy == "fsdp" and dist.active:
        ckpt.unshard_in_place(model, dist)
    if dist is not None and not dist.main:
        return None
    model = model.to("cpu") if model.device.type != "cpu" else model
    use_attention(model, "sdpa")  # what a saved model should run with
    if not hasattr(objective, "save_beside"):
        return _write_output(recipe, model, tokenizer, method)
    with objective.held_out(model):
        folder = _write_output(recipe, model, tokenizer, method)
    objective.save_beside(folder, model)
    return folder


def _write_output(recipe, model, tokenizer, method) -> Path:
    run_dir = recipe.run_dir
    if method.output == "adapter":
        from ..export.tuned import save_tuned

        return save_tuned(model, method, recipe.model.name, run_dir / "adapter")
    from ..export.atomic import atomic_folder

    with atomic_folder(run_dir / "model", "config.json") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return run_dir / "model"


class Interrupt:
    """Turn the first SIGINT/SIGTERM into a flag checked between steps; a second one aborts."""

    def __init__(self):
        self.requested = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        tqdm.write(f"[tunesmith] {self.requested}: finishing this step, then writing a checkpoint "
                   "(press again to abort without one)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
