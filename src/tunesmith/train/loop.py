"""The training loop, top to bottom: accumulate → clip → step → schedule → log → evaluate → checkpoint.

    result = train(load_recipe("recipes/lora-sft.yaml"))

The loss of one optimizer step is the sum of token losses over *all* micro-batches of the
accumulation window divided by the trained tokens of the whole window (not a mean of per-batch
means, which over-weights short batches). Interrupts (Ctrl-C, SIGTERM) finish the current step,
write a checkpoint and return; a NaN/Inf loss stops before the optimizer touches the weights.
"""
from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import recipe as rcp
from ..data import collate, load_data, plan_batches
from ..methods import attach, build_method, cast_frozen, count_parameters
from ..models.attention import use_attention, use_packed_attention
from ..models.load import DTYPES, load_model, load_tokenizer
from ..objectives import PREFERENCE, SFT, build_objective
from . import checkpoint as ckpt
from . import distributed
from .metrics import MetricsLog
from .optim import build_optimizer, build_scheduler
from .runtime import autocast, peak_memory_gb, set_threads
from .safety import Diverged, DivergenceGuard, TrainError, run_folder, stopped


@dataclass
class RunResult:
    run_dir: Path
    status: str  # "completed" or "interrupted"
    step: int
    total_steps: int
    output: Path | None = None
    summary: dict = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class MicroBatches:
    """The deterministic stream of micro-batches: epoch e's order depends only on (seed, e), so
    the data position of a resumed run is just the number of micro-batches already consumed.
    `objective` says how long an item is, how many loss units it holds and what to collate."""

    def __init__(self, items, objective, data_cfg, train_cfg, seed: int, pad_id: int, shuffle: bool | None = None):
        self.items, self.objective, self.pad_id, self.seed = items, objective, pad_id, seed
        self.packing = data_cfg.packing
        self.shuffle = data_cfg.shuffle if shuffle is None else shuffle
        self.batch_tokens, self.batch_size = train_cfg.batch_tokens, train_cfg.batch_size
        self.lengths = [objective.length(x) for x in items]
        self.unit_counts = [objective.units(x) for x in items]
        self._plans: dict[int, list[list[int]]] = {}

    def plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            self._plans = {epoch: plan_batches(
                self.lengths, packing=self.packing, batch_tokens=self.batch_tokens,
                batch_size=self.batch_size, seed=self.seed, epoch=epoch, shuffle=self.shuffle)}
        return self._plans[epoch]

    def locate(self, index: int) -> tuple[int, int]:
        epoch = 0
        while index >= len(self.plan(epoch)):
            index -= len(self.plan(epoch))
            epoch += 1
        return epoch, index

    def units(self, index: int) -> int:
        """Loss units (trained tokens, or pairs) of micro-batch `index`, without building it."""
        epoch, i = self.locate(index)
        return sum(self.unit_counts[j] for j in self.plan(epoch)[i])

    def get(self, index: int) -> tuple[dict, int]:
        """Micro-batch number `index` (counted across epochs) and its epoch."""
        epoch, i = self.locate(index)
        items = [self.items[j] for j in self.plan(epoch)[i]]
        batch = collate(self.objective.rows(items), packing=self.packing, pad_id=self.pad_id)
        return self.objective.finish(items, batch), epoch

    def epoch_batches(self, epoch: int = 0) -> list[tuple[dict, int]]:
        """Every micro-batch of one epoch with its loss units (validation)."""
        plan = self.plan(epoch)
        return [(self.get(i)[0], sum(self.unit_counts[j] for j in plan[i])) for i in range(len(plan))]


def trained_tokens(batch: dict) -> int:
    return int((batch["weights"][:, 1:] > 0).sum())


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class LossModule(torch.nn.Module):
    """The model with its objective as `forward`, so DDP/FSDP wrap one module whose output is the
    loss (the chunked lm_head never runs outside a wrapped forward)."""

    def __init__(self, model, objective=None):
        super().__init__()
        self.model = model
        self.objective = objective or SFT()

    def forward(self, batch: dict):
        loss_sum, _, metrics = self.objective(self.model, batch)
        return loss_sum, metrics


