"""The planner's candidates: which settings to try, and which of them fit the machine.

A candidate is a label and a few recipe overrides over the user's recipe: a method (from the
method registry or a named catalog variant), a learning rate, optionally a rank, a micro-batch and
accumulation, the compute precision, and activation checkpointing when only it makes the run fit.
Each is estimated without loading weights (`tunesmith estimate`: peak memory, step time); those
over the memory budget are dropped with their estimate kept, so the table can say why.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml


class PlanError(ValueError):
    """A mistake in the plan's own input (a budget, a list, a candidate file): one line, named."""


# Usual peak learning rates per method, where the literature and this toolkit's recipes put them:
# full-weight methods train at ~1e-5, low-rank adapters ~1e-4, scale/prefix methods higher. A
# method class may declare its own `lr`, which wins over this table.
USUAL_LR = {"full": 2e-5, "freeze": 5e-5, "hft": 2e-5, "moe": 2e-5, "lora": 2e-4, "longlora": 2e-4,
            "moe_lora": 2e-4, "mam": 2e-4, "adapter": 2e-4, "sparse": 2e-4, "prefix": 1e-3, "ia3": 3e-3}
LR_GRID = (1.0, 1 / 3, 3.0)  # ×1, ×⅓, ×3 the usual rate: brackets the optimum without many pilots (the
# usual first: where nothing else tells candidates apart, the earlier one ranks higher)
DEFAULT_METHODS = ("lora", "full")


@dataclass
class Candidate:
    label: str
    overrides: dict  # recipe key -> value, applied over the user's recipe and overrides
    estimate: dict | None = None  # {peak_gb, step_s, trainable, tokens_per_step, checkpointing}
    fits: bool | None = None
    note: str = ""  # why it was dropped, or that checkpointing was added
    steps_in_budget: int | None = None
    step_s_source: str | None = None  # "estimate" or "pilot"
    pilot: dict = field(default_factory=dict)
    predicted_final_loss: float | None = None
    prediction: dict = field(default_factory=dict)
    rank: int | None = None

    def override_list(self) -> list[str]:
        return [as_override(k, v) for k, v in self.overrides.items()]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Candidate:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def as_override(key: str, value) -> str:
    """`key=value` in the form `apply_overrides` parses back to `value` (YAML flow style)."""
    if isinstance(value, str):
        return f"{key}={value}"
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return f"{key}={text.removesuffix('...').strip()}"


# --------------------------------------------------------------------------------------------------
# budgets


_TIME = re.compile(r"(\d+(?:\.\d+)?)\s*(h|m|min|s|sec)?", re.I)
_UNITS = {"h": 3600, "m": 60, "min": 60, "s": 1, "sec": 1, None: 1}


def parse_time(text: str, what: str = "--time") -> float:
    """`30m`, `1h30m`, `90s`, `45` (seconds) -> seconds."""
    text = str(text).strip().lower()
    parts = list(_TIME.finditer(text))
    if not text or not parts or "".join(m.group(0) for m in parts).replace(" ", "") != text.replace(" ", ""):
        raise PlanError(f"{what}: expected a duration such as 30m, 1h or 90s, got {text!r}")
    seconds = sum(float(m.group(1)) * _UNITS[m.group(2)] for m in parts)
    if seconds <= 0:
        raise PlanError(f"{what}: must be more than 0, got {text!r}")
    return seconds


_MEM = re.compile(r"^(\d+(?:\.\d+)?)\s*(kb|mb|gb|tb|kib|mib|gib|tib|k|m|g|t)?b?$", re.I)
_BYTES = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, None: 1e9}


def parse_memory(text: str) -> float:
    """`8GB`, `8GiB`, `512MB`, `8` (GB) -> bytes."""
    m = _MEM.match(str(text).strip())
    if not m or float(m.group(1)) <= 0:
        raise PlanError(f"--memory: expected a size such as 8GB, 16GiB or 512MB, got {text!r}")
    return float(m.group(1)) * _BYTES[m.group(2).lower() if m.group(2) else None]


def available_memory(device_name: str = "auto") -> float:
    """Bytes a run could use now: free memory of the GPU that would train, else MemAvailable."""
    import torch

    from ..runtime import pick_device

    device = pick_device(device_name)
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    import os

    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def parse_list(text: str | None, what: str, kind=float) -> list | None:
    """A comma-separated option (`--lrs 1e-4,3e-4`) as a list; None when not given."""
    if text is None:
        return None
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise PlanError(f"{what}: expected comma-separated {kind.__name__} values, got {text!r}") from None
    if not values or any(isinstance(v, (int, float)) and v <= 0 for v in values):
        raise PlanError(f"{what}: expected positive values, got {text!r}")
    return values


# --------------------------------------------------------------------------------------------------
# enumeration


def method_entries(names: list[str] | None, recipe) -> list[tuple[str, str, dict]]:
    """(label, registered method, options over the recipe's) for each asked method: a registry
    name, a catalog variant (`dora`, `lora+`) or `all`; by default the recipe's method, LoRA and full."""
    from ..methods import REGISTRY
    from ..methods.catalog import catalog

    variants = {e.label: e for e in catalog() if e.label != e.method}
    if not names:
        names = list(dict.fromkeys([recipe.method.name, *DEFAULT_METHODS]))
    elif names == ["all"]:
        names = list(REGISTRY)
    out = []
    for name in names:
        if name in REGISTRY:
            out.append((name, name, {}))
        elif name in variants:
            out.append((name, variants[name].method, dict(variants[name].options)))
        else:
            known = ", ".join([*REGISTRY, *variants])
            raise PlanError(f"--methods: unknown method `{name}`; choose from all, {known}")
    return out


