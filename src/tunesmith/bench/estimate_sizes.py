"""What fits: training memory of 0.5B / 1B / 3B / 8B Llama- and Qwen-shaped models in bf16 / int8 /
4-bit, full fine-tuning and LoRA — built on the meta device (shapes only, no weights, no memory).

Each model is the published architecture's config (sizes below), built with `from_config` on the
meta device in bf16, the method attached as `train` attaches it (what trains is an fp32 master),
and the frozen decoder Linears quantised as `model.quantize` does (models/quant.py). The parts follow
`tunesmith estimate` (bench/estimate.py):

- weights: the counted bytes of every parameter and buffer (quantised: codes + scales);
- gradients: fp32, one per trained value; optimizer: AdamW's two fp32 moments per trained value;
- activations: every tensor autograd saves in one forward of the body (weights excluded), counted by
  storage on the meta device, for one row of `tokens` tokens with flash-style attention (what CPU
  sdpa and CUDA flash/varlen kernels save: q, k, v, the output and a per-token log-sum-exp — the meta
  device's own sdpa is the math path, which would count T×T probabilities that no real run keeps).
  The pass runs every floating tensor in bf16, as autocast computes; a full fine-tune also keeps
  autocast's bf16 copy of each trained weight (2 bytes per decoder weight, added);
- checkpointing: every layer keeps its bf16 input (tokens × hidden × 2) and one layer is recomputed
  at a time, its full saved set counted once (the per-layer set: the 2-layer minus the 1-layer model);
- the backward transient of the head: one loss chunk's bf16 and fp32 logits and their gradients,
  16 bytes per chunk position per vocabulary entry.

Peak = weights + optimizer + max(activations + transient, gradients), as in the estimate, without the
runtime (the interpreter and libraries: ~0.5 GB on a CPU, more with CUDA's context) and without what
an allocator holds beyond its live bytes. A full fine-tune of a quantised base does not exist (a
weight in int8 or 4 bits cannot take an update): those rows say so.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

# (family, config) of published models: Qwen2.5-0.5B, Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B
SIZES = {
    "0.5B": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                           num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
    "1B": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)),
    "3B": ("llama", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)),
    "8B": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)),
}
BASES = ("bf16", "int8", "int4", "nf4")


def size_config(size: str, layers: int | None = None):
    """The transformers config of `size` (optionally cut to `layers` decoder layers)."""
    from transformers import LlamaConfig, Qwen2Config

    family, values = SIZES[size]
    values = dict(values, max_position_embeddings=32768)
    if layers is not None:
        values["num_hidden_layers"] = layers
    return (Qwen2Config if family == "qwen2" else LlamaConfig)(**values)


@dataclass
class SizeRow:
    size: str
    method: str
    base: str
    parameters: int
    trainable: int
    parts: dict  # bytes: weights, gradients, optimizer, activations, activations_ckpt, transient
    note: str = ""

    def peak(self, checkpointing: bool = False) -> float:
        p = self.parts
        acts = p["activations_ckpt" if checkpointing else "activations"]
        return p["weights"] + p["optimizer"] + max(acts + p["transient"], p["gradients"])


def _meta_model(config, method: str, base: str, rank: int):
    """The model on the meta device with the method attached and the base quantised; None when the
    combination cannot train (a full fine-tune of a quantised base)."""
    from transformers import AutoModelForCausalLM

    from ..methods import attach, build_method
    from ..models.quant import QuantError, quantize_frozen
    from ..recipe import load_recipe

    overrides = ["method.name=full"] if method == "full" else \
        ["method.name=lora", f"method.lora.rank={rank}", f"method.lora.alpha={2 * rank}"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    attach(model, build_method(load_recipe(None, overrides).method))
    for p in model.parameters():  # fp32 masters of what trains (train.prepare_model)
        if p.requires_grad:
            p.data = p.data.float()
    if base != "bf16":
        try:
            quantize_frozen(model, base, 64)
        except QuantError:
            return None
    return model


class _FlashLike(torch.autograd.Function):
    """Attention that saves what a flash kernel saves (q, k, v, output, fp32 log-sum-exp)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _saved_bytes(model, tokens: int) -> int:
    """Bytes autograd saves in one forward of the body on `tokens` tokens, by storage, weights excluded."""
    import torch.nn.functional as F

    weights = {t.untyped_storage()._cdata for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in weights:
            seen[s._cdata] = max(seen.get(s._cdata, 0), s.nbytes())
        return t

    def attention(q, k, v, *args, **kwargs):
        return _FlashLike.apply(q, k, v)

    def autocast_enabled(device_type=None):  # autocast has no meta device: asked about it, say off
        return False if device_type == "meta" else enabled(device_type) if device_type else enabled()

    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    original, enabled = F.scaled_dot_product_attention, torch.is_autocast_enabled
    F.scaled_dot_product_attention, torch.is_autocast_enabled = attention, autocast_enabled
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden = model.get_decoder()(input_ids=ids).last_hidden_state
    finally:
        F.scaled_dot_product_attention, torch.is_autocast_enabled = original, enabled
    del hidden
    return sum(seen.values())


def _activation_model(model):
    """A copy whose floating tensors are all bf16: autocast's compute dtype, emulated on meta."""
    act = copy.deepcopy(model)
    for t in list(act.parameters()) + list(act.buffers()):
        if t.is_floating_point():
            t.data = t.data.to(torch.bfloat16)
    return act


def measure(size: str, method: str = "lora", base: str = "bf16", tokens: int = 2048, rank: int = 16,
            loss_chunk: int = 1024) -> SizeRow:
    """The memory parts of training `size` with `method` over a `base` stored base (see the docstring)."""
    from ..models.quant import QuantizedWeight
    from .estimate import _parameter_bytes

    config = size_config(size)
    model = _meta_model(config, method, base, rank)
    if model is None:
        return SizeRow(size, method, base, 0, 0, {}, note="a quantised weight cannot train: full fine-tuning "
                                                         "needs a bf16/fp32 base")
    counts = _parameter_bytes(model)
    trainable = int(counts["trainable"])
    quantised = sum(m.numel() for m in model.modules() if isinstance(m, QuantizedWeight))  # buffers now
    saved = {n: _saved_bytes(_activation_model(_meta_model(size_config(size, n), method, base, rank)), tokens)
             for n in (1, 2)}
    layers, hidden = config.num_hidden_layers, config.hidden_size
    per_layer = saved[2] - saved[1]
    activations = saved[1] + (layers - 1) * per_layer
    ckpt = (saved[1] - per_layer) + layers * tokens * hidden * 2 + per_layer
    if method == "full":  # autocast's bf16 copies of the trained fp32 decoder weights, saved for backward
        # (under checkpointing they are made again in the recomputation, not kept)
        activations += 2 * sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.ndim == 2)
    parts = {"weights": counts["trainable_bytes"] + counts["frozen_bytes"], "gradients": 4 * trainable,
             "optimizer": 8 * trainable, "activations": activations, "activations_ckpt": ckpt,
             "transient": 16 * min(loss_chunk, tokens) * config.vocab_size}
    return SizeRow(size, method, base, int(counts["parameters"]) + quantised, trainable, parts)


