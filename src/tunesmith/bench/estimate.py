"""`tunesmith estimate RECIPE`: will it fit, how long will a step take — without loading weights.

    tunesmith estimate recipes/lora-sft.yaml
    tunesmith estimate recipes/full-sft.yaml train.batch_tokens=2048 train.activation_checkpointing=true

Peak memory is the sum of parts, each counted rather than guessed:

- weights, gradients and optimizer state: the recipe's model is built from its config alone with
  one and with two decoder layers (random weights, a few MB to a few hundred), the recipe's method
  applied exactly as `train` applies it (frozen dtype, fp32 masters of what trains). Every layer is
  alike, so parameters(L) = parameters(1) + (L − 1)·(parameters(2) − parameters(1)): exact counts
  by dtype, whatever the method adds (LoRA factors, DoRA magnitudes, SpIEL indices, prefixes).
  Gradients are fp32, one per trained value; AdamW keeps two fp32 moments per trained value.
- activations: the same two small models run the recipe's forward (its attention, autocast, loss)
  on a synthetic micro-batch of the recipe's shape — a packed row of `batch_tokens` tokens in
  documents of `data.max_length`, or `batch_size` padded rows of `data.max_length` — and every
  tensor autograd saves for backward is counted once (by storage; weights excluded). The same
  difference gives the bytes per layer. This sees what a formula misses: autocast's bf16 copies of
  fp32 weights, attention's log-sum-exp, LoRA's inputs, checkpointing (a checkpointed layer keeps
  its input only, `train.checkpoint_every` says which layers are; one layer at a time is recomputed
  in backward, its full set counted once). Layers that a method leaves outside the gradient's path
  (freeze's bottom layers) are counted as if they trained: an upper bound there.
- the backward transient: one chunk of the lm_head + cross-entropy recomputed in backward
  (bf16 and fp32 logits, their gradients: ~16 bytes per chunk position per vocabulary entry).
- the runtime: what this process holds after importing torch and transformers and the tokenizer
  (the interpreter, the libraries, their caches), measured here.

- what the allocator holds beyond the live bytes (`HEAP_SLACK`): measured, this was the whole
  undercount at long rows (1.35-1.7x at 1k-4k before it was counted), not attention — CPU sdpa's
  backward is flash-style (one layer's attention backward at 4k tokens: ~30 MB beyond its inputs,
  nothing N x N), and the live bytes sampled during real steps matched activations + transient.
  glibc's heap keeps the holes each layer's forward leaves between tensors that outlive it, about
  0.6 of a layer's heap-resident saved set per layer, with checkpointing or without; storages over
  32 MiB are mmapped and returned, so they do not count (the fp32 logits of a 1024-token loss chunk,
  MLP activations from ~5.5k tokens on for the embedded model). It grows linearly with the row.

Peak = runtime + weights + optimizer + max(activations + backward transient + allocator held, gradients): the
gradients of a full fine-tune are complete when the activations are gone. The micro-batch is
assumed full (every row `batch_tokens` long, every token trained): an upper bound for SFT data
whose prompts do not train.

Step time = model FLOPs of a step (as `tunesmith bench` counts them) / the measured matmul peak of
this machine for the precision (`tunesmith bench --peak`, cached), at 100% and at the given MFU.
The linear layers cost the same per token at any length; attention does not: a token attends to
half its document on average, so a row of N tokens in one document costs ∝ N² (at 16K tokens
two thirds of the embedded model's FLOPs), and with `model.attention: s2` ∝ N·G. Both memory and
FLOPs are taken at the recipe's row length itself, never scaled from a shorter row.
"""
from __future__ import annotations

import copy
import resource
from dataclasses import dataclass, field

import torch


# glibc malloc serves a request from its heap once the dynamic mmap threshold has risen past it
# (it rises to the size of each mmapped block freed, up to DEFAULT_MMAP_THRESHOLD_MAX: 32 MiB on
# 64-bit); larger storages are always mmapped and go back to the OS when freed.
HEAP_CEILING = 32 * 2 ** 20


def heap_ceiling() -> int:
    """The largest storage glibc keeps in its heap: `HEAP_CEILING`, or the fixed threshold that
    MALLOC_MMAP_THRESHOLD_ sets (which also stops the threshold from rising)."""
    import os

    try:
        return int(os.environ["MALLOC_MMAP_THRESHOLD_"])
    except (KeyError, ValueError):
        return HEAP_CEILING


