"""`train.speed=auto`: the fastest settings that fit this machine, chosen from measurements.

    choice = choose_speed(recipe, peak=matmul_peak, estimate=estimate)   # the tunesmith verbs do this
    print(choice.report()); train(choice.recipe)

Only keys the recipe leaves unset are chosen (pydantic's `model_fields_set` of its model and train
sections: set in the file, by an override or by a stage); `train.speed=off` returns the recipe as is.

- compute precision: bf16 when this device's measured bf16 matmul peak beats fp32's (`bench
  --peak`, cached; measured quickly at a small size when not cached). An AVX2 CPU without bf16
  hardware runs bf16 matmuls tens of times slower than fp32; a GPU or an AMX CPU the other way round.
- frozen weights (model.frozen_dtype): stored in bf16 only under bf16 compute (a bf16 frozen weight
  under fp32 makes the layer compute in bf16 anyway), or as the last resort when memory is short.
- loss, micro-batch, checkpointing: from `tunesmith estimate`'s peak memory against the free memory
  (MemAvailable, or the GPU's free memory) times SAFETY: the whole-logits loss when it fits (no
  lm_head recompute), else the chunked one; the largest micro-batch that fits without activation
  checkpointing (tokens per optimizer step kept: micro-batch × grad_accum), else checkpointing of
  every n-th layer, n as large as fits. The estimate is made once at the fastest setting (twice more
  at most) and scaled: every part it counts grows linearly with the micro-batch.
- allocator: fixed when the process starts (`runtime.reexec_with_allocator`, before the recipe is
  read), so it is reported, not chosen per recipe.

A resumed run (`resume=true`) takes the chosen keys from the run folder's recipe.yaml: the data
order and the stages' fingerprints depend on them, and free memory may differ from the first start.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..runtime import allocator_in_use, pick_device, set_threads

SAFETY = 0.8  # the share of the free memory a run plans to use (the estimate is within ~15%)
CHUNK = 1024  # loss_chunk when the whole logits do not fit
QUICK_SIZE = {"cpu": 512, "cuda": 4096}  # matmul size of a quick peak measurement (bf16 on AVX2: ~1 s)
EVERY = (8, 4, 3, 2, 1)  # checkpoint every n-th layer, fewest checkpointed layers first
SECTIONS = {"precision": "train", "frozen_dtype": "model", "loss_chunk": "train", "activation_checkpointing": "train",
            "checkpoint_every": "train", "batch_tokens": "train", "batch_size": "train", "grad_accum": "train"}


@dataclass
class SpeedChoice:
    recipe: object  # the recipe to train: a copy with the chosen keys set
    lines: list[str] = field(default_factory=list)  # one per choice, with why
    changes: dict[str, object] = field(default_factory=dict)  # `train.precision` -> "fp32", ...
    estimate: object = None  # the estimate of exactly the chosen settings, when one was made

    @property
    def overrides(self) -> list[str]:
        """The changes as `a.b=c` overrides (for a relaunched process: there they are explicit)."""
        text = lambda v: str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731
        return [f"{key}={text(value)}" for key, value in self.changes.items()]

    def report(self) -> str:
        return "\n".join(f"[tunesmith] {line}" if i == 0 else f"            {line}" for i, line in enumerate(self.lines))


def explicit(recipe) -> set[str]:
    """`section.key` of every speed key the recipe sets itself (file, override or stage)."""
    out = {f"model.{k}" for k in recipe.model.model_fields_set} | {f"train.{k}" for k in recipe.train.model_fields_set}
    if recipe.train.effective_batch:  # grad_accum follows from it
        out.add("train.grad_accum")
    return out


class _Plan:
    """The recipe being chosen for: current values, which keys are free, the report lines."""

    def __init__(self, recipe, device):
        self.recipe, self.device = copy.deepcopy(recipe), device
        self.given = explicit(recipe)
        self.lines: list[str] = []
        self.changes: dict[str, object] = {}
        self.estimate = None

    def free(self, key: str) -> bool:
        return f"{SECTIONS[key]}.{key}" not in self.given

    def get(self, key: str):
        return getattr(getattr(self.recipe, SECTIONS[key]), key)

    def set(self, key: str, value) -> None:
        if not self.free(key):
            return
        section = getattr(self.recipe, SECTIONS[key])
        if getattr(section, key) != value:
            self.changes[f"{SECTIONS[key]}.{key}"] = value
        setattr(section, key, value)

    def with_values(self, **values):
        """A copy of the recipe with these keys set (free or not: for the estimate only)."""
        recipe = copy.deepcopy(self.recipe)
        for key, value in values.items():
            setattr(getattr(recipe, SECTIONS[key]), key, value)
        return recipe

    def result(self) -> SpeedChoice:
        kept = sorted(f"{SECTIONS[k]}.{k}" for k in SECTIONS if not self.free(k))
        if kept:
            self.lines.append(f"kept (set in the recipe): {', '.join(kept)}")
        self.lines[0] = "speed=auto: " + self.lines[0]
        return SpeedChoice(self.recipe, self.lines, self.changes, self.estimate)


def choose_speed(recipe, device=None, *, peak=None, estimate=None, free_bytes=None) -> SpeedChoice:
    """The recipe with its unset speed keys chosen (see the module docstring). `peak(device, dtype,
    threads, size=, seconds=)` gives a matmul peak in TFLOP/s (`bench.matmul_peak`); `estimate(recipe)`
    an Estimate (`bench.estimate.estimate`); `free_bytes(device)` the memory a run may use (default:
    `usable_memory`). Without `peak` the precision is kept, without `estimate` the memory keys."""
    if recipe.train.speed == "off":
        return SpeedChoice(recipe)
    device = device or pick_device(recipe.train.device)
    plan = _Plan(recipe, device)
    if _resumed(plan):
        return plan.result()
    _choose_precision(plan, peak)
    _choose_memory(plan, estimate, free_bytes or usable_memory)
    plan.lines.append(f"allocator {allocator_in_use()} (chosen when the process starts, before the recipe is "
                      "read: jemalloc when installed; TUNESMITH_ALLOCATOR=system for the system's)")
    return plan.result()


def _resumed(plan: _Plan) -> bool:
    """A resumed run keeps what its first start chose (the run folder's recipe.yaml)."""
    path = Path(plan.recipe.run_dir) / "recipe.yaml"
    if not (plan.recipe.resume and path.is_file()):
        return False
    saved = yaml.safe_load(path.read_text()) or {}
    for key, section in SECTIONS.items():
        value = (saved.get(section) or {}).get(key)
        if value is not None:
            plan.set(key, value)
    plan.lines.append(f"resume: the settings the run started with ({path}): "
                      + (", ".join(f"{k}={v}" for k, v in plan.changes.items()) or "unchanged"))
    return True


def _choose_precision(plan: _Plan, peak) -> None:
    precision, frozen = plan.get("precision"), plan.get("frozen_dtype")
    if not plan.free("precision"):
        why = "set in the recipe"
    elif not plan.free("frozen_dtype") and frozen in ("bf16", "fp16"):
        precision, why = frozen, f"model.frozen_dtype={frozen} is set: its layers compute in {frozen}"
    else:
        precision, why = _measured_precision(plan, peak)
    plan.set("precision", precision)
    if plan.free("frozen_dtype"):
        half = plan.get("precision") in ("bf16", "fp16")
        plan.set("frozen_dtype", plan.get("precision") if half else "same")
        frozen_why = "half the frozen weights' memory under half-precision compute" if half else \
            "fp32 compute: bf16 frozen weights would make their layers compute in bf16"
    else:
        frozen_why = "set in the recipe"
    plan.lines.append(f"precision {plan.get('precision')} ({why})")
    plan.lines.append(f"frozen weights {plan.get('frozen_dtype')} ({frozen_why})")


def _measured_precision(plan: _Plan, peak) -> tuple[str, str]:
    """bf16 where this device's measured bf16 matmul peak beats fp32's, else fp32 (fp16 needs loss
    scaling and is never chosen)."""
    device = plan.device
    if device.type == "cuda":
        import torch

        if not torch.cuda.is_bf16_supported():
            return "fp32", "this GPU has no bf16"
    if peak is None:
        return plan.get("precision"), "the recipe's: no matmul peak to compare"
    threads = set_threads(plan.recipe.train.threads) if device.type == "cpu" else None
    size = QUICK_SIZE.get(device.type, 2048)
    try:
        bf16, fp32 = (peak(device, dtype, threads, size=size, seconds=1.0) for dtype in ("bf16", "fp32"))
    except Exception as e:  # noqa: BLE001 — no measurement: the recipe's precision stands
        return plan.get("precision"), f"the recipe's: the matmul peak could not be measured ({e})"
    return ("bf16" if bf16 > fp32 else "fp32"), f"bf16 {bf16:.3g} vs fp32 {fp32:.3g} TFLOP/s measured"


# --------------------------------------------------------------------------------------------------
# memory: loss, micro-batch, checkpointing


def usable_memory(device) -> tuple[float, str]:
    """(bytes a training process may plan to use, how they were found): SAFETY × the GPU's free
    memory, or on a CPU SAFETY × (MemAvailable + this process's RSS, which the estimate counts as
    its runtime), the cgroup's limit where lower, shared by the recipe's processes."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return SAFETY * free, f"{SAFETY:g} × {free / 1e9:.1f} GB free on {device}"
    avail = _meminfo("MemAvailable")
    cgroup = _cgroup_room()
    free = min(avail, cgroup) if cgroup is not None else avail
    total = free + _rss()
    return SAFETY * total, f"{SAFETY:g} × ({free / 1e9:.1f} GB available + {_rss() / 1e9:.1f} GB this process holds)"


def _meminfo(key: str) -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def _cgroup_room() -> float | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) - used


def _rss() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0.0


@dataclass
class _Need:
    """Peak memory as a function of the micro-batch, from one estimate: fixed parts plus parts that
    grow with the micro-batch (activations, what the allocator holds, a whole-logits loss) plus a
    chunked loss's constant transient; a full fine-tune's gradients may be the larger term."""

    fixed: float
    grads: float
    per_unit: float
    constant: float

    def at(self, units: float) -> float:
        return self.fixed + max(self.per_unit * units + self.constant, self.grads)


def _need(e, units: int, chunk: int, device, activations: float | None = None) -> _Need:
    parts = e.parts
    fixed = parts["weights"] + parts["optimizer"] + (parts["runtime"] if device.type != "cuda" else 0)
    grows = (parts["activations"] if activations is None else activations) + parts["allocator held"]
    whole = chunk <= 0 or chunk >= e.info["tokens_per_micro_batch"]
    transient = parts["backward transient"]
    return _Need(fixed, parts["gradients"], (grows + (transient if whole else 0)) / units, 0 if whole else transient)


def _micro_options(plan: _Plan) -> tuple[str, list[int]]:
    """The micro-batch key (`batch_tokens` packed, `batch_size` padded) and its sizes to try, largest
    first, each keeping the tokens (samples) per optimizer step: micro-batch × grad_accum."""
    recipe = plan.recipe
    key = "batch_tokens" if recipe.data.packing else "batch_size"
    size = plan.get(key)
    if not plan.free(key):
        return key, [size]
    if recipe.train.effective_batch:  # grad_accum follows the micro-batch: only smaller ones
        total = size
    elif plan.free("grad_accum"):
        total = size * plan.get("grad_accum")
    else:
        return key, [size]
    smallest = min(recipe.data.max_length, size) if key == "batch_tokens" else 1
    sizes = [total]
    while sizes[-1] % 2 == 0 and sizes[-1] // 2 >= smallest:
        sizes.append(sizes[-1] // 2)
    return key, sizes


def _set_micro(plan: _Plan, key: str, size: int, options: list[int]) -> None:
    if plan.free(key) and len(options) > 1:
        total = options[0]
        plan.set(key, size)
        if not plan.recipe.train.effective_batch:
            plan.set("grad_accum", total // size)


def _choose_memory(plan: _Plan, estimate, free_bytes) -> None:
    from ..objectives import objective_class

    if estimate is None or not objective_class(plan.recipe.objective.name).token_loss:
        plan.lines.append("loss, micro-batch, checkpointing: the recipe's (no memory estimate for objective "
                          f"`{plan.recipe.objective.name}`)")
        return
    key, sizes = _micro_options(plan)
    if not any(plan.free(k) for k in ("loss_chunk", "activation_checkpointing", "checkpoint_every", key)):
        return  # all set in the recipe (listed as kept)
    budget, where = free_bytes(plan.device)
    processes = plan.recipe.nproc if plan.device.type == "cpu" else 1
    budget /= processes
    chunks = [0, CHUNK] if plan.free("loss_chunk") else [plan.get("loss_chunk")]
    ckpt_free = plan.free("activation_checkpointing")
    ckpt = False if ckpt_free else plan.get("activation_checkpointing")
    every = plan.get("checkpoint_every")
    cache: dict = {}
    merged = len(sizes) > 1 and plan.free("grad_accum") and not plan.recipe.train.effective_batch
    accum = 1 if merged else plan.get("grad_accum")  # at the largest micro-batch

    def measured(chunk, checkpointing):
        if (chunk, checkpointing) not in cache:
            recipe = plan.with_values(loss_chunk=chunk, activation_checkpointing=checkpointing,
                                      checkpoint_every=1 if checkpointing and ckpt_free else every,
                                      **{key: sizes[0]}, grad_accum=accum)
            cache[chunk, checkpointing] = estimate(recipe)
        return cache[chunk, checkpointing]

    try:
        found = _search(plan, measured, sizes, chunks, ckpt, ckpt_free, budget)
    except Exception as e:  # noqa: BLE001 — no estimate: the recipe's memory settings stand
        plan.lines.append(f"loss, micro-batch, checkpointing: the recipe's (the estimate failed: {e})")
        return
    finally:
        _trim()
    chunk, size, n, need = found
    if size == sizes[0] and n in (None, 1 if ckpt_free else every) and (chunk, n is not None) in cache:
        plan.estimate = cache[chunk, n is not None]  # made at exactly these settings
    plan.set("loss_chunk", chunk)
    _set_micro(plan, key, size, sizes)
    if ckpt_free:
        plan.set("activation_checkpointing", n is not None)
        if n is not None and plan.free("checkpoint_every"):
            plan.set("checkpoint_every", n)
    fits = need <= budget
    if not fits:
        _memory_short(plan)
    share = f"{'/' + str(processes) + ' processes' if processes > 1 else ''}"
    plan.lines.append(f"loss {'whole logits' if plan.get('loss_chunk') <= 0 else 'chunked'} "
                      f"(loss_chunk={plan.get('loss_chunk')}), micro-batch {plan.get(key)} "
                      f"{'tokens' if key == 'batch_tokens' else 'samples'} × {plan.get('grad_accum')}, checkpointing "
                      f"{_ckpt_text(plan)}: estimated peak {need / 1e9:.2f} GB "
                      f"{'within' if fits else 'OVER'} {budget / 1e9:.2f} GB usable ({where}{share})")


def _trim() -> None:
    """Hand the estimate's probes' freed heap back to the OS: the run (and an estimate made next in
    this process, which counts its RSS as runtime) starts from what it holds itself."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _ckpt_text(plan: _Plan) -> str:
    if not plan.get("activation_checkpointing"):
        return "none"
    n = plan.get("checkpoint_every")
    return "every layer" if n == 1 else f"every {n}th layer"


def _search(plan: _Plan, measured, sizes, chunks, ckpt, ckpt_free, budget):
    """(loss_chunk, micro-batch, checkpoint every n or None, estimated peak) of the fastest setting
    that fits: whole logits before chunks, no checkpointing before any, the largest micro-batch; when
    none fits, the one that needs least."""
    device, best = plan.device, None
    for chunk in chunks:
        e = measured(chunk, ckpt)
        need = _need(e, sizes[0], chunk, device)
        for size in sizes:
            found = (chunk, size, (plan.get("checkpoint_every") if ckpt else None), need.at(size))
            if found[3] <= budget:
                return found
            best = found if best is None or found[3] < best[3] else best
    if not ckpt_free:
        return best
    chunk = chunks[-1]
    plain, every_layer = measured(chunk, False), measured(chunk, True)
    layers, per_layer = plain.info["layers"], plain.info["activations_per_layer"]
    first = plain.parts["activations"] - (layers - 1) * per_layer  # the parts outside the repeated layers
    kept = (every_layer.parts["activations"] - first) / layers  # a checkpointed layer's share
    for n in EVERY:
        checkpointed = math.ceil(layers / n)
        activations = first + checkpointed * kept + (layers - checkpointed) * per_layer
        need = _need(plain, sizes[0], chunk, device, activations)
        for size in sizes:
            found = (chunk, size, n, need.at(size))
            if found[3] <= budget:
                return found
            best = found if found[3] < best[3] else best
    return best


def _memory_short(plan: _Plan) -> None:
    """Nothing fits: frozen weights in bf16 as well (and bf16 compute, which they imply), where free."""
    if plan.free("frozen_dtype") and plan.get("frozen_dtype") == "same" and plan.free("precision"):
        plan.set("precision", "bf16")
        plan.set("frozen_dtype", "bf16")
        plan.estimate = None  # made in fp32
        plan.lines.append("memory is short: frozen weights and compute in bf16 too (slower on a CPU without bf16 "
                          "hardware, but half the frozen weights' memory)")


__all__ = ["SpeedChoice", "choose_speed", "explicit", "usable_memory", "SAFETY", "CHUNK"]
