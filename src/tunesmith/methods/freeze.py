"""Freeze tuning: train chosen base parameters whole, keep everything else frozen.

No new tensors: the update is ΔW = W_tuned − W on the chosen parameters and 0 elsewhere, so the
tuned model is a plain transformers model (`output = "model"`; merge has nothing to fold).
What trains is either a list of parameter-name patterns (`modules`) or the top-k decoder layers
(`layers`), plus the switches `embeddings`, `norms` and `lm_head`.

Pick it when full fine-tuning does not fit but the task needs real weight changes in a known
place: the top layers (cheap, close to the output, common for classification-like tasks), the
FFNs (`modules: [mlp]`, where most factual associations live), or embeddings + norms as the
trainable extras of LongLoRA (Chen et al., 2024). Memory: gradients and AdamW state only for
what trains; activations still run through every layer.
"""
from __future__ import annotations

import re

from pydantic import Field
from torch import nn

from ..config import Config
from .base import MethodBase, MethodError
from .catalog import Variant

_LAYER_LISTS = ("layers", "h", "blocks")


def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every transformer block, in order: the items of the first ModuleList
    named `layers`, `h` or `blocks` (Llama/Qwen/Mistral: `model.layers`, GPT-2: `transformer.h`)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.rpartition(".")[2] in _LAYER_LISTS and len(mod):
            return [(f"{name}.{i}", block) for i, block in enumerate(mod)]
    return []


