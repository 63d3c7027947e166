"""SpIEL sparse fine-tuning (Ansell et al., 2024, "Scaling Sparse Fine-Tuning to Large Language Models").

Each target Linear trains k = round(density · numel) entries of its weight: `sparse_indices` (flat
positions) and `sparse_values` φ, so W' = W + scatter(φ at indices) and y = x W'ᵀ + b. φ starts at 0
(training starts at the base model) at k random positions. The gradient of φ is the dense weight
gradient gathered at the indices. Decoupled weight decay acts on φ (φ −= lr·wd·φ, `sparse.weight_decay`,
on by default), pulling the weights back toward the pretrained ones.

The method brings its own optimizer (`make_optimizer`, `SparseOptimizer`), as the reference does:
- `ag`: AdamW whose bias correction counts per entry (an `age` per value), so an entry grown mid-run
  gets Adam's first-step behaviour instead of the whole matrix's step count; O(k) state.
- `ma`: SM3 (Anil et al., 2019): per matrix a row accumulator R[d_out] and a column one C[d_in];
  u = min(R[i], C[j]) + g², R and C take the max of u per row/column, φ −= lr·g/√(u + ε). Its
  state is O(d_in + d_out) per matrix, no per-value moments.

The active set moves during training (update → prune → regrow, after the optimizer step): a
selection phase opens at steps t with (t+1) mod S = 0 (and at the start), and at t mod S = A the
n = ⌊p·k⌋ active entries with the smallest |φ| are dropped and n new ones grown, with value 0:
- `ag`: the candidates are the top-k |∇W| at the phase's first gradient; their gradients are summed
  over the phase (a hook on the dense weight, only while a phase is open) and the largest |Σg| grow.
  An index both dropped and grown stays, value and all. A grown entry's moments are seeded from the
  phase's a steps, m = mean(g)·(1−β1^a), v = mean(g²)·(1−β2^a), and its age set to a, so that after
  bias correction they read as the phase's mean and mean square.
- `ma`: inactive (i, j) grow by SM3's R[i]·C[j]. No dense gradient ever.
p = 1 at the first reselection (it replaces the random start), then regrow · (1 − t/T).

Pick it over LoRA when the update should be a few exact weights rather than a low-rank product: the
paper reports it often beats LoRA at a similar run time, and the result merges into the weights.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ..config import Config, invalid
from .base import MethodBase, MethodError, select_modules, set_module
from .catalog import Variant


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, so every rank selects the same indices (a no-op in one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _mask(numel: int, idx: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(numel, dtype=torch.bool, device=idx.device)
    mask[idx] = True
    return mask


def plan_swap(indices: torch.Tensor, values: torch.Tensor, numel: int, n: int, scores: torch.Tensor,
              candidates: torch.Tensor | None = None):
    """Which slots of `indices` to overwrite, with which flat positions: (slots, incoming, picked),
    `picked` being the incoming entries' positions in `candidates` (None without candidates).

    Drop the n entries with the smallest |value|. With `candidates` (ag), grow the top-n of
    `scores` among candidates that do not stay active; a dropped index that is grown again keeps
    its slot. Without (ma), `scores` is dense and only inactive positions grow (as SpIEL's SM3)."""
    drop = torch.topk(values.detach().abs(), n, largest=False, sorted=True).indices  # smallest first
    dropped = _mask(numel, indices[drop])
    if candidates is None:
        scores = scores.masked_fill(_mask(numel, indices), float("-inf"))
        grown = torch.topk(scores, min(n, numel - indices.numel()), sorted=True).indices
        return drop[:grown.numel()], grown, None
    stays = _mask(numel, indices) & ~dropped
    valid = torch.nonzero(~stays[candidates]).flatten()
    picked = valid[torch.topk(scores[valid], min(n, valid.numel()), sorted=True).indices]  # best first
    grown = candidates[picked]
    drop = drop[~_mask(numel, grown)[indices[drop]]]
    fresh = ~dropped[grown]
    grown, picked = grown[fresh], picked[fresh]
    m = min(drop.numel(), grown.numel())
    return drop[:m], grown[:m], picked[:m]


def sm3_update(row: torch.Tensor, col: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
               grad: torch.Tensor) -> torch.Tensor:
    """SM3's cover update, in place: u = min(R[i], C[j]) + g², then R, C take the max of u per
    row/column; returns u (the entries' second-moment estimates)."""
    u = torch.minimum(row[rows], col[cols]) + grad.float() ** 2
    row.scatter_reduce_(0, rows, u, "amax")
    col.scatter_reduce_(0, cols, u, "amax")
    return u


def reset_optimizer_state(optimizer, param: nn.Parameter, slots: torch.Tensor, mean: torch.Tensor | None = None,
                          mean_sq: torch.Tensor | None = None, age: float = 0.0) -> None:
    """Fresh Adam state at `slots` of `param`: zero, or seeded with `age` steps' gradient mean and mean
    square, m = mean·(1−β1^age), v = mean_sq·(1−β2^age), so bias correction reads them back. With a
    per-entry age (SparseOptimizer) those slots get that age; a plain AdamW's step count is per
    parameter, so the seeds are scaled by its count instead."""
    state = optimizer.state.get(param) if optimizer is not None else None
    if not state or "exp_avg" not in state:
        return
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), {})
    beta1, beta2 = group.get("betas", (0.9, 0.999))
    per_entry = "age" in state and state["age"].shape == param.shape
    if per_entry:
        state["age"][slots] = float(age) if mean is not None else 0.0
    t = float(age) if per_entry else float(state.get("step", 0.0))
    seeds = (("exp_avg", mean, beta1), ("exp_avg_sq", mean_sq, beta2), ("max_exp_avg_sq", mean_sq, beta2))
    for key, init, beta in seeds:
        if key in state:
            state[key][slots] = 0.0 if init is None else (init * (1.0 - beta ** t)).to(state[key].dtype)