# What the heap holds beyond its live bytes at a step's peak, as a share of every layer's full
# heap-resident working set (the bytes a layer saves for backward in storages <= HEAP_CEILING, as
# if no layer were checkpointed) plus a backward transient small enough for the heap. glibc keeps
# freed chunks mapped and cannot reuse all of them: each layer's forward leaves holes between the
# tensors that outlive it. Sampled with mallinfo2 during `tunesmith bench` steps of LoRA on the
# embedded model (fp32, 1k-2k rows): without checkpointing the heap from the second step on held
# 0.55-0.8 of the layers' working set beyond the live bytes (the first step ~0); with checkpointing
# (live: layer inputs, one recomputed layer) already the first step held ~0.7 of it. jemalloc is not
# measured here: 0 (its retention is what `runtime.JEMALLOC`'s note compares).
# The 0.6 used is fitted within that range to two models at once: the embedded 30-layer model
# (LoRA, 1k-4k rows: -5% to -13% of the measured peak) and a 4-layer test model whose heap held
# little beyond its live bytes (full fine-tune, 4k tokens: +13%); a constant, not a law.
HEAP_SLACK = {"system": 0.6, "jemalloc": 0.0}


def training_allocator() -> str:
    """The allocator a training process started now would run on (`runtime.reexec_with_allocator`):
    jemalloc when preloaded or preloadable, else the system's."""
    import os

    from ..runtime import allocator_env

    return "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") or allocator_env() is not None else "system"


@dataclass
class Estimate:
    parts: dict[str, float]  # bytes
    peak_bytes: float
    tokens_per_step: int
    flops_per_token: float
    peak_tflops: float | None
    mfu: float
    trainable: int
    parameters: int
    info: dict = field(default_factory=dict)

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / 1e9

    @property
    def step_s_at_peak(self) -> float | None:
        return self.flops_per_token * self.tokens_per_step / (self.peak_tflops * 1e12) if self.peak_tflops else None

    @property
    def step_s(self) -> float | None:
        return self.step_s_at_peak / self.mfu if self.step_s_at_peak else None


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _synthetic_batch(recipe, vocab: int) -> dict[str, torch.Tensor]:
    """The recipe's micro-batch shape with random tokens, every token trained (the upper bound)."""
    data, cfg = recipe.data, recipe.train
    g = torch.Generator().manual_seed(0)
    if data.packing:
        width, doc = cfg.batch_tokens, min(data.max_length, cfg.batch_tokens)
        rows, lengths = 1, []
        while sum(lengths) < width:
            lengths.append(min(doc, width - sum(lengths)))
    else:
        rows, width, lengths = cfg.batch_size, data.max_length, [data.max_length]
    input_ids = torch.randint(3, vocab, (rows, width), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).expand(rows, width).contiguous()
    segment_ids = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)]).expand(rows, width).contiguous()
    return {"input_ids": input_ids, "weights": torch.ones(rows, width), "position_ids": position_ids,
            "segment_ids": segment_ids}


def _parameter_bytes(model) -> dict[str, float]:
    out = {"trainable": 0, "trainable_bytes": 0, "frozen_bytes": 0, "parameters": 0}
    seen = set()
    for p in list(model.parameters()) + list(model.buffers()):  # tied weights are one Parameter: once
        if id(p) in seen:
            continue
        seen.add(id(p))
        nbytes = p.numel() * p.element_size()  # (meta tensors have a size but no storage)
        if isinstance(p, torch.nn.Parameter):
            out["parameters"] += p.numel()
        if isinstance(p, torch.nn.Parameter) and p.requires_grad:
            out["trainable"] += p.numel()
            out["trainable_bytes"] += nbytes
        else:
            out["frozen_bytes"] += nbytes
    return out


def _saved_bytes(runner, model, batch, precision: str) -> tuple[int, int]:
    """Bytes of the distinct tensors autograd keeps for backward in one forward (weights excluded):
    all of them, and those in storages small enough for the allocator's heap (`heap_ceiling()`)."""
    from ..runtime import autocast

    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in weights and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast(torch.device("cpu"), precision):
            loss, _ = runner(batch)
    del loss
    ceiling = heap_ceiling()
    return sum(seen.values()), sum(n for n in seen.values() if n <= ceiling)