def backward_window(runner, batches: list[dict], device, precision: str, window_units: int | None = None,
                    scale: float = 1.0):
    """Forward/backward every micro-batch of one accumulation window, each divided by the loss
    units of the *whole* window (all ranks' micro-batches included), so the summed gradient is
    that of one big batch. `scale` undoes the averaging of data-parallel gradient reduction.
    Returns (this rank's loss sum / window units, window units, this rank's tokens, metric sums)."""
    if window_units is None:
        window_units = sum(trained_tokens(b) for b in batches)
    loss_total, n_tokens, metrics = 0.0, 0, {}
    for i, batch in enumerate(batches):
        batch = to_device(batch, device)
        last = i == len(batches) - 1
        # DDP: sum gradients across ranks once, at the last micro-batch of the window
        sync = runner.no_sync() if hasattr(runner, "no_sync") and not last else contextlib.nullcontext()
        with sync:
            with autocast(device, precision):
                loss_sum, batch_metrics = runner(batch)
            (loss_sum * (scale / max(window_units, 1))).backward()
        loss_total += float(loss_sum.detach())
        n_tokens += int((batch["segment_ids"] > 0).sum())
        for k, v in batch_metrics.items():
            metrics[k] = metrics.get(k, 0.0) + float(v)
    return loss_total / max(window_units, 1), window_units, n_tokens, metrics


@torch.no_grad()
def mean_loss(runner, batches, device, precision: str = "fp32", limit: int = 0, reduce: bool = True):
    """Mean loss per unit over `batches` — (batch, units) pairs, or plain batches counted in
    trained tokens — for validation loss and perplexity; with reduce=False, (loss sum, units)
    for summing across ranks first. `runner` is a LossModule (possibly wrapped) or a causal LM."""
    if hasattr(runner, "config"):  # a plain transformers model
        runner = LossModule(runner)
    was_training = runner.training
    runner.eval()
    total, count = 0.0, 0
    for i, item in enumerate(batches):
        if limit and i >= limit:
            break
        batch, units = item if isinstance(item, tuple) else (item, trained_tokens(item))
        with autocast(device, precision):
            total += float(runner(to_device(batch, device))[0])
        count += units
    runner.train(was_training)
    return (total / max(count, 1), count) if reduce else (total, count)