class SparseOptimizer(torch.optim.Optimizer):
    """The optimizer of SpIEL's values (any other trainable parameter gets plain AdamW):
    `ag` values: AdamW with a per-entry age for bias correction; `ma` values: SM3 (module docstring).
    Decoupled weight decay (a group's `weight_decay`) is applied first: p ← p·(1 − lr·wd)."""

    def __init__(self, params, layers: dict, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": 0.0})
        self.layers = layers  # id(values parameter) -> its SparseLinear

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["weight_decay"]:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                layer = self.layers.get(id(p))
                if layer is not None and layer.criterion == "ma":
                    self._sm3(p, layer, group)
                else:
                    self._adam(p, group, per_entry=layer is not None)
        return loss

    def _adam(self, p, group, per_entry: bool) -> None:
        state, (beta1, beta2) = self.state[p], group["betas"]
        if not state:
            state["age"] = torch.zeros_like(p, dtype=torch.float32) if per_entry else torch.zeros((), device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        g, age, m, v = p.grad.float(), state["age"], state["exp_avg"], state["exp_avg_sq"]
        age.add_(1.0)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        bias1 = 1.0 - torch.pow(beta1, age)
        bias2 = 1.0 - torch.pow(beta2, age)
        update = (m / bias1) / ((v / bias2).sqrt_().add_(group["eps"]))
        p.add_(update.to(p.dtype), alpha=-group["lr"])

    def _sm3(self, p, layer, group) -> None:
        state = self.state[p]
        if not state:
            state["row"] = torch.zeros(layer.out_features, device=p.device, dtype=torch.float32)
            state["col"] = torch.zeros(layer.in_features, device=p.device, dtype=torch.float32)
        idx = layer.sparse_indices
        g = p.grad.float()
        u = sm3_update(state["row"], state["col"], idx // layer.in_features, idx % layer.in_features, g)
        p.add_((g / (u + group["eps"]).sqrt()).to(p.dtype), alpha=-group["lr"])


class SparseLinear(nn.Linear):
    """An nn.Linear that keeps its own `weight`/`bias` keys and adds `sparse_indices`, `sparse_values`
    and, for `ag`, the state of its growth criterion (all persistent, so checkpoints resume mid-phase;
    `ma`'s criterion is SM3's accumulators, which the optimizer state carries)."""

    def __init__(self, base: nn.Linear, k: int, criterion: str):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same tensors: keys and storage unchanged
        self.criterion = criterion
        dev, numel = base.weight.device, base.weight.numel()
        indices = torch.randperm(numel)[:k].sort().values.to(dev)  # CPU generator: the same draw on any device
        self.register_buffer("sparse_indices", indices)
        self.sparse_values = nn.Parameter(torch.zeros(k, device=dev, dtype=torch.float32))
        if criterion == "ag":
            self.register_buffer("sparse_candidates", torch.zeros(k, device=dev, dtype=torch.int64))
            self.register_buffer("sparse_grad_sum", torch.zeros(k, device=dev, dtype=torch.float32))
            self.register_buffer("sparse_grad_sq", torch.zeros(k, device=dev, dtype=torch.float32))
            # steps accumulated in the open selection phase; -1: no phase open. The first one opens now.
            self.register_buffer("sparse_seen", torch.tensor(0, device=dev))
        self.collecting = criterion == "ag"  # mirrors sparse_seen >= 0 without a device sync per forward
        self._step_grad = None  # this rank's gradient at the candidates during the current step

    @property
    def k(self) -> int:
        return self.sparse_values.numel()

    def delta_weight(self) -> torch.Tensor:
        flat = torch.zeros(self.weight.numel(), device=self.sparse_values.device, dtype=torch.float32)
        return flat.index_add(0, self.sparse_indices, self.sparse_values).view_as(self.weight)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 sum, so the small values are not rounded away against bf16 weights; autograd gives
        # d values = (dense dW).flat[indices]
        flat = self.weight.float().flatten().index_add(0, self.sparse_indices, self.sparse_values)
        if self.collecting and flat.requires_grad:
            flat.register_hook(self._collect)
        w = flat.view(self.out_features, self.in_features)
        if torch.is_autocast_enabled(x.device.type):
            return F.linear(x, w, self.bias)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def _collect(self, grad: torch.Tensor) -> None:
        g = grad.reshape(-1).float()
        if self._step_grad is None:
            if int(self.sparse_seen) == 0:  # the phase's first gradient picks the candidates
                dense = _all_reduce(g.clone())
                self.sparse_candidates.copy_(torch.topk(dense.abs(), self.k, sorted=True).indices)
            self._step_grad = g[self.sparse_candidates]
        else:
            self._step_grad += g[self.sparse_candidates]

    @torch.no_grad()
    def end_step(self) -> None:
        """After an optimizer step: add the step's (all-rank) gradient statistics to `ag`'s criterion
        (`ma`'s accumulators are updated by the SM3 step itself)."""
        if self.criterion == "ag" and self._step_grad is not None:
            g = _all_reduce(self._step_grad)
            self._step_grad = None
            self.sparse_grad_sum += g
            self.sparse_grad_sq += g * g
            self.sparse_seen += 1

    @torch.no_grad()
    def open_phase(self) -> None:
        if self.criterion == "ag":
            self.sparse_grad_sum.zero_()
            self.sparse_grad_sq.zero_()
            self.sparse_seen.fill_(0)
            self.collecting, self._step_grad = True, None

    @torch.no_grad()
    def reselect(self, p: float, optimizer=None) -> int:
        """Drop ⌊p·k⌋ entries and grow as many (closing an open phase); return how many moved."""
        n = math.floor(p * self.k)
        idx, values, numel = self.sparse_indices, self.sparse_values, self.weight.numel()
        mean = mean_sq = None
        seen = 0
        if self.criterion == "ag":
            seen = int(self.sparse_seen)
            self.sparse_seen.fill_(-1)
            self.collecting, self._step_grad = False, None
            if n == 0 or seen <= 0:
                return 0
            slots, incoming, picked = plan_swap(idx, values, numel, n, self.sparse_grad_sum.abs(),
                                                self.sparse_candidates)
            mean, mean_sq = self.sparse_grad_sum[picked] / seen, self.sparse_grad_sq[picked] / seen
        else:
            if n == 0:
                return 0
            state = optimizer.state.get(values) if optimizer is not None else None
            if not state or "row" not in state:
                raise MethodError("sparse.criterion=ma grows by SM3's row/column accumulators: train with the "
                                  "method's optimizer (build_optimizer(model, train_cfg, method)), after a step")
            scores = torch.outer(state["row"], state["col"]).flatten()
            slots, incoming, _ = plan_swap(idx, values, numel, n, scores)
        idx[slots] = incoming
        values[slots] = 0.0
        reset_optimizer_state(optimizer, values, slots, mean, mean_sq, seen)
        return int(slots.numel())

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + Δ (in the base weight's dtype)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, criterion={self.criterion}"


def sparse_modules(model: nn.Module) -> dict[str, SparseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


class SparseConfig(Config):
    density: float = Field(0.01, gt=0, le=1)
    "Fraction of each target matrix's entries that train (SpIEL's default 1%)."
    targets: list[str] = Field(default_factory=lambda: ["all-linear"])
    "Linear layers that get sparse deltas, as for LoRA."
    reselect_every: int = Field(20, gt=0)
    "S: every S optimizer steps, prune and regrow the active entries."
    accumulate_steps: int = Field(5, gt=0)
    "A: steps over which the growth criterion is accumulated before the swap."
    regrow: float = Field(0.2, ge=0, le=1)
    "Fraction of active entries swapped at a reselection, decaying linearly to 0 over the run."
    criterion: Literal["ag", "ma"] = "ag"
    "`ag`: AdamW, grow by accumulated gradients; `ma`: SM3 (O(d_in+d_out) state per matrix; paper lr 4e-4 to 2e-3), grow by its row×column statistic."
    weight_decay: float = Field(1.0, ge=0)
    "Pull toward the pretrained weights: values decay by lr·wd each step (SpIEL: wd 1-30 at lr 1e-5)."

    @model_validator(mode="after")
    def _accumulate_within_period(self):
        if self.accumulate_steps >= self.reselect_every:
            raise invalid(f"must be < reselect_every ({self.reselect_every}), got {self.accumulate_steps}",
                          "accumulate_steps")
        return self


class Sparse(MethodBase):
    """The `sparse` method: wrap target Linears in SparseLinear; only their values train.

    `total_steps` (T of the regrow decay) is set by the loop through `on_train_start`; while it is
    None (the method used outside the loop) the decay follows the learning-rate schedule instead
    (regrow · lr_t / peak lr, the same line under a linear schedule without warm-up)."""

    name = "sparse"
    mergeable = True
    Options = SparseConfig
    paper = "Ansell et al., 2024 (SpIEL)"
    when = "1% of each matrix trains, chosen and re-chosen during training; merges exactly"
    tiny = {"density": 0.05, "reselect_every": 3, "accumulate_steps": 1}
    variants = {"sparse-ma": Variant({"criterion": "ma"}, "Ansell et al., 2024 (SpIEL-MA)",
                                     "the least optimizer memory: SM3 state, O(d_in + d_out) per matrix")}

    def __init__(self, cfg):
        super().__init__(cfg)  # SparseConfig has checked criterion and accumulate_steps < reselect_every
        self.total_steps: int | None = None
        self.targets: list[str] = []

    def on_train_start(self, model: nn.Module, total_steps: int) -> None:
        self.total_steps = total_steps

    def apply(self, model: nn.Module) -> None:
        for name, mod in select_modules(model, self.cfg.targets):
            if isinstance(mod, SparseLinear):
                continue
            k = max(1, round(self.cfg.density * mod.weight.numel()))
            set_module(model, name, SparseLinear(mod, k, self.cfg.criterion))
            self.targets.append(name)

    def is_trainable(self, name: str, param) -> bool:
        return name.endswith(".sparse_values")

    def optimizer_options(self, name: str, param) -> dict:
        return {"decay": True} if self.is_trainable(name, param) else {}

    def make_optimizer(self, model: nn.Module, param_groups: list[dict], train_cfg) -> SparseOptimizer:
        """The values' optimizer (`build_optimizer` calls this): `ag` AdamW with per-entry ages, `ma`
        SM3; every group of values decays toward the base with `sparse.weight_decay`."""
        layers = {id(m.sparse_values): m for m in sparse_modules(model).values()}
        for group in param_groups:
            if all(id(p) in layers for p in group["params"]):
                group["weight_decay"] = self.cfg.weight_decay
        return SparseOptimizer(param_groups, layers, lr=train_cfg.lr, betas=tuple(train_cfg.betas))

    def merge(self, model: nn.Module) -> None:
        for name, mod in list(sparse_modules(model).items()):
            set_module(model, name, mod.merged())

    def on_epoch(self, model: nn.Module, epoch: int, optimizer=None) -> None:
        for mod in sparse_modules(model).values():
            if hasattr(mod.sparse_values, "full_tensor"):
                raise MethodError("method `sparse` cannot run under train.strategy=fsdp (its indices move "
                                  "between steps); use train.strategy=ddp or one process")
            if mod.criterion == "ag":  # a resumed run: the phase comes from the checkpoint
                mod.collecting = int(mod.sparse_seen) >= 0

    def regrow_fraction(self, step: int, optimizer) -> float:
        if step == self.cfg.accumulate_steps:
            return 1.0  # the first reselection replaces the random start
        if self.total_steps:
            return self.cfg.regrow * max(0.0, 1.0 - step / self.total_steps)
        group = optimizer.param_groups[0] if optimizer is not None else {}
        peak = group.get("initial_lr")
        return self.cfg.regrow * (min(1.0, group["lr"] / peak) if peak else 1.0)

    def after_step(self, model: nn.Module, step: int, optimizer) -> None:
        mods = list(sparse_modules(model).values())
        every, accumulate = self.cfg.reselect_every, self.cfg.accumulate_steps
        for mod in mods:
            mod.end_step()
        if step % every == accumulate:
            p = self.regrow_fraction(step, optimizer)
            for mod in mods:
                mod.reselect(p, optimizer)
        if (step + 1) % every == 0 and (not self.total_steps or step + 1 + accumulate <= self.total_steps):
            for mod in mods:
                mod.open_phase()

    def describe(self, model: nn.Module) -> str:
        mods = list(sparse_modules(model).values())
        if not mods:
            return ""
        k = sum(m.k for m in mods)
        numel = sum(m.weight.numel() for m in mods)
        update = "SM3" if self.cfg.criterion == "ma" else "AdamW with per-entry ages"
        return (f"{k:,} trained weights in {len(mods)} matrices ({100 * k / numel:.2f}% of their weights), "
                f"reselected every {self.cfg.reselect_every} steps by `{self.cfg.criterion}`, updated by {update}, "
                f"pulled toward the base with weight decay {self.cfg.weight_decay:g}")
