"""Prefix tuning (Li & Liang, ACL 2021): l trainable key/value vectors per layer, before the context.

Every attention layer gets P_k, P_v (kv_heads, l, head_dim); each query attends to them and then to
its causal context:

    head = softmax(q [P_k; K]ᵀ / √d) [P_v; V]
         = (1 − λ) · Attn(q, K, V) + λ · softmax(q P_kᵀ / √d) P_v     (He et al., 2022, §3)

with λ the softmax mass that lands on the prefix: a gated, parallel change to each head's output.
Prefix keys get no rotary embedding and real tokens keep positions 0..T−1; the prefix is not in the
KV cache but added inside every attention call (`models/attention.py`), so packed, padded, eager and
cached generation all see it. With grouped-query attention there is one prefix per kv head.

`reparam` trains the prefixes through an MLP, as the paper does for stability: Emb(l, d) → Linear(d,
hidden) → tanh → Linear(hidden, 2·L·kv_dim); saving folds it into plain prefixes (no MLP in the
adapter). Initialisation follows the paper's "real words" advice: the prefixes start as the keys/
values the base model computes for l random tokens (with reparam, the last Linear is solved so the
MLP outputs exactly those: both forms start alike). No start reproduces the base model: even zero
prefixes take softmax mass; real-token states at least look like keys/values the model knows.

Pick it for the smallest budgets (He et al. find attention-side changes win there) or to steer
generation without touching any weight; it does not merge, and costs l extra keys per attention.
PEFT has it (PREFIX_TUNING); the adapter is also written in PEFT's layout.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..config import Config
from ..models.attention import PACKED, PREFIX, register_prefix
from .base import MethodBase, MethodError
from .catalog import Variant

ENCODER = "prefix_encoder"  # the reparameterisation MLP, on the top-level model
LAYER = "tunesmith_prefix_layer"  # an attention module's layer index into the MLP's output
_ATTENTION = {"sdpa", "eager", PACKED}


def _own_prefix(attn: nn.Module):
    return attn.prefix_key, attn.prefix_value


class PrefixEncoder(nn.Module):
    """Li & Liang's MLP: every layer's prefixes from l embeddings. Output row j holds, per layer,
    [key; value] of prefix j, heads then head_dim (PEFT's `prompt_embeddings` layout)."""

    def __init__(self, length: int, d_model: int, hidden: int, layers: int, kv_heads: int, head_dim: int,
                 device=None):
        super().__init__()
        self.length, self.layers, self.kv_heads, self.head_dim = length, layers, kv_heads, head_dim
        kw = dict(device=device, dtype=torch.float32)
        self.embedding = nn.Embedding(length, d_model, **kw)
        self.transform = nn.Sequential(nn.Linear(d_model, hidden, **kw), nn.Tanh(),
                                       nn.Linear(hidden, layers * 2 * kv_heads * head_dim, **kw))

    def _hidden(self) -> torch.Tensor:
        return self.transform[1](self.transform[0](self.embedding.weight))  # (l, hidden)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's (key, value), each (kv_heads, l, head_dim); only its slice of the last Linear runs."""
        width = 2 * self.kv_heads * self.head_dim
        out = self.transform[2]
        kv = F.linear(self._hidden(), out.weight[i * width:(i + 1) * width], out.bias[i * width:(i + 1) * width])
        kv = kv.view(self.length, 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return kv[0], kv[1]

    @torch.no_grad()
    def start_at(self, target: torch.Tensor) -> None:
        """Set the last Linear so that the MLP outputs `target` (l, L·2·kv_dim): bias = the mean row,
        weight = the least-squares (exact when hidden >= l) map from the tanh features to the rest."""
        out = self.transform[2]
        h = self._hidden().double()  # (l, hidden)
        out.bias.copy_(target.mean(0))
        out.weight.copy_((torch.linalg.pinv(h) @ (target.double() - target.mean(0).double())).T)

    def forward(self, attn: nn.Module):  # the prefix source an attention module calls
        return self.layer(attn.__dict__[LAYER])


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """One self-attention module per decoder layer, in layer order."""
    found = [(n, m) for n, m in model.named_modules()
             if type(m).__name__.endswith("Attention") and re.search(r"\.(layers|h|blocks)\.\d+\.", n + ".")]
    found = [(n, m) for n, m in found if not any(o != n and n.startswith(o + ".") for o, _ in found)]
    layers = getattr(model.config, "num_hidden_layers", None)
    if not found or (layers is not None and len(found) != layers):
        raise MethodError(f"method `prefix` found {len(found)} attention modules for {layers} layers in "
                          f"{type(model).__name__}; it supports decoder-only models with one self-attention per layer")
    return found


def _shapes(model: nn.Module) -> tuple[int, int, int]:
    """(d_model, kv_heads, head_dim) from the model's config."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.hidden_size, kv_heads, head_dim


@torch.no_grad()
def real_token_states(model: nn.Module, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the (key, value) (kv_heads, l, head_dim) the model computes for l random tokens."""
    vocab = model.get_input_embeddings().num_embeddings
    device = model.get_input_embeddings().weight.device
    ids = torch.randint(0, vocab, (1, length)).to(device)  # drawn on CPU: the same on every device
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=ids, use_cache=True)
    finally:
        model.train(was_training)
    cache = getattr(out, "cache", None) or out.past_key_values
    return [(layer.keys[0].float(), layer.values[0].float()) for layer in cache.layers]


class PrefixConfig(Config):
    length: int = Field(30, gt=0)
    "Number of prefix key/value vectors per layer."
    reparam: bool = True
    "Train through an MLP reparameterisation (Li & Liang, 2021), folded into plain prefixes at save."
    hidden: int = Field(512, gt=0)
    "Hidden width of the reparameterisation MLP."


class Prefix(MethodBase):
    """The `prefix` method: prefix keys/values on every attention layer; only they (or the MLP) train."""

    name = "prefix"
    mergeable = False
    Options = PrefixConfig
    paper = "Li & Liang, 2021"
    when = "the smallest budgets: trained keys/values every layer attends to"
    tiny = {"length": 4, "hidden": 16}
    variants = {"prefix-plain": Variant({"reparam": False}, "Li & Liang, 2021",
                                        "prefix vectors trained directly, without the MLP: less memory while training")}

    def apply(self, model: nn.Module) -> None:
        attns = attention_modules(model)
        if any(PREFIX in m.__dict__ for _, m in attns):
            raise MethodError("the model already has prefixes: apply `prefix` once")
        impl = model.config._attn_implementation
        if impl not in _ATTENTION:
            raise MethodError(f"method `prefix` needs model.attention packed, sdpa or eager (the model uses `{impl}`)")
        d_model, kv_heads, head_dim = _shapes(model)
        l = self.cfg.length
        init = real_token_states(model, l)
        if len(init) != len(attns) or tuple(init[0][0].shape) != (kv_heads, l, head_dim):
            raise MethodError(f"method `prefix`: the model's cache does not match its config "
                              f"({len(init)} layers of {tuple(init[0][0].shape)}, expected {(kv_heads, l, head_dim)})")
        register_prefix()
        device = init[0][0].device
        if self.cfg.reparam:
            encoder = PrefixEncoder(l, d_model, self.cfg.hidden, len(attns), kv_heads, head_dim, device=device)
            with torch.no_grad():
                encoder.start_at(torch.cat([torch.cat([k.permute(1, 0, 2), v.permute(1, 0, 2)], 1).reshape(l, -1)
                                            for k, v in init], 1))
            model.add_module(ENCODER, encoder)
            for i, (_, attn) in enumerate(attns):
                attn.__dict__[PREFIX] = encoder  # a plain reference: the MLP's keys live once, under ENCODER
                attn.__dict__[LAYER] = i
        else:
            for (_, attn), (k, v) in zip(attns, init):
                attn.prefix_key = nn.Parameter(k.clone())
                attn.prefix_value = nn.Parameter(v.clone())
                attn.__dict__[PREFIX] = _own_prefix

    def is_trainable(self, name: str, param) -> bool:
        return name.endswith((".prefix_key", ".prefix_value")) or name.startswith(ENCODER + ".")

    def optimizer_options(self, name: str, param) -> dict:
        # zero is not the base model for a prefix: decaying toward it only dilutes attention
        return {"decay": False} if name.endswith((".prefix_key", ".prefix_value", ".embedding.weight")) else {}

    def prefixes(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every layer's plain prefixes under the names a reparam=False Prefix gives them."""
        out = {}
        for name, attn in attention_modules(model):
            source = attn.__dict__.get(PREFIX)
            if source is None:
                raise MethodError("the model has no prefixes (apply `prefix` first)")
            k, v = source(attn)
            out[f"{name}.prefix_key"], out[f"{name}.prefix_value"] = k.detach().float(), v.detach().float()
        return out

    def export_delta(self, model: nn.Module):
        """The folded prefixes and the options that rebuild them (reparam off): no MLP is saved."""
        with torch.no_grad():
            return self.prefixes(model), self.cfg.model_copy(update={"reparam": False})

    def describe(self, model: nn.Module) -> str:
        layers = len(attention_modules(model))
        how = f"through an MLP (hidden {self.cfg.hidden}), folded at save" if self.cfg.reparam else "directly"
        return f"prefix: {self.cfg.length} key/value vectors per kv head on {layers} layers, trained {how}"