class _Interrupt:
    """Turn the first SIGINT/SIGTERM into a flag checked between steps; a second one aborts."""

    def __init__(self):
        self.requested = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        tqdm.write(f"[tunesmith] {self.requested}: finishing this step, then writing a checkpoint "
                   "(press again to abort without one)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def evaluate_task(model, tokenizer, recipe):
    """Measure the recipe's eval task with the model as it is now (stock attention for generation)."""
    from ..eval.runner import evaluate as run_eval, get_eval_task

    cfg = recipe.eval
    task = get_eval_task(cfg.task, cfg.metric, seed=cfg.seed)
    training_attention = model.config._attn_implementation
    use_attention(model, "sdpa")
    try:
        with autocast(model.device, recipe.train.precision):
            return run_eval(model, tokenizer, task, split=cfg.split, limit=cfg.limit,
                            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, progress=False)
    finally:
        model.set_attn_implementation(training_attention)
        model.train()


def prepare_model(recipe, model=None, tokenizer=None):
    """Load the model, apply the method, mark trainable parameters; returns (model, tokenizer, method)."""
    if model is None:
        model, loaded_tokenizer = load_model(recipe.model.name, recipe.model.dtype)
        tokenizer = tokenizer or loaded_tokenizer
    if recipe.model.attention == "packed":
        use_packed_attention(model)
    else:
        use_attention(model, recipe.model.attention)
    torch.manual_seed(recipe.train.seed)  # the method's initialisation is part of the seeded run
    if recipe.model.adapter:
        from ..export.tuned import load_tuned, read_method

        saved, _ = read_method(recipe.model.adapter)
        if saved.name != recipe.method.name:
            raise TrainError(f"model.adapter {recipe.model.adapter} holds a `{saved.name}` adapter: continuing it "
                             f"needs method.name={saved.name} (the recipe says {recipe.method.name})")
        method, recipe.method = load_tuned(model, recipe.model.adapter)  # the adapter's own options win
    else:
        method = build_method(recipe.method)
        attach(model, method)
    if recipe.model.frozen_dtype != "same":
        base_trained = [n for n in method.trained_names if n in method.base_keys]
        frozen = any(not p.requires_grad and p.is_floating_point() for p in model.parameters())
        if base_trained and frozen and recipe.train.precision == "fp32":
            raise TrainError(f"model.frozen_dtype={recipe.model.frozen_dtype} with train.precision=fp32: method "
                             f"`{method.name}` trains base weights ({base_trained[0]}, ...), which stay fp32 beside "
                             f"{recipe.model.frozen_dtype} frozen ones; train under autocast "
                             f"(train.precision={recipe.model.frozen_dtype}) or set model.frozen_dtype=same")
        cast_frozen(model, DTYPES[recipe.model.frozen_dtype])
    for p in model.parameters():  # master weights of everything that trains stay fp32
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model, tokenizer, method


def train(recipe: rcp.Recipe, *, model=None, tokenizer=None, _stop_after: int | None = None) -> RunResult:
    """Run the recipe, in this process or as one rank of a torchrun job.
    `model`/`tokenizer` may be passed in (e.g. a model already in memory)."""
    cfg = recipe.train
    if recipe.objective.name == "grpo":
        from .grpo import train_grpo

        return train_grpo(recipe, model=model, tokenizer=tokenizer, _stop_after=_stop_after)
    d, device = distributed.setup(cfg.strategy, cfg.device, cfg.dist_timeout)
    try:
        with run_folder(recipe.run_dir, d.main) as started:
            return _train(recipe, d, device, model, tokenizer, _stop_after, started)
    finally:
        distributed.teardown(d)


def _train(recipe, d, device, model, tokenizer, _stop_after, started) -> RunResult:
    cfg = recipe.train
    run_dir = recipe.run_dir
    say = print if d.main else (lambda *a, **k: None)
    resume_from = ckpt.latest_checkpoint(run_dir, verified=True, note=say) if recipe.resume else None
    if not recipe.resume and ckpt.list_checkpoints(run_dir):
        raise TrainError(f"{run_dir} already holds checkpoints: continue it with resume=true, "
                         "or start a new run with name=<new name>")
    threads = set_threads(cfg.threads) if device.type == "cpu" else torch.get_num_threads()
    seed_everything(cfg.seed)

    resolved = rcp.to_yaml(recipe)
    if d.main:
        (run_dir / "recipe.yaml").write_text(resolved)
    say(f"[tunesmith] run folder: {run_dir}\n--- resolved recipe ---\n{resolved}-----------------------", flush=True)

    if tokenizer is None:  # data first: a mistake in the data should not wait for the model to load
        tokenizer = load_tokenizer(recipe.model.name)
    if recipe.objective.name in PREFERENCE:
        from ..data.preference import load_pairs

        splits = load_pairs(recipe.data, tokenizer, seed=cfg.seed)
    else:
        splits = load_data(recipe.data, tokenizer, seed=cfg.seed)
    model, tokenizer, method = prepare_model(recipe, model, tokenizer)  # seeded: the same on every rank
    if d.active:
        torch.manual_seed(cfg.seed + d.rank)  # dropout streams differ per rank; data order does not
    model.to(device)
    training_mode(model, cfg)
    n_train, n_total = count_parameters(model)
    objective = build_objective(recipe, model)
    runner = distributed.wrap(LossModule(model, objective), d, device, decoder_layers(model))
    strategy = f" · {d.strategy} × {d.world} processes" if d.active else ""
    say(f"[tunesmith] method {method.name}: {n_train:,} trainable of {n_total:,} parameters "
        f"({100 * n_train / n_total:.3f}%) · device {device} · {threads} threads · {cfg.precision}{strategy}", flush=True)
    if method.describe(model):
        say(f"[tunesmith] {method.name}: {method.describe(model)}", flush=True)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if getattr(recipe.objective.preference, "precompute_reference", False) and hasattr(objective, "precompute"):
        if objective.name in ("simpo", "orpo"):
            raise TrainError(f"{objective.name} uses no reference model: precompute_reference does not apply")
        for items in (splits.train, splits.val or []):
            objective.precompute(model, items, pad_id=pad_id, device=device, precision=cfg.precision,
                                 batch_tokens=cfg.batch_tokens)
        say("[tunesmith] reference log-probs precomputed", flush=True)
    stream = MicroBatches(splits.train, objective, recipe.data, cfg, cfg.seed, pad_id)
    per_epoch = len(stream.plan(0))
    per_step = cfg.grad_accum * d.world  # micro-batches of one optimizer step, all ranks together
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * per_epoch / per_step))
    method.on_train_start(model, total_steps)
    val_batches = None
    if splits.val:
        val_all = MicroBatches(splits.val, objective, recipe.data, cfg, cfg.seed, pad_id, shuffle=False).epoch_batches()
        val_batches = val_all[d.rank::d.world]
    say(f"[tunesmith] data: {len(splits.train):,} train samples ({per_epoch:,} micro-batches an epoch), "
        f"{len(splits.val or []):,} validation · {total_steps:,} steps × {per_step} micro-batches", flush=True)

    optimizer = build_optimizer(model, cfg, method)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    start_step, start_micro = 0, 0
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler, d, method=method)
        start_step = state["step"]
        start_micro = state.get("micro_batches", start_step * per_step)
        say(f"[tunesmith] resumed from {resume_from} (step {start_step})", flush=True)
    elif recipe.resume:
        say(f"[tunesmith] resume=true but {run_dir} has no checkpoint yet: starting fresh", flush=True)
    d.barrier()
    log = MetricsLog(run_dir, resume_step=start_step if resume_from else None) if d.main else None

    params = [p for p in model.parameters() if p.requires_grad]
    guard = DivergenceGuard(vocab_size=model.config.vocab_size, token_loss=objective.name == "sft",
                            patience=cfg.divergence_patience)
    status, step, last_val, epoch_hooked = "completed", start_step, None, None
    tokens_seen, t_start = 0, time.perf_counter()
    bar = tqdm(total=total_steps, initial=start_step, desc=f"train {recipe.name}", unit="step",
               dynamic_ncols=True, disable=not d.main)
    try:
        with _Interrupt() as interrupt:
            while step < total_steps:
                t0 = time.perf_counter()
                first = start_micro + (step - start_step) * per_step  # global micro-batch index
                window_units = sum(stream.units(first + k) for k in range(per_step))
                mine = [stream.get(i) for i in distributed.window(first, cfg.grad_accum, d)]
                epoch = mine[-1][1]
                first_epoch = stream.locate(first)[0]
                if epoch_hooked != first_epoch:  # a new epoch (or the first of this session)
                    epoch_hooked = first_epoch
                    method.on_epoch(model, epoch_hooked, optimizer)
                loss, _, n_tokens, metrics = backward_window(runner, [b for b, _ in mine], device, cfg.precision,
                                                             window_units, scale=d.world)
                loss, n_tokens = d.sum(loss), int(d.sum(n_tokens))
                metrics = {k: d.sum(v) / max(window_units, 1) for k, v in sorted(metrics.items())}
                guard.check_loss(loss, step + 1)
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
                norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                guard.check_grad(norm, step + 1)
                optimizer.step()
                method.after_step(model, step + 1, optimizer)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                guard.check_weights(params, step, reduce=d.sum)
                guard.observe(loss, norm, step)
                started()

                dt = time.perf_counter() - t0
                tokens_seen += n_tokens
                lr = scheduler.get_last_lr()[0]
                unit = "trained_tokens" if objective.name == "sft" else "pairs"
                row = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": norm,
                       "tokens": n_tokens, unit: window_units, "tokens_per_s": n_tokens / dt,
                       f"{unit}_per_s": window_units / dt, "step_s": dt,
                       "peak_mem_gb": peak_memory_gb(device), **metrics}
                if log and (step % cfg.log_every == 0 or step == total_steps):
                    log.write(row)
                shown = {k.split("/")[-1]: f"{v:.3f}" for k, v in metrics.items() if k in ("rewards/margins", "rewards/accuracies")}
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tokens / dt:,.0f}", **shown)
                bar.update(1)

                val_now = None
                if val_batches is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps):
                    total, count = mean_loss(runner, val_batches, device, cfg.precision, limit=cfg.eval_batches,
                                             reduce=False)
                    last_val = val_now = d.sum(total) / max(d.sum(count), 1)
                    if log:
                        log.write({"step": step, "val_loss": last_val, "val_ppl": math.exp(min(last_val, 50))})
                    if d.main:
                        tqdm.write(f"[tunesmith] step {step}: validation loss {last_val:.4f}")

                if recipe.eval.task and recipe.eval.every and (step % recipe.eval.every == 0 or step == total_steps):
                    if d.active:
                        raise TrainError("eval.every (generation during training) runs in one process only; "
                                         "measure the saved adapter with `tunesmith eval` instead")
                    result = evaluate_task(model, tokenizer, recipe)
                    log.write({"step": step, f"eval_{result.metric}": result.main})
                    tqdm.write(f"[tunesmith] step {step}: {result.task} {result.split} {result.metric} "
                               f"{100 * result.main:.1f}%")

                stop = (_stop_after is not None and step >= _stop_after) or bool(d.sum(float(bool(interrupt.requested))))
                if step == total_steps or (cfg.save_every and step % cfg.save_every == 0) or stop:
                    ckpt.save_checkpoint(run_dir, step, model, optimizer, scheduler,
                                         {"epoch": epoch, "total_steps": total_steps, "world": d.world,
                                          "micro_batches": start_micro + (step - start_step) * per_step,
                                          "healthy": guard.healthy, "val_loss": val_now},
                                         cfg.keep_last, d, method=method)
                if stop:
                    status = "interrupted"
                    if d.main:
                        tqdm.write(f"[tunesmith] stopped at step {step}; continue with: resume=true")
                    break
    except Diverged as e:
        raise stopped(run_dir, e, note=say, main=d.main) from None
    finally:
        bar.close()
        if log:
            log.close()

    elapsed = time.perf_counter() - t_start
    summary = {"steps": step, "session_steps": step - start_step, "wall_s": elapsed,
               "tokens_per_s": tokens_seen / max(elapsed, 1e-9), "peak_mem_gb": peak_memory_gb(device),
               "val_loss": last_val, "processes": d.world, "trainable_parameters": n_train, "parameters": n_total}
    output = None
    if status == "completed":
        output = save_output(recipe, model, tokenizer, method, d)
        say(f"[tunesmith] done: step {step}/{total_steps} ({step - start_step} in this session, {elapsed:.0f} s), "
            f"{summary['tokens_per_s']:,.0f} tokens/s, "
            f"peak memory {summary['peak_mem_gb']:.2f} GB → {output}", flush=True)
    if d.main:
        from .report import write_report

        write_report(run_dir, summary)
    d.barrier()
    return RunResult(run_dir, status, step, total_steps, output, summary)


