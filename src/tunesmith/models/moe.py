"""Mixture-of-experts MLPs upcycled from a dense model (Hallee et al., 2024, "Contrastive learning
and mixture of experts enables precise vector embeddings"; methods.md §15).

Upcycling replaces a layer's MLP by N experts, each a copy of the pretrained MLP. With *enforced
routing* there is no learned gate: the caller says which expert each row (sentence-wise: a domain
id per text) or each token (token-wise: e.g. token-type ids) goes to, so every token still runs
through exactly one MLP and the compute equals the dense model's. At initialisation every expert is
the same MLP, so the upcycled model computes exactly what the dense one did.

    upcycle(model, experts=3, layers="all")      # in place; returns the MoEMLP modules
    with routing(model, domain_ids):             # (B,) one expert per row, or (B, T) one per token
        out = model(input_ids, attention_mask=...)

Where the MLP is: decoders (Llama, Qwen2, Mistral, ...) have `layers[i].mlp`; BERT splits it over
`layer[i].intermediate` (up projection + activation) and `layer[i].output.dense` (down projection,
before the shared dropout, residual and LayerNorm). For BERT both halves become MoE modules that
follow the same routing, so expert k is down_k(act(up_k(x))), as in the paper's code (its expert is
the two dense layers; the LayerNorm stays shared).

Checkpoint keys: expert 0 is the pretrained module itself and keeps its keys (`mlp.gate_proj.weight`);
expert k > 0 sits beside it (`mlp.experts.k.gate_proj.weight`). A model without routing runs every
token through expert 0, i.e. the dense model's MLP as it trains.

`MoEMLP(experts, router=None)` dispatches tokens to experts; `router` (a module mapping tokens
(n, d) to (expert ids (n,), gate (n,) or None)) is the hook for a learned gate; enforced routing,
when set, wins over it.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn


class MoEError(ValueError):
    """An upcycling or routing request that cannot apply to this model or batch."""


class MoEMLP(nn.Module):
    """N experts behind one MLP slot; each token runs through exactly one of them.

    Expert 0's parameters and submodules are registered on this module under their own names, so the
    state-dict keys of the replaced MLP do not change; experts 1..N-1 live in `experts` ("1", "2", ...).
    """

    def __init__(self, experts: list[nn.Module], router: nn.Module | None = None):
        super().__init__()
        if not experts:
            raise MoEError("an MoE MLP needs at least one expert")
        first = experts[0]
        # expert 0 is called as itself; its tensors are adopted here (same objects) so they keep their keys
        object.__setattr__(self, "_first", first)
        for name, child in first.named_children():
            self.add_module(name, child)
        for name, p in first.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in first.named_buffers(recurse=False):
            self.register_buffer(name, b)
        self.experts = nn.ModuleDict({str(k): e for k, e in enumerate(experts) if k > 0})
        self.router = router
        self.route: torch.Tensor | None = None  # set by `routing(...)` for one forward

    @property
    def n_experts(self) -> int:
        return 1 + len(self.experts)

    def expert(self, k: int) -> nn.Module:
        if k:
            return self.experts[str(k)]
        first = self._first  # this module holds expert 0's tensors: hand the current ones back to it
        first._parameters.update({n: self._parameters[n] for n in first._parameters})
        first._buffers.update({n: self._buffers[n] for n in first._buffers})
        first._modules.update({n: self._modules[n] for n in first._modules})
        first.training = self.training
        return first

    def _ids(self, x: torch.Tensor) -> torch.Tensor | None:
        """Expert id per token, (B·T,), from the enforced route, else the router, else None (expert 0)."""
        route = self.route
        if route is None:
            return None
        lead = x.shape[:-1]  # (B, T) or (n,)
        if route.dim() == 0:  # one expert for everything (e.g. embedding texts of one domain)
            route = route.expand(lead)
        if route.dim() == 1 and len(lead) == 2 and route.shape[0] == lead[0]:
            route = route[:, None].expand(lead)  # one expert per row: every token of the row
        if tuple(route.shape) != tuple(lead):
            raise MoEError(f"routing ids have shape {tuple(self.route.shape)}, but the layer sees tokens of shape "
                           f"{tuple(lead)}: give one id per row (B,) or one per token (B, T)")
        return route.reshape(-1).to(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self._ids(x)
        gate = None
        if ids is None and self.router is not None:
            ids, gate = self.router(x.reshape(-1, x.shape[-1]))
        if ids is None:
            return self.expert(0)(x)
        out = dispatch(x.reshape(-1, x.shape[-1]), ids, self.expert, self.n_experts)
        if gate is not None:
            out = out * gate[:, None].to(out.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def dispatch(x: torch.Tensor, ids: torch.Tensor, expert, n_experts: int) -> torch.Tensor:
    """Run token i of `x` (n, d) through expert `ids[i]`; returns (n, d_out) in token order. Tokens are
    grouped by expert (one matmul per expert used), so the work is that of one dense MLP."""
    ids = ids.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_experts):
        raise MoEError(f"routing id {int(ids.max()) if int(ids.max()) >= n_experts else int(ids.min())} is out "
                       f"of range: this model has experts 0..{n_experts - 1} (one per domain: set method.moe.experts "
                       "to the number of domains in the data)")
    used = torch.unique(ids).tolist()
    if len(used) == 1:
        return expert(used[0])(x)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=n_experts).tolist()
    chunks = torch.split(x[order], counts)
    out = torch.cat([expert(k)(chunk) for k, chunk in enumerate(chunks) if counts[k]])
    return out[torch.argsort(order)]  # back to token order


def _bert_layers(model: nn.Module) -> list[nn.Module] | None:
    encoder = getattr(getattr(model, "bert", model), "encoder", None)
    layers = getattr(encoder, "layer", None)
    if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "intermediate"):
        return list(layers)
    return None


def _decoder_layers(model: nn.Module) -> list[nn.Module] | None:
    body = getattr(model, getattr(model, "base_model_prefix", ""), model)
    layers = getattr(body, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "mlp"):
        return list(layers)
    return None


def mlp_slots(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Per transformer layer, the (parent, attribute) slots that together form its MLP: one slot for a
    decoder (`mlp`), two for BERT (`intermediate`, `output.dense`)."""
    bert = _bert_layers(model)
    if bert is not None:
        return [[(layer, "intermediate"), (layer.output, "dense")] for layer in bert]
    dec = _decoder_layers(model)
    if dec is not None:
        return [[(layer, "mlp")] for layer in dec]
    raise MoEError(f"{type(model).__name__}: found no MLP to upcycle (a decoder's `layers[i].mlp` or BERT's "
                   "`encoder.layer[i].intermediate` / `output.dense`)")