def usual_lr(method: str, recipe) -> float:
    """The recipe's own lr for the recipe's own method (the user chose it), else the method's usual one."""
    from ..methods import method_class

    if method == recipe.method.name:
        return recipe.train.lr
    return float(getattr(method_class(method), "lr", None) or USUAL_LR.get(method, recipe.train.lr))


def _fmt(x: float) -> str:
    return f"{x:.1e}".replace("e-0", "e-").replace("e+0", "e")


def enumerate_candidates(recipe, methods: list[str] | None = None, lrs=None, ranks: list[int] | None = None,
                         batch_tokens: list[int] | None = None, grad_accum: list[int] | None = None) -> list[Candidate]:
    """The grid: methods × learning rates (×1, ×⅓, ×3 the usual; `lrs="default"`: the usual only;
    a list: those) × ranks (rank-taking methods, when asked) × micro-batches × accumulation."""
    from ..methods import method_class

    out = []
    for label, method, options in method_entries(methods, recipe):
        base = usual_lr(method, recipe)
        rates = [base * f for f in LR_GRID] if lrs is None else [base] if lrs == "default" else list(lrs)
        has_rank = "rank" in method_class(method).Options.model_fields
        for rank in (ranks if ranks and has_rank else [None]):
            for bt in batch_tokens or [None]:
                for ga in grad_accum or [None]:
                    for lr in rates:
                        over = {"method.name": method, **{f"method.{method}.{k}": v for k, v in options.items()}}
                        name = label
                        if rank is not None:
                            over[f"method.{method}.rank"], name = rank, f"{name}-r{rank}"
                        if bt is not None:
                            over["train.batch_tokens"], name = bt, f"{name}-bt{bt}"
                        if ga is not None:
                            over["train.grad_accum"], name = ga, f"{name}-ga{ga}"
                        over["train.lr"] = float(f"{lr:.3g}")
                        out.append(Candidate(f"{name}-lr{_fmt(lr)}", over))
    return out


def read_candidates(path: str | Path) -> list[Candidate]:
    """A candidate file: a YAML list of {label, overrides: {key: value}}, planned exactly as given."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"candidate file not found: {path}")
    try:
        items = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PlanError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(items, list) or not items:
        raise PlanError(f"{path}: a candidate file is a non-empty list of {{label, overrides}}")
    out, seen = [], set()
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("label"), str) \
                or not isinstance(item.get("overrides", {}), dict) or set(item) - {"label", "overrides"}:
            raise PlanError(f"{path}: item {i + 1} must be {{label: NAME, overrides: {{key: value}}}}")
        if item["label"] in seen or not re.fullmatch(r"[\w.+-]+", item["label"]):
            raise PlanError(f"{path}: item {i + 1}: label `{item['label']}` is repeated or not a folder name")
        seen.add(item["label"])
        out.append(Candidate(item["label"], dict(item.get("overrides") or {})))
    return out


# --------------------------------------------------------------------------------------------------
# what fits


def faster_precision(recipe) -> str:
    """bf16 where this machine's measured matmul peak (`tunesmith bench --peak`, cached) is higher
    in bf16 than in fp32; fp32 otherwise (many CPUs emulate bf16 matmuls slower than fp32)."""
    import torch

    from ..bench.throughput import matmul_peak
    from ..runtime import pick_device, set_threads

    device = pick_device(recipe.train.device)
    threads = set_threads(recipe.train.threads) if device.type == "cpu" else torch.get_num_threads()
    return "bf16" if matmul_peak(device, "bf16", threads) > matmul_peak(device, "fp32", threads) else "fp32"


def estimate_fit(cand: Candidate, load, memory_bytes: float, cache: dict, add_checkpointing: bool = True) -> None:
    """Estimate `cand` (`load(overrides)` gives its recipe); over `memory_bytes`, try again with
    activation checkpointing (only then: it costs a recompute); still over: not fit, estimate kept."""
    from ..bench.estimate import estimate
    from ..methods import MethodError

    def probe(over: dict) -> dict:
        recipe = load(over)
        key = yaml.safe_dump({k: v for k, v in over.items() if k != "train.lr"}, sort_keys=True)
        if key not in cache:
            e = estimate(recipe)
            cache[key] = {"peak_gb": e.peak_gb, "step_s": e.step_s, "trainable": e.trainable,
                          "tokens_per_step": e.tokens_per_step}
        return {**cache[key], "checkpointing": recipe.train.activation_checkpointing}

    try:
        cand.estimate = probe(cand.overrides)
        if cand.estimate["peak_gb"] * 1e9 > memory_bytes and add_checkpointing and not cand.estimate["checkpointing"]:
            over = {**cand.overrides, "train.activation_checkpointing": True}
            again = probe(over)
            if again["peak_gb"] * 1e9 <= memory_bytes:
                cand.overrides, cand.estimate, cand.label = over, again, f"{cand.label}-ckpt"
                cand.note = "activation checkpointing added: it does not fit without"
    except (MethodError, NotImplementedError) as e:  # a method that cannot apply to this model
        cand.fits, cand.note = False, f"not estimated: {str(e).splitlines()[0]}"
        return
    cand.fits = cand.estimate["peak_gb"] * 1e9 <= memory_bytes
    if not cand.fits:
        cand.note = f"estimated peak {cand.estimate['peak_gb']:.2f} GB > memory {memory_bytes / 1e9:.2f} GB"


def steps_for(seconds: float, step_s: float | None) -> int | None:
    return None if not step_s else max(1, int(math.floor(seconds / step_s)))