def parameter_names(model: nn.Module, module: nn.Module) -> list[str]:
    """Names (as `model.named_parameters()` spells them) of the parameters of `module`; a tied
    tensor is named once, by its first name."""
    ids = {id(p) for p in module.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def norm_modules(model: nn.Module) -> list[nn.Module]:
    """Every norm layer: nn.LayerNorm and the models' own RMSNorm/LayerNorm classes."""
    return [m for m in model.modules() if isinstance(m, nn.LayerNorm) or "norm" in type(m).__name__.lower()]


def head_is_tied(model: nn.Module) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and emb is not None and head.weight is emb.weight


def switch_parameters(model: nn.Module, cfg, method: str) -> list[str]:
    """Parameter names the `embeddings` / `norms` / `lm_head` switches of `cfg` add."""
    names: list[str] = []
    if cfg.embeddings:
        emb = model.get_input_embeddings()
        if emb is None:
            raise MethodError(f"{method}.embeddings=true: this model has no input embeddings")
        names += parameter_names(model, emb)
    if cfg.norms:
        norms = norm_modules(model)
        if not norms:
            raise MethodError(f"{method}.norms=true: found no norm layer in this model")
        for m in norms:
            names += parameter_names(model, m)
    if cfg.lm_head:
        head = model.get_output_embeddings()
        if head is None:
            raise MethodError(f"{method}.lm_head=true: this model has no output head")
        if head_is_tied(model):
            if not cfg.embeddings:
                raise MethodError(f"{method}.lm_head=true: this model ties its lm_head to the input embeddings, so "
                                  f"the head trains with {method}.embeddings=true (one tensor); set that instead")
        else:
            names += parameter_names(model, head)
    return names


def switch_words(model: nn.Module, cfg) -> list[str]:
    words = [s for s in ("embeddings", "norms") if getattr(cfg, s)]
    if cfg.lm_head:
        words.append("lm_head (tied: it is the embeddings)" if head_is_tied(model) else "lm_head")
    return words


def _component_match(pattern: str, name: str) -> bool:
    """`mlp` or `self_attn.q_proj` as whole dot-separated pieces of `name` (so `layers.1` is not `layers.10`)."""
    return f".{pattern}." in f".{name}."


def match_patterns(model: nn.Module, patterns: list[str], option: str) -> list[str]:
    """Parameter names matched by any pattern; raise naming a pattern that matches nothing."""
    names = [n for n, _ in model.named_parameters()]
    chosen: list[str] = []
    for pattern in patterns:
        if re.fullmatch(r"[\w.]+", pattern):  # a plain (dotted) name: whole components only
            hits = [n for n in names if _component_match(pattern, n)]
        else:
            try:
                compiled = re.compile(pattern)
            except re.error as e:
                raise MethodError(f"{option}: `{pattern}` is not a valid regular expression ({e})") from None
            hits = [n for n in names if compiled.search(n)]
        if not hits:
            examples = [n for n in names if not re.search(r"\.\d+\.", n) or re.search(r"\.0\.", n)][:12]
            raise MethodError(f"{option}: `{pattern}` matches no parameter; patterns are name components "
                              f"(`mlp`), dotted pieces (`self_attn.q_proj`) or regexes searched in names "
                              f"such as: {', '.join(examples)}")
        chosen += hits
    return chosen


def fraction_line(model: nn.Module, names: set[str]) -> str:
    counts = {n: p.numel() for n, p in model.named_parameters()}
    trained, total = sum(counts[n] for n in names if n in counts), sum(counts.values())
    return f"{trained:,} of {total:,} parameters ({100 * trained / max(total, 1):.2f}%)"


class FreezeConfig(Config):
    modules: list[str] = Field(default_factory=list)
    "Parameter names or regexes that train (e.g. `mlp`, `layers\\.1\\.self_attn`); empty = use `layers`."
    layers: int = Field(2, ge=0)
    "Train the top-k decoder layers whole (used when `modules` is empty)."
    embeddings: bool = False
    "Also train the token embeddings (and a tied lm_head)."
    norms: bool = False
    "Also train every norm layer."
    lm_head: bool = False
    "Also train the output head (an untied lm_head; a tied one trains with `embeddings`)."


class Freeze(MethodBase):
    """The `freeze` method: the chosen base parameters train, the rest are frozen."""

    name = "freeze"
    output = "model"
    mergeable = True  # nothing to fold: the weights are the model
    Options = FreezeConfig
    paper = "—"
    when = "train the top layers (or chosen modules) only: cheap, no adapter to ship"
    tiny = {"layers": 1}
    variants = {"freeze-modules": Variant({"modules": ["mlp"], "norms": True}, "—",
                                          "train modules chosen by name (here every FFN) and the norms")}

    def __init__(self, cfg):
        super().__init__(cfg)
        self._names: set[str] = set()
        self._what: list[str] = []

    def apply(self, model: nn.Module) -> None:
        cfg = self.cfg
        names, what = [], []
        if cfg.modules:
            names += match_patterns(model, cfg.modules, "freeze.modules")
            what.append("modules " + ", ".join(cfg.modules))
        elif cfg.layers:
            blocks = decoder_blocks(model)
            if not blocks:
                raise MethodError("freeze.layers: found no decoder layers (a ModuleList named layers, h or blocks); "
                                  "name the parameters to train with freeze.modules instead")
            if cfg.layers > len(blocks):
                raise MethodError(f"freeze.layers={cfg.layers}, but this model has {len(blocks)} decoder layers; "
                                  f"choose 0..{len(blocks)}")
            top = blocks[-cfg.layers:]
            for _, block in top:
                names += parameter_names(model, block)
            first = len(blocks) - cfg.layers
            what.append(f"the top {cfg.layers} of {len(blocks)} layers ({first}..{len(blocks) - 1})")
        names += switch_parameters(model, cfg, "freeze")
        what += switch_words(model, cfg)
        if not names:
            raise MethodError("freeze trains nothing: set freeze.layers > 0, freeze.modules, or one of "
                              "freeze.embeddings / freeze.norms / freeze.lm_head")
        self._names, self._what = set(names), what

    def is_trainable(self, name: str, param) -> bool:
        return name in self._names

    def merge(self, model: nn.Module) -> None:
        return None

    def describe(self, model: nn.Module) -> str:
        return f"trains {' + '.join(self._what)}: {fraction_line(model, self._names)}"