def size_table(sizes=tuple(SIZES), methods=("full", "lora"), bases=BASES, tokens: int = 2048,
               rank: int = 16) -> list[SizeRow]:
    return [measure(s, m, b, tokens, rank) for s in sizes for m in methods for b in bases]


def format_sizes(rows: list[SizeRow], tokens: int) -> str:
    """A markdown table: GB (1e9 bytes) by part, peak without and with activation checkpointing."""
    gb = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
    lines = [f"| model | method | base | parameters | trainable | weights | grads + AdamW | activations "
             f"({tokens} tok) | checkpointed | head transient | **peak** | **peak, checkpointed** |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        if r.note:  # one line for the bases that cannot train this way
            if i and rows[i - 1].note and (rows[i - 1].size, rows[i - 1].method) == (r.size, r.method):
                continue
            same = [x.base for x in rows[i:] if x.note and (x.size, x.method) == (r.size, r.method)]
            lines.append(f"| {r.size} | {r.method} | {' / '.join(same)} | — | — | — | — | — | — | — | {r.note} | |")
            continue
        p = r.parts
        lines.append(f"| {r.size} | {r.method} | {r.base} | {r.parameters / 1e9:.2f}B | {r.trainable / 1e6:.1f}M | "
                     f"{gb(p['weights'])} | {gb(p['gradients'] + p['optimizer'])} | {gb(p['activations'])} | "
                     f"{gb(p['activations_ckpt'])} | {gb(p['transient'])} | **{gb(r.peak())}** | "
                     f"**{gb(r.peak(True))}** |")
    return "\n".join(lines)
