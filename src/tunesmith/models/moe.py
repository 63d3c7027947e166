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

`MoEMLP(experts, router=None)` dispatches tokens to experts; `router` maps tokens (n, d) to expert
ids and gates: (n,) ids with an (n,) gate or None, or (n, k) ids with (n, k) gates, the token's
output then being the gate-weighted sum of its k experts. Enforced routing, when set, wins over it.

Learned routing (sparse upcycling, Komatsuzaki et al., 2023; Mixtral, Jiang et al., 2024):
`TopKRouter` is Mixtral's gate — logits = x·Wᵀ (no bias), p = softmax(logits), the top-k experts of
p with their probabilities renormalised to sum to 1. At upcycling every expert is the same MLP, so
the upcycled model equals the dense one whatever the router weights (Σ gates = 1); the experts and
the router diverge in training, pushed apart by the load-balancing loss and the random router.
`aux_losses(model)` gives that loss (Switch Transformer, Fedus et al., 2022: E·Σ_e f_e·P_e) and the
router z-loss (ST-MoE, Zoph et al., 2022: mean logsumexp(logits)²) of the last forward;
`expert_stats(model)` the expert shares and entropies to log.

Capacity and drops: dropless by default — every token reaches its k experts. With
`capacity_factor` c, while training each expert takes at most ceil(c·n·k/E) of a forward's n·k
assignments, first come first served in token order (row-major over the flattened batch, a token's
first choice before its second); a dropped assignment contributes zero, so a token whose every
assignment is dropped passes through the layer's residual connection only, and a token with one
of two dropped keeps the other's gate unrenormalised (Switch). In eval and generation there is no
capacity limit, so inference is Mixtral's computation exactly.
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


class MoEError(ValueError):
    """An upcycling or routing request that cannot apply to this model or batch."""


class TopKRouter(nn.Module):
    """Mixtral's learned gate: ids (n, k) of each token's top-k experts by softmax probability and
    their gates (n, k), the probabilities renormalised over the k chosen (fp32). With k = 1 the
    renormalised gate is the constant 1, which would leave the router untrained by the task loss (only
    the auxiliary losses would move it): its value stays 1, its gradient is that of log p (p/stop_grad(p)).

    `jitter` ε multiplies the router's input by U(1-ε, 1+ε) while training (Switch; the experts see
    the clean input). `capacity_factor` c limits each expert to ceil(c·n·k/E) assignments while
    training; dropped ones get id -1 and gate 0 (see the module docstring). `last` keeps (logits,
    ids before dropping) of the last forward for `aux_losses` / `expert_stats`.
    """

    def __init__(self, d_model: int, n_experts: int, k: int = 2, jitter: float = 0.0,
                 capacity_factor: float | None = None):
        super().__init__()
        if not 1 <= k <= n_experts:
            raise MoEError(f"moe top_k: {k} must be between 1 and the number of experts ({n_experts})")
        if jitter < 0 or (capacity_factor is not None and capacity_factor <= 0):
            raise MoEError("moe jitter must be >= 0 and capacity_factor > 0 (or null: dropless)")
        self.n_experts, self.k, self.jitter, self.capacity_factor = n_experts, k, jitter, capacity_factor
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))  # Mixtral's `gate.weight` layout (E, d)
        nn.init.normal_(self.weight, std=0.02)  # Mixtral's initializer_range: random, so tokens spread out
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.to(self.weight.dtype)
        if self.training and self.jitter > 0:
            h = h * torch.empty_like(h).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = F.linear(h, self.weight)  # (n, E)
        probs = torch.softmax(logits.float(), dim=-1)
        top, ids = torch.topk(probs, self.k, dim=-1)  # (n, k), highest first
        if self.k == 1:  # renormalised, a lone gate is 1 with no gradient: keep the value 1 (Mixtral computes
            gates = top / top.detach()  # the same) but let it carry log p's gradient, so the task loss trains the router
        else:
            gates = top / top.sum(dim=-1, keepdim=True)
        self.last = (logits, ids)
        if self.training and self.capacity_factor is not None:
            ids, gates = drop_over_capacity(ids, gates, self.n_experts, self.capacity_factor)
        return ids, gates

    def capacity(self, n_tokens: int) -> int:
        return capacity(n_tokens, self.k, self.n_experts, self.capacity_factor)

    def extra_repr(self) -> str:
        return (f"experts={self.n_experts}, k={self.k}, jitter={self.jitter}, "
                f"capacity_factor={self.capacity_factor}")