def choose_layers(n_layers: int, layers) -> list[int]:
    """`"all"` or a list of layer indices (negative counts from the top) -> sorted distinct indices."""
    if layers == "all":
        return list(range(n_layers))
    chosen = []
    for i in layers:
        if not -n_layers <= int(i) < n_layers:
            raise MoEError(f"moe layers: {i} is not a layer of this model (it has {n_layers}: 0..{n_layers - 1})")
        chosen.append(int(i) % n_layers)
    if not chosen:
        raise MoEError("moe layers: name at least one layer, or `all`")
    return sorted(set(chosen))


def upcycle(model: nn.Module, experts: int, layers="all") -> list[MoEMLP]:
    """Replace the MLP of the chosen layers by `experts` copies of itself (in place); return the MoE
    modules. Expert 0 is the pretrained module; the others are deep copies, so the output is unchanged."""
    if experts < 1:
        raise MoEError(f"moe experts: need at least 1, got {experts}")
    slots = mlp_slots(model)
    made = []
    for i in choose_layers(len(slots), layers):
        for parent, attr in slots[i]:
            base = getattr(parent, attr)
            if isinstance(base, MoEMLP):
                raise MoEError(f"layer {i} is already upcycled")
            moe = MoEMLP([base] + [copy.deepcopy(base) for _ in range(experts - 1)])
            setattr(parent, attr, moe)
            made.append(moe)
    return made


def moe_modules(model: nn.Module) -> list[MoEMLP]:
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def _checkpointing(model: nn.Module) -> bool:
    """Whether activation checkpointing is on (transformers' flag; named is_gradient_checkpointing before v5)."""
    for flag in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), flag):
            return bool(getattr(model, flag))
    return False


@contextlib.contextmanager
def routing(model: nn.Module, ids: torch.Tensor | int | None):
    """Route the forwards inside this block: an int sends every token to that expert (e.g. texts of
    one domain); `ids` (B,) sends every token of row b to expert ids[b] (sentence-wise, e.g. a
    domain id); (B, T) sends token t of row b to ids[b, t] (token-wise, e.g. token-type ids). A
    negative id (a text without a domain) means expert 0. None, or a model without MoE layers: no change.

    The route is read when a layer runs. Activation checkpointing recomputes layers in the backward
    pass, after this block has ended, so a routed forward under it is refused."""
    layers = moe_modules(model) if ids is not None else []
    if layers and not torch.is_tensor(ids):
        ids = torch.tensor(ids)
    if layers and torch.is_grad_enabled() and _checkpointing(model):
        raise MoEError("routed MoE layers with activation checkpointing: the backward pass recomputes the layers "
                       "after the routing is gone; set train.activation_checkpointing=false")
    previous = [m.route for m in layers]
    if layers:
        ids = ids.long().clamp(min=0)
    try:
        for m in layers:
            m.route = ids
        yield
    finally:
        for m, r in zip(layers, previous):
            m.route = r


def embed_routed(model: nn.Module, tokenizer, texts: list[str], domains: list[int], spec, **options) -> torch.Tensor:
    """`models.embedding.embed_texts` with each text run through its domain's expert (`domains[i]`,
    -1: none, expert 0): texts are embedded domain by domain and returned in their own order."""
    from .embedding import embed_texts

    if len(domains) != len(texts):
        raise MoEError(f"embed_routed: {len(texts)} texts but {len(domains)} domain ids")
    out: torch.Tensor | None = None
    for k in sorted(set(domains)):
        rows = [i for i, d in enumerate(domains) if d == k]
        with routing(model, k):
            vectors = embed_texts(model, tokenizer, [texts[i] for i in rows], spec, **options)
        if out is None:
            out = torch.empty(len(texts), vectors.shape[1], dtype=vectors.dtype)
        out[torch.tensor(rows)] = vectors
    return out if out is not None else torch.zeros(0, 0)
