"""An upcycled Llama (or Mistral) with a learned router in every layer as a transformers Mixtral folder.

Sparse upcycling with `routing: learned` in *every* layer (method `moe`, `models.moe`) computes
exactly what Mixtral's architecture computes: per layer, softmax router over E experts, the top-k
renormalised, each expert a SwiGLU MLP, attention and norms as in Llama. So such a model exports as a
`MixtralForCausalLM` folder that `AutoModelForCausalLM.from_pretrained` loads with no tunesmith, its
logits equal to ours (tests/test_moe.py). The weights are written in the Hub's Mixtral layout, which
transformers 4 and 5 (it fuses the experts on load), vLLM and llama.cpp's converter all read:

    model.layers.{i}.block_sparse_moe.gate.weight          (E, d)   our `mlp.router.weight`
    model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight          expert e's gate_proj
    model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight          expert e's up_proj
    model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight          expert e's down_proj

Every other key keeps its Llama name. Training-only router settings do not carry over: Mixtral has no
capacity limit (our capacity applies in training only, so inference is dropless either way) and its
jitter is written as 0. What has no transformers architecture — some layers upcycled, enforced
(per-domain) routing, a BERT encoder, a family with biases or another MLP — stays in tunesmith's
adapter folder, which `--adapter` loads for generate, chat, eval and serve. A learned-router MoE-LoRA
(method `moe_lora`) in every layer exports the same way once `methods.moe_lora.expand` has merged each
expert's LoRA into its own copy of the shared MLP.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tunesmith.methods.moe_lora import expand
from tunesmith.models.load import DTYPES, load_model, resolve
from tunesmith.models.moe import MoEMLP, TopKRouter

from .atomic import ExportError, atomic_folder
from .tuned import load_tuned, read_method

MOE_METHODS = ("moe", "moe_lora")  # moe_lora exports through `expand`: E full experts, LoRA merged in
FAMILIES = ("llama", "mistral")  # Mixtral = either one with MoE MLPs (Mistral adds the sliding window)
SHARED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
          "rms_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
          "attention_dropout", "rope_parameters", "sliding_window")
KEEP_AS_ADAPTER = ("it has no transformers architecture: keep the adapter folder, which tunesmith loads "
                   "(generate/chat/eval/serve --adapter)")


def is_moe_adapter(adapter_dir) -> bool:
    """Whether an adapter folder holds an MoE upcycling (`tunesmith export` then writes Mixtral)."""
    return read_method(adapter_dir)[0].name in MOE_METHODS


def mixtral_state(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(MixtralConfig keyword arguments, state dict in the Hub's Mixtral layout) of an upcycled model;
    ExportError naming what stands in the way when it is not Mixtral's computation."""
    config = model.config
    if config.model_type not in FAMILIES:
        raise ExportError(f"a `{config.model_type}` model upcycled into experts is not Mixtral (which is Llama/"
                          f"Mistral with MoE MLPs): {KEEP_AS_ADAPTER}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ExportError(f"this model has biases in attention or MLP, which Mixtral lacks: {KEEP_AS_ADAPTER}")
    layers = model.model.layers
    moes = [getattr(layer, "mlp", None) for layer in layers]
    if not all(isinstance(m, MoEMLP) and isinstance(m.router, TopKRouter) for m in moes):
        upcycled = [m for m in moes if isinstance(m, MoEMLP)]
        enforced = " (enforced routing)" if upcycled and not any(m.router for m in upcycled) else ""
        raise ExportError(f"Mixtral needs a learned router in every layer; this model has {len(upcycled)} MoE layers "
                          f"of {len(moes)}{enforced}: {KEEP_AS_ADAPTER}")
    shapes = {(m.n_experts, m.router.k) for m in moes}
    if len(shapes) != 1:
        raise ExportError(f"Mixtral needs the same experts and top-k in every layer, found {sorted(shapes)}")
    n_experts, k = shapes.pop()
    kwargs = {key: getattr(config, key) for key in SHARED if getattr(config, key, None) is not None}
    kwargs.update(num_local_experts=n_experts, num_experts_per_tok=k, router_jitter_noise=0.0)
    state = {n: t for n, t in model.state_dict().items() if ".mlp." not in n}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for i, m in enumerate(moes):
        state.update(_expert_keys(m, f"model.layers.{i}.block_sparse_moe"))
    return kwargs, state


def _expert_keys(moe: MoEMLP, prefix: str) -> dict[str, torch.Tensor]:
    out = {f"{prefix}.gate.weight": moe.router.weight.detach()}
    for e in range(moe.n_experts):
        expert = moe.expert(e)
        for ours, theirs in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            linear = getattr(expert, ours, None)
            if not isinstance(linear, nn.Linear) or linear.bias is not None:
                raise ExportError(f"expert {e} has no bias-free `{ours}` Linear (a SwiGLU MLP), so it is not a "
                                  f"Mixtral expert: {KEEP_AS_ADAPTER}")
            out[f"{prefix}.experts.{e}.{theirs}.weight"] = linear.weight.detach()
    return out


def export_mixtral(base: str, adapter_dir, out_dir, dtype: str = "fp32") -> Path:
    """Load `base` with the MoE adapter and write a MixtralForCausalLM folder (atomically); return it.

    Args:
        base: the base model the adapter was trained on (any name `load_model` takes).
        adapter_dir: a `moe` adapter (or its run folder) with `routing: learned` and `layers: all`.
        out_dir: the folder to write; an existing model folder there is replaced.
        dtype: `fp32`, `bf16` or `fp16` for the saved weights.
    """
    from huggingface_hub import save_torch_state_dict
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers import AutoTokenizer, MixtralConfig
    from transformers.utils import logging as hf_logging

    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    cfg, _ = read_method(adapter_dir)
    if cfg.name not in MOE_METHODS:
        raise ExportError(f"a `{cfg.name}` adapter is not an MoE upcycling; Mixtral export takes method `moe` "
                          "or `moe_lora`")
    if getattr(cfg, cfg.name).routing != "learned":
        raise ExportError(f"an MoE with enforced (per-domain) routing picks experts from the data, not a router: "
                          f"{KEEP_AS_ADAPTER}")
    bars = hf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # an export prints nothing; the caller reports the path
    disable_progress_bars()
    try:
        model, _ = load_model(base, dtype="fp32")
        method, _ = load_tuned(model, adapter_dir)
        if cfg.name == "moe_lora":  # E LoRA experts on one shared MLP -> E full experts (LoRA merged in)
            expand(model)
        kwargs, state = mixtral_state(model)
        kwargs["router_aux_loss_coef"] = method.cfg.balance_weight / method.cfg.top_k  # theirs counts k per token
        config = MixtralConfig(**kwargs, dtype=DTYPES[dtype], architectures=["MixtralForCausalLM"])
        state = {n: t.to(DTYPES[dtype]).contiguous() for n, t in state.items()}
        tokenizer = AutoTokenizer.from_pretrained(str(resolve(base)))
        with atomic_folder(out_dir, marker="config.json") as tmp:
            save_torch_state_dict(state, tmp, metadata={"format": "pt"})
            config.save_pretrained(tmp)
            for shard in tmp.glob("*.safetensors"):  # written 0600 through a temporary file: as config.json
                shard.chmod((tmp / "config.json").stat().st_mode & 0o777)
            tokenizer.save_pretrained(tmp)
            if model.generation_config is not None:
                model.generation_config.save_pretrained(tmp)
    finally:
        if bars[0]:
            hf_logging.enable_progress_bar()
        if bars[1]:
            enable_progress_bars()
    return Path(out_dir)