def capacity(n_tokens: int, k: int, n_experts: int, factor: float | None) -> int:
    """Assignments one expert may take in a forward of n tokens: ceil(c·n·k/E); dropless: n."""
    return n_tokens if factor is None else math.ceil(factor * n_tokens * k / n_experts)


def drop_over_capacity(ids: torch.Tensor, gates: torch.Tensor, n_experts: int, factor: float):
    """Keep each expert's first ceil(c·n·k/E) assignments in token order; the rest get id -1, gate 0."""
    n, k = ids.shape
    flat = ids.reshape(-1)  # row-major: token 0's choices, then token 1's, ...
    seen = torch.cumsum(F.one_hot(flat, n_experts), dim=0)  # (n·k, E) running count per expert
    position = seen.gather(1, flat[:, None]).squeeze(1) - 1  # this assignment's place in its expert's queue
    keep = (position < capacity(n, k, n_experts, factor)).reshape(n, k)
    return torch.where(keep, ids, -1), torch.where(keep, gates, torch.zeros_like(gates))


class MoEMLP(nn.Module):
    """N experts behind one MLP slot; each token runs through one of them (enforced routing) or
    through the k its router picks, weighted by their gates.

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
        if ids is not None and self.router is not None:
            self.router.last = None  # enforced routing won: no router statistics for this forward
        if ids is None and self.router is not None:
            ids, gate = self.router(x.reshape(-1, x.shape[-1]))
        if ids is None:
            return self.expert(0)(x)
        if ids.dim() == 2:  # (n, k) from a top-k router
            out = combine(x.reshape(-1, x.shape[-1]), ids, gate, self.expert, self.n_experts)
            return out.reshape(*x.shape[:-1], out.shape[-1])
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


def combine(x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor, expert, n_experts: int) -> torch.Tensor:
    """out[i] = Σ_j gates[i, j] · expert_{ids[i, j]}(x[i]) for x (n, d), ids/gates (n, k); an id of -1 (an
    assignment dropped over capacity) adds nothing. Grouped by expert: one call per expert used, on
    the tokens that chose it, so the work is k dense MLP passes at most."""
    n, k = ids.shape
    flat, weight = ids.reshape(-1).long(), gates.reshape(-1)
    token = torch.arange(n, device=x.device).repeat_interleave(k)  # the token of each assignment
    if flat.numel() and int(flat.max()) >= n_experts:
        raise MoEError(f"router id {int(flat.max())} is out of range: this layer has experts 0..{n_experts - 1}")
    out = None
    for e in torch.unique(flat[flat >= 0]).tolist():
        pick = flat == e
        rows = token[pick]
        y = expert(e)(x[rows]) * weight[pick, None].to(x.dtype)
        if out is None:
            out = y.new_zeros(n, y.shape[-1])
        out = out.index_add(0, rows, y)
    return out if out is not None else torch.zeros_like(x)  # everything dropped: the residual alone


def _routed(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(logits (n, E), ids (n, k), E) of every MoE layer whose router ran in the last forward."""
    return [(m.router.last[0], m.router.last[1], m.n_experts) for m in moe_modules(model)
            if getattr(m.router, "last", None) is not None]


def aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """The router losses of the last forward, averaged over the routed layers ({} if none ran):

    - `moe_balance` = E·Σ_e f_e·P_e (Switch eq. 4; Mixtral's), f_e the fraction of the n·k top-k
      assignments that chose expert e (before capacity drops), P_e the mean router probability of e:
      1 when tokens spread evenly, E when they all pick one expert. (transformers' Mixtral
      `load_balancing_loss_func` counts f over tokens, not assignments, so its value is k times this.)
    - `moe_z` = mean over tokens of logsumexp(logits)² (ST-MoE): keeps the router logits small.
    """
    routed = _routed(model)
    if not routed:
        return {}
    balance, z = [], []
    for logits, ids, n_experts in routed:
        logits = logits.float()
        share = torch.bincount(ids.reshape(-1), minlength=n_experts).to(logits.dtype) / ids.numel()
        balance.append(n_experts * (share * torch.softmax(logits, dim=-1).mean(0)).sum())
        z.append(torch.logsumexp(logits, dim=-1).pow(2).mean())
    return {"moe_balance": torch.stack(balance).mean(), "moe_z": torch.stack(z).mean()}