def decoder_layers(model) -> list:
    """The transformer blocks (each becomes its own FSDP group)."""
    body = getattr(model, model.base_model_prefix)
    return list(getattr(body, "layers", []))


def training_mode(model, cfg) -> None:
    """Switch the model to training as the recipe asks: activation checkpointing on every
    `checkpoint_every`-th decoder layer (1 = all; selective checkpointing trades memory for less
    recompute), regional compilation (each decoder layer compiled; identical layers share the
    compiled code), no KV cache."""
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for i, layer in enumerate(decoder_layers(model)):
            if hasattr(layer, "gradient_checkpointing"):
                layer.gradient_checkpointing = i % max(cfg.checkpoint_every, 1) == 0
    if cfg.compile:
        for layer in decoder_layers(model):
            layer.compile(dynamic=True)
    model.config.use_cache = False
    model.train()


def save_output(recipe, model, tokenizer, method, d=None) -> Path | None:
    """An adapter method → `<run>/adapter` (its delta, plus PEFT's layout where PEFT has the method);
    a method that trains base weights (full, freeze, hft) → a transformers folder in `<run>/model`.
    Under FSDP every rank gathers the full weights; rank 0 writes."""
    run_dir = recipe.run_dir
    if d is not None and d.strategy == "fsdp" and d.active:
        model = ckpt.gathered_model(model, recipe, d)
    if d is not None and not d.main:
        return None
    model = model.to("cpu") if model.device.type != "cpu" else model
    use_attention(model, "sdpa")  # what a saved model should run with
    if method.output == "adapter":
        from ..export.tuned import save_tuned

        return save_tuned(model, method, recipe.model.name, run_dir / "adapter")
    from ..export.atomic import atomic_folder

    with atomic_folder(run_dir / "model", "config.json") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return run_dir / "model"
