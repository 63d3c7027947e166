"""`tunesmith bench RECIPE steps=N`: the recipe's training step, timed.

    tunesmith bench recipes/lora-sft.yaml --steps 8
    tunesmith bench --peak              # measure (and cache) this machine's matmul peak

It builds exactly what `train` builds (data, model, method, objective, optimizer), runs `warmup`
steps untimed, then `steps` timed ones, and reports tokens/s (all tokens of the rows and the
trained ones), seconds per step, peak memory (RSS on CPU, max allocated on CUDA) and MFU: model
FLOPs per second over the measured bf16/fp32 matmul peak of this machine. One more step runs with
timing hooks on the model's parts (embedding, attention, MLP, norms) and the optimizer, for the
breakdown; what is left (lm_head + loss, data movement, the rest) is shown as such. Nothing is
written to a run folder.

Model FLOPs per token (Kaplan et al. / Chinchilla convention, on the matmuls only): forward 2·N,
backward 2·N for activation gradients plus 2·N_trained for weight gradients, with N the weights of
the Linear layers (lm_head included) and attention's 4·d·T_ctx per layer (×3 for training), T_ctx
the mean span a token attends to (`attention_span`: half its document; S²-Attn: half a group). An
activation-checkpointed step recomputes the forward: that is work done, but not model FLOPs.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.load import cache_dir


@dataclass
class BenchResult:
    steps: int
    s_per_step: float
    tokens_per_s: float
    trained_tokens_per_s: float
    peak_mem_gb: float
    flops_per_token: float
    peak_tflops: float | None
    mfu: float | None
    breakdown: dict[str, float] = field(default_factory=dict)  # share of one step's wall time
    info: dict = field(default_factory=dict)


def _machine_key(device: torch.device, dtype: str, threads: int) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return f"{device.type}|{name}|{threads} threads|{dtype}|torch {torch.__version__}"


def matmul_peak(device: torch.device, dtype: str = "bf16", threads: int | None = None, refresh: bool = False,
                size: int | None = None, seconds: float = 2.0) -> float:
    """Measured dense matmul throughput (TFLOP/s) of this device in `dtype`, cached per machine
    (square products of `size`: 2048 on a CPU, 8192 on a GPU, which 2048 leaves underused)."""
    size = size or (8192 if device.type == "cuda" else 2048)
    threads = threads or torch.get_num_threads()
    key = _machine_key(device, dtype, threads)
    path = cache_dir() / "bench" / "matmul_peak.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if key in cached and not refresh:
        return cached[key]
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    a = torch.randn(size, size, device=device, dtype=tdtype)
    b = torch.randn(size, size, device=device, dtype=tdtype)
    best = 0.0
    for _ in range(3):  # warm up, then keep the best of a few timed batches
        n, t0 = 0, time.perf_counter()
        while True:
            a @ b
            n += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - t0
            if elapsed > seconds / 3:
                break
        best = max(best, 2 * size ** 3 * n / elapsed / 1e12)
    cached[key] = best
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cached, indent=1))
    return best


def flops_per_token(model: nn.Module, context: float, head_fraction: float = 1.0) -> float:
    """Training FLOPs per token (see the module docstring); `context` is the mean attention span,
    `head_fraction` the share of tokens the lm_head runs on (SFT: the trained ones)."""
    head = model.get_output_embeddings()
    head_id = id(head.weight) if head is not None else None
    linear, trained, seen = 0, 0, {head_id}
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and id(mod.weight) not in seen:
            seen.add(id(mod.weight))
            linear += mod.weight.numel()
            trained += mod.weight.numel() if mod.weight.requires_grad else 0
    for name, p in model.named_parameters():  # trained tensors inside Linears that are not `.weight`
        if p.requires_grad and p.ndim == 2 and not name.endswith(".weight"):
            linear += p.numel()
            trained += p.numel()
    head_flops = 0.0
    if head is not None:
        n = head.weight.numel()
        head_flops = head_fraction * (4 * n + (2 * n if head.weight.requires_grad else 0))
    cfg = model.config
    attention = 4 * cfg.num_hidden_layers * cfg.hidden_size * context  # QK^T and AV, causal half already
    return 2 * linear + 2 * linear + 2 * trained + 3 * attention + head_flops


CATEGORIES = ("embedding", "attention", "mlp", "norms")


def _category(name: str, mod: nn.Module, model: nn.Module) -> str | None:
    if mod is model.get_input_embeddings():
        return "embedding"
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("self_attn", "attn", "attention"):
        return "attention"
    if leaf in ("mlp", "feed_forward"):
        return "mlp"
    if "norm" in type(mod).__name__.lower() and not any(True for _ in mod.children()):
        return "norms"
    return None


class _Timers:
    """Forward and backward wall time per category (timing step only). Forward: module hooks.
    Backward: hooks on the module's output tensor (its gradient arrives: the module's backward
    starts) and on its input tensor (the input's gradient is complete: it ends) — module backward
    hooks cannot be used, they do not see inputs passed by keyword, as transformers passes them."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.device, self.total, self.handles, self.open = device, dict.fromkeys(CATEGORIES, 0.0), [], {}
        for name, mod in model.named_modules():
            cat = _category(name, mod, model)
            if cat is not None:
                self.handles += [mod.register_forward_pre_hook(self._pre(cat), with_kwargs=True),
                                 mod.register_forward_hook(self._post(cat))]

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _pre(self, cat):
        def hook(mod, args, kwargs):
            tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.is_floating_point()]
            self.open[id(mod)] = (self._now(), tensors[0] if tensors else None)
        return hook

    def _post(self, cat):
        def hook(mod, args, output):
            started, inp = self.open.pop(id(mod), (None, None))
            if started is None:
                return
            self.total[cat] += self._now() - started
            out = output[0] if isinstance(output, tuple) else output
            if not (isinstance(out, torch.Tensor) and out.requires_grad and inp is not None and inp.requires_grad):
                return
            mark = {}
            out.register_hook(lambda g: mark.__setitem__("t", self._now()))
            inp.register_hook(lambda g: self._backward_done(cat, mark))
        return hook

    def _backward_done(self, cat, mark):
        if "t" in mark:
            self.total[cat] += self._now() - mark.pop("t")

    def remove(self):
        for h in self.handles:
            h.remove()