def _probe(recipe, config, layers: int, checkpointing: bool) -> dict[str, float]:
    """Parameters by kind and saved activation bytes of the recipe's model cut to `layers` layers."""
    from transformers import AutoModelForCausalLM

    from .throughput import attention_span, flops_per_token
    from ..models.load import DTYPES
    from ..objectives import build_objective
    from ..train.prepare import prepare_model, training_attention, training_mode
    from ..train.step import LossModule

    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = layers
    if hasattr(cfg, "layer_types") and cfg.layer_types is not None:
        cfg.layer_types = list(cfg.layer_types)[:layers]
    freeze = recipe.method.freeze  # set only when the method is freeze
    if freeze is not None and freeze.layers > layers:  # the top k of a cut model: all of it trains (the upper bound stated above)
        recipe = copy.deepcopy(recipe)
        recipe.method.freeze.layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[recipe.model.dtype], attn_implementation="sdpa")
    model, _, method = prepare_model(recipe, model, None)
    train_cfg = copy.copy(recipe.train)
    train_cfg.activation_checkpointing, train_cfg.checkpoint_every, train_cfg.compile = checkpointing, 1, False
    training_mode(model, train_cfg)
    runner = LossModule(model, build_objective(recipe, model), method)
    batch = _synthetic_batch(recipe, config.vocab_size)
    out = _parameter_bytes(model)
    out["saved"], out["saved_heap"] = _saved_bytes(runner, model, batch, recipe.train.precision)
    tokens = int(batch["segment_ids"].gt(0).sum())
    lengths = batch["segment_ids"][0].bincount()[1:].tolist()
    width = batch["input_ids"].shape[1]
    out["context"] = attention_span(lengths, training_attention(recipe), recipe.model.s2_group, width)
    out["flops_per_token"] = flops_per_token(model, out["context"])
    out["attention_flops_per_token"] = out["flops_per_token"] - flops_per_token(model, 0.0)
    out["tokens"] = tokens
    out["method"] = method.name
    out["attention"] = training_attention(recipe)
    return out


def _meta_counts(recipe, config) -> dict | None:
    """Exact parameter counts of the whole model, built on the meta device (no memory): methods
    that treat layers differently (freeze's top layers, HFT's draw) are counted as they are."""
    from transformers import AutoModelForCausalLM

    from ..models.load import DTYPES
    from ..train.prepare import prepare_model

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[recipe.model.dtype], attn_implementation="sdpa")
            model, _, _ = prepare_model(recipe, model, None)
    except (NotImplementedError, RuntimeError):
        return None
    return _parameter_bytes(model)


def _extrapolate(one: dict, two: dict, layers: int, key: str) -> float:
    return one[key] + (layers - 1) * (two[key] - one[key])


def _activations(probes: tuple, layers: int, every: int, key: str) -> float:
    """Saved bytes (`key`) of the whole model from the one- and two-layer probes. With the
    checkpointing probes as well: checkpointed layers (every `every`-th) keep their inputs, the
    others everything, and one layer is recomputed at a time in backward (its full set, once)."""
    one, two = probes[:2]
    if len(probes) == 2:
        return _extrapolate(one, two, layers, key)
    c1, c2 = probes[2:]
    per_layer = two[key] - one[key]
    checkpointed = len(range(0, layers, every))
    return (one[key] - per_layer) + checkpointed * (c2[key] - c1[key]) + (layers - checkpointed) * per_layer + per_layer