@torch.no_grad()
def expert_stats(model: nn.Module) -> dict[str, float]:
    """What the routers did in the last forward, averaged over routed layers: `moe/share_e{e}` the
    fraction of assignments expert e got (1/E each when balanced), `moe/load_entropy` the entropy of
    those shares (nats; ln E when balanced, 0 when one expert takes all) and `moe/router_entropy` the
    mean entropy of a token's router distribution (ln E: undecided; 0: certain)."""
    routed = _routed(model)
    if not routed:
        return {}
    shares: dict[int, list[torch.Tensor]] = {}
    load, router = [], []
    for logits, ids, n_experts in routed:  # tensors first, one device sync at the end
        share = torch.bincount(ids.reshape(-1), minlength=n_experts).double() / ids.numel()
        logp = torch.log_softmax(logits.double(), dim=-1)
        load.append(-(share * share.clamp_min(1e-12).log()).sum())
        router.append(-(logp.exp() * logp).sum(-1).mean())
        for e in range(n_experts):
            shares.setdefault(e, []).append(share[e])
    values = torch.stack([torch.stack(v).mean() for _, v in sorted(shares.items())]
                         + [torch.stack(load).mean(), torch.stack(router).mean()]).tolist()
    stats = {f"moe/share_e{e}": v for e, v in zip(sorted(shares), values)}
    stats["moe/load_entropy"], stats["moe/router_entropy"] = values[-2], values[-1]
    return stats


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


def upcycle(model: nn.Module, experts: int, layers="all", router: dict | None = None,
            noise: float = 0.0) -> list[MoEMLP]:
    """Replace the MLP of the chosen layers by `experts` copies of itself (in place); return the MoE
    modules. Expert 0 is the pretrained module; the others are deep copies, so the output is unchanged.

    `router`: TopKRouter options (k, jitter, capacity_factor) to give every upcycled MLP a learned
    top-k router (decoders only: BERT's MLP is split over two modules, which a weighted sum of
    experts cannot span); None: enforced routing only. `noise` σ adds N(0, (σ·std(w))²) to every
    weight w of the copies 1..N-1 (Komatsuzaki et al. upcycle exactly, σ = 0); expert 0 stays exact.
    """
    if experts < 1:
        raise MoEError(f"moe experts: need at least 1, got {experts}")
    slots = mlp_slots(model)
    if router is not None and any(len(s) != 1 for s in slots):
        raise MoEError(f"{type(model).__name__}: a learned router needs one MLP module per layer (a decoder); "
                       "this model splits its MLP (BERT): use enforced routing")
    made = []
    for i in choose_layers(len(slots), layers):
        for parent, attr in slots[i]:
            base = getattr(parent, attr)
            if isinstance(base, MoEMLP):
                raise MoEError(f"layer {i} is already upcycled")
            copies = [copy.deepcopy(base) for _ in range(experts - 1)]
            if noise:
                _add_noise(copies, noise)
            gate = None
            if router is not None:
                weight = next(base.parameters())
                gate = TopKRouter(_width(model, base), experts, **router).to(weight.device)
            moe = MoEMLP([base] + copies, gate)
            setattr(parent, attr, moe)
            made.append(moe)
    return made


def _width(model: nn.Module, mlp: nn.Module) -> int:
    """The hidden size an MLP reads: its first Linear's input width."""
    first = next((m for m in mlp.modules() if isinstance(m, nn.Linear)), None)
    return first.in_features if first is not None else int(model.config.hidden_size)


@torch.no_grad()
def _add_noise(experts: list[nn.Module], sigma: float) -> None:
    for e in experts:
        for p in e.parameters():
            if p.is_floating_point() and p.numel() > 1:
                p.add_(torch.randn_like(p) * (sigma * float(p.float().std())))


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