def _timed_steps(one_step, warmup: int, steps: int, device: torch.device) -> tuple[list[float], int, int]:
    """`warmup` untimed steps, then `steps` timed ones (CUDA's peak memory counted from the first of
    them): each step's seconds, and all and trained tokens summed over them."""
    for i in range(warmup):
        one_step(i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, tokens, units = [], 0, 0
    for i in range(warmup, warmup + steps):
        dt, _, n, u, _ = one_step(i)
        times.append(dt)
        tokens += n
        units += u
    return times, tokens, units


def _step_shares(one_step, index: int, model: nn.Module, device: torch.device) -> dict[str, float]:
    """One more step with timing hooks on the model's parts: each part's share of its wall time,
    the optimizer's, and what is left (lm_head + loss + the rest)."""
    timers = _Timers(model, device)
    try:
        dt, opt, _, _, _ = one_step(index, timers)
    finally:
        timers.remove()
    shares = {k: v / dt for k, v in timers.total.items()}
    shares["optimizer"] = opt / dt
    shares["lm_head + loss + rest"] = max(0.0, 1.0 - sum(shares.values()))
    return shares


def _block_pieces(lengths: list[int], group: int, shift: int) -> list[int]:
    """Documents laid end to end in a row, cut at block boundaries shift + m·group: the pieces' sizes."""
    pieces, start = [], 0
    for n in lengths:
        cut, end = start, start + n
        while cut < end:
            nxt = min(end, ((cut - shift) // group + 1) * group + shift)
            pieces.append(nxt - cut)
            cut = nxt
        start = end
    return pieces


def attention_span(lengths: list[int], attention: str = "packed", s2_group: int = 0, width: int = 0) -> float:
    """The mean number of keys a token attends to, over the documents of a row: causal attention
    over a document of n tokens spans n/2 on average, so its FLOPs grow as n² (Σn²/2 / Σn per
    token). S²-Attn (LongLoRA; `models/s2attn.py`) attends within blocks of G tokens (`s2_group`,
    default a quarter of the row `width`) and the document: half the heads in blocks from 0, half
    in blocks shifted by G/2; about G/2 per token, FLOPs ∝ N·G."""
    from ..models.s2attn import group_size

    if attention != "s2":
        return sum(n * n for n in lengths) / max(sum(lengths), 1) / 2
    group = group_size(width, s2_group)
    halves = [_block_pieces(lengths, group, shift) for shift in (0, group // 2)]
    return sum(p * p for half in halves for p in half) / 2 / max(sum(lengths), 1) / 2


def _attention_context(rows: list, recipe) -> float:
    """The mean attention span of the rows' tokens (`attention_span`), or half of `data.max_length`
    when the rows are not tokenized."""
    lengths = [len(x["input_ids"]) for x in rows] if rows and "input_ids" in rows[0] else []
    if not lengths:
        return recipe.data.max_length / 2
    from ..train.prepare import training_attention

    width = recipe.train.batch_tokens if recipe.data.packing else recipe.data.max_length
    return attention_span(lengths, training_attention(recipe), recipe.model.s2_group, width)


def bench(recipe, steps: int = 8, warmup: int = 2, breakdown: bool = True, refresh_peak: bool = False,
          items: list | None = None) -> BenchResult:
    """Time `steps` training steps of `recipe` after `warmup` untimed ones, on the recipe's training
    data or on `items` (samples with `input_ids` and `weights`, e.g. synthetic rows of one length)."""
    from ..methods import count_parameters
    from ..models.load import load_tokenizer
    from ..objectives import build_objective, objective_class
    from ..recipe import RecipeError
    from ..train.batches import MicroBatches
    from ..train.prepare import prepare_model, training_mode
    from ..train.step import LossModule, backward_window
    from ..train.optim import build_optimizer
    from ..runtime import allocator_in_use, peak_memory_gb, pick_device, set_threads

    cfg = recipe.train
    kind = objective_class(recipe.objective.name)
    if not kind.fixed_data:
        raise RecipeError(f"tunesmith bench times objectives that train on fixed data; `{kind.name}` makes its own "
                          "batches (its metrics.jsonl holds per-step times and tokens/s)")
    device = pick_device(cfg.device)
    threads = set_threads(cfg.threads) if device.type == "cpu" else torch.get_num_threads()
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(recipe.model.name)
    train = kind.load(recipe, tokenizer).train if items is None else items
    model, tokenizer, method = prepare_model(recipe, None, tokenizer)
    model.to(device)
    training_mode(model, cfg)
    objective = build_objective(recipe, model)
    runner = LossModule(model, objective, method)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stream = MicroBatches(train, objective, recipe.data, cfg, cfg.seed, pad_id)
    optimizer = build_optimizer(model, cfg, method)
    method.on_train_start(model, warmup + steps + 1)
    params = [p for p in model.parameters() if p.requires_grad]

    def one_step(index: int, timers: _Timers | None = None):
        first = index * cfg.grad_accum
        batches = [stream.get(first + k)[0] for k in range(cfg.grad_accum)]
        t0 = time.perf_counter()
        window_units = sum(stream.units(first + k) for k in range(cfg.grad_accum))
        _, units, tokens, _ = backward_window(runner, batches, device, cfg.precision, window_units)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        t_opt = time.perf_counter()
        optimizer.step()
        method.after_step(model, index + 1, optimizer)
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        contexts = [int(b["segment_ids"].gt(0).sum()) for b in batches]
        return t1 - t0, t1 - t_opt, tokens, units, sum(contexts)

    times, tokens, units = _timed_steps(one_step, warmup, steps, device)
    elapsed = sum(times)
    peak_mem = peak_memory_gb(device)
    shares = _step_shares(one_step, warmup + steps, model, device) if breakdown else {}

    context = _attention_context(train, recipe)
    fpt = flops_per_token(model, context, head_fraction=units / max(tokens, 1) if objective.token_loss else 1.0)
    dtype = cfg.precision
    peak = matmul_peak(device, dtype, threads, refresh=refresh_peak)
    achieved = fpt * tokens / elapsed / 1e12
    n_train, n_total = count_parameters(model)
    return BenchResult(
        steps=steps, s_per_step=elapsed / steps, tokens_per_s=tokens / elapsed,
        trained_tokens_per_s=units / elapsed, peak_mem_gb=peak_mem, flops_per_token=fpt,
        peak_tflops=peak, mfu=achieved / peak if peak else None, breakdown=shares,
        info={"device": _machine_key(device, dtype, threads), "allocator": allocator_in_use(), "method": method.name, "trainable": n_train,
              "parameters": n_total, "precision": cfg.precision, "batch_tokens": cfg.batch_tokens,
              "grad_accum": cfg.grad_accum, "achieved_tflops": achieved, "step_s": times})


def run_bench(recipe, steps: int | None, warmup: int | None, breakdown: bool, json_path: str | None) -> int:
    """`tunesmith bench RECIPE`: print the figures (and write them to `json_path`)."""
    result = bench(recipe, steps=8 if steps is None else steps, warmup=2 if warmup is None else warmup,
                   breakdown=breakdown)
    print(format_bench(result))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dataclasses.asdict(result), f, indent=1)
    return 0


def format_bench(r: BenchResult) -> str:
    lines = [
        f"device          {r.info['device']} · allocator {r.info['allocator']}",
        f"method          {r.info['method']}: {r.info['trainable']:,} trainable of {r.info['parameters']:,}",
        f"steps           {r.steps} timed × {r.info['batch_tokens']} tokens × {r.info['grad_accum']} micro-batches",
        f"s/step          {r.s_per_step:.3f}",
        f"tokens/s        {r.tokens_per_s:,.0f} (trained {r.trained_tokens_per_s:,.0f})",
        f"peak memory     {r.peak_mem_gb:.2f} GB",
        f"model FLOPs     {r.flops_per_token / 1e9:.3f} GFLOP/token → {r.info['achieved_tflops']:.3f} TFLOP/s",
    ]
    if r.mfu is not None:
        lines.append(f"MFU             {100 * r.mfu:.1f}% of the measured {r.info['precision']} matmul peak "
                     f"({r.peak_tflops:.2f} TFLOP/s)")
    if r.breakdown:
        lines.append("time per step   " + " · ".join(f"{k} {100 * v:.0f}%" for k, v in r.breakdown.items()))
    return "\n".join(lines)