def estimate(recipe, mfu: float = 0.35) -> Estimate:
    """Predict the recipe's peak memory and step time (see the module docstring)."""
    from transformers import AutoConfig

    from ..models.load import load_tokenizer, resolve
    from ..objectives import objective_class
    from ..recipe import RecipeError
    from ..runtime import pick_device, set_threads
    from .throughput import matmul_peak

    if not objective_class(recipe.objective.name).token_loss:
        raise RecipeError(f"tunesmith estimate covers objectives whose step is one causal-LM forward and backward "
                          f"(sft); `{recipe.objective.name}` is not estimated yet — measure it with tunesmith bench")
    recipe = copy.deepcopy(recipe)
    recipe.model.adapter = None  # the adapter's shapes are the method's: estimate from the method itself
    config = AutoConfig.from_pretrained(str(resolve(recipe.model.name)))
    load_tokenizer(recipe.model.name)  # part of the runtime every training process holds
    runtime = _rss_bytes()
    layers = config.num_hidden_layers
    ckpt = recipe.train.activation_checkpointing
    one, two = _probe(recipe, config, 1, False), _probe(recipe, config, 2, False)
    counts = _meta_counts(recipe, config)
    if counts is None:  # the method cannot be applied without data (an SVD, a draw): layers are alike
        counts = {k: _extrapolate(one, two, layers, k) for k in ("trainable_bytes", "frozen_bytes", "trainable", "parameters")}
    weights = counts["trainable_bytes"] + counts["frozen_bytes"]
    trainable, parameters = int(counts["trainable"]), int(counts["parameters"])
    gradients = 4 * trainable
    optimizer = 2 * 4 * trainable
    per_layer = two["saved"] - one["saved"]
    probes = (one, two, *((_probe(recipe, config, 1, True), _probe(recipe, config, 2, True)) if ckpt else ()))
    every = max(recipe.train.checkpoint_every, 1)
    activations = _activations(probes, layers, every, "saved")
    head_tokens = min(recipe.train.loss_chunk or one["tokens"], one["tokens"])
    transient = 16 * head_tokens * config.vocab_size
    logits_bytes = 4 * head_tokens * config.vocab_size  # the largest of the transient's tensors (fp32 logits)
    heap = layers * (two["saved_heap"] - one["saved_heap"]) + (transient if logits_bytes <= heap_ceiling() else 0)
    allocator = training_allocator()
    held = HEAP_SLACK[allocator] * heap
    peak = runtime + weights + optimizer + max(activations + transient + held, gradients)
    fpt = _extrapolate(one, two, layers, "flops_per_token")
    attention_fpt = _extrapolate(one, two, layers, "attention_flops_per_token")
    device = pick_device(recipe.train.device)
    threads = set_threads(recipe.train.threads) if device.type == "cpu" else torch.get_num_threads()
    try:
        peak_tflops = matmul_peak(device, recipe.train.precision, threads)
    except Exception:  # noqa: BLE001 — no peak, no time estimate; memory still stands
        peak_tflops = None
    tokens_per_step = one["tokens"] * recipe.train.grad_accum
    return Estimate(
        parts={"runtime": runtime, "weights": weights, "gradients": gradients, "optimizer": optimizer,
               "activations": activations, "backward transient": transient, "allocator held": held},
        peak_bytes=peak, tokens_per_step=tokens_per_step, flops_per_token=fpt, peak_tflops=peak_tflops,
        mfu=mfu, trainable=trainable, parameters=parameters,
        info={"method": one["method"], "layers": layers, "activations_per_layer": per_layer,
              "attention_flops_per_token": attention_fpt, "attention": one["attention"],
              "checkpointing": ckpt, "precision": recipe.train.precision, "tokens_per_micro_batch": one["tokens"],
              "device": device.type, "threads": threads, "allocator": allocator})


def format_estimate(e: Estimate) -> str:
    gb = lambda b: f"{b / 1e9:6.2f} GB"  # noqa: E731
    lines = [f"method          {e.info['method']}: {e.trainable:,} trainable of {e.parameters:,} "
             f"({e.info['layers']} layers, {e.info['precision']}, "
             f"checkpointing {'on' if e.info['checkpointing'] else 'off'})",
             f"micro-batch     {e.info['tokens_per_micro_batch']} tokens; {e.tokens_per_step} per optimizer step"]
    for name, b in e.parts.items():
        extra = f"  ({e.info['activations_per_layer'] / 1e6:.1f} MB per layer)" if name == "activations" else ""
        lines.append(f"  {name:<14}{gb(b)}{extra}")
    lines.append(f"peak memory     {e.peak_gb:.2f} GB (runtime + weights + optimizer + "
                 f"max(activations + backward transient + allocator held, gradients); "
                 f"{e.info.get('allocator', 'system')} allocator)")
    lines.append(f"model FLOPs     {e.flops_per_token / 1e9:.3f} GFLOP/token, "
                 f"{e.flops_per_token * e.tokens_per_step / 1e12:.2f} TFLOP per step "
                 f"(attention {100 * e.info['attention_flops_per_token'] / e.flops_per_token:.0f}%, "
                 f"{e.info['attention']})")
    if e.peak_tflops:
        lines.append(f"step time       {e.step_s:.2f} s at {100 * e.mfu:.0f}% MFU "
                     f"({e.step_s_at_peak:.2f} s at the measured {e.info['precision']} matmul peak, "
                     f"{e.peak_tflops:.2f} TFLOP/s); {e.tokens_per_step / e.step_s:,.0f} tokens/s")
    return "\n".join(lines)

