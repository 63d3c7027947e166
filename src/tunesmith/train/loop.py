"""The run harness: one loop for every objective, top to bottom — window → forward/backward → guard →
clip → step → method hooks → schedule → log → evaluate → checkpoint.

    result = train(load_recipe("recipes/lora-sft.yaml"))

The harness owns the run folder, the resolved recipe, resume, metrics, interrupts, the divergence
guard, checkpoints, method hooks (`on_train_start`, `on_epoch`, `after_step`), the final save and the
report; the objective (`tunesmith.objectives`, protocol in objectives/base.py) supplies what differs:
its data and how it batches, its loss and metrics, or — GRPO — a source that makes its own batches.

Interrupts (Ctrl-C, SIGTERM) finish the current step, write a checkpoint and return; a non-finite or
collapsing run stops before anything unhealthy is saved (train/safety.py).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import recipe as rcp
from ..methods import count_parameters
from ..models.embedding import model_folder
from ..models.load import load_tokenizer
from ..models.rope import changed_rope, describe_rope
from ..objectives import build_objective, objective_class
from . import checkpoint as ckpt
from . import distributed
from .batches import DataStream, MicroBatches
from .effective_batch import apply_effective_batch
from . import trackers
from .metrics import MetricsLog, read_metrics
from .optim import build_optimizer, build_scheduler
from .prepare import (Interrupt, decoder_layers, evaluate_task, prepare_model, save_output,
                      seed_everything, training_mode)
from ..runtime import peak_memory_gb, set_threads
from .safety import Diverged, DivergenceGuard, TrainError, run_folder, stopped
from .step import LossModule, backward_window, mean_loss

_STOP_AFTER: list[int] = []
_KEEP_GROUP: list[bool] = []


@contextlib.contextmanager
def stopping_after(step: int):
    """Stop runs started inside this block after `step` steps, as an interrupt would (for tests)."""
    _STOP_AFTER.append(step)
    try:
        yield
    finally:
        _STOP_AFTER.pop()


@contextlib.contextmanager
def keeping_process_group():
    """Runs inside this block leave the process group up for the next one (a staged job's stages
    share one group rather than tearing torchrun's down and joining it again); it is torn down on leaving."""
    _KEEP_GROUP.append(True)
    try:
        yield
    finally:
        _KEEP_GROUP.pop()
        if not _KEEP_GROUP and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@dataclass
class RunResult:
    run_dir: Path
    status: str  # "completed" or "interrupted"
    step: int
    total_steps: int
    output: Path | None = None
    summary: dict = field(default_factory=dict)


@dataclass
class Run:
    """Everything one training run holds, built once by `open_run`."""

    recipe: rcp.Recipe
    dist: distributed.Dist
    device: torch.device
    model: torch.nn.Module = None
    tokenizer: object = None
    method: object = None
    objective: object = None
    splits: object = None
    pad_id: int = 0
    runner: torch.nn.Module = None
    source: object = None
    optimizer: torch.optim.Optimizer = None
    scheduler: object = None
    params: list = field(default_factory=list)
    guard: DivergenceGuard = None
    log: MetricsLog | None = None
    total_steps: int = 0
    start_step: int = 0
    step: int = 0
    val_batches: list | None = None
    last_val: float | None = None
    tokens_seen: int = 0
    epoch_hooked: int | None = None
    resume_from: Path | None = None
    t_start: float = 0.0

    def print_main(self, *args) -> None:
        """Print on the main process only."""
        if self.dist.main:
            print(*args, flush=True)


def train(recipe: rcp.Recipe, *, model=None, tokenizer=None, objective=None) -> RunResult:
    """Run the recipe, in this process or as one rank of a torchrun job. `model`/`tokenizer` may be
    passed in (e.g. a model already in memory); `objective` replaces the recipe's (an Objective object)."""
    if recipe.stages:  # several trainings in order, one job (train/stages.py calls back here per stage)
        from .stages import run_stages

        return run_stages(recipe, model=model, tokenizer=tokenizer, objective=objective)
    cfg = recipe.train
    dist, device = distributed.setup(cfg.strategy, cfg.device, cfg.dist_timeout)
    try:
        with run_folder(recipe.run_dir, dist.main) as started:
            run = Run(recipe, dist, device)
            open_run(run, model, tokenizer, objective)
            status = run_steps(run, started)
            return close_run(run, status)
    finally:
        if not _KEEP_GROUP:
            distributed.teardown(dist)


# --------------------------------------------------------------------------------------------------
# set-up


def open_run(run: Run, model, tokenizer, objective) -> None:
    recipe, cfg, dist = run.recipe, run.recipe.train, run.dist
    trackers.available(cfg.report_to)  # a tracker that is not installed: said before the model loads, on every rank
    if recipe.resume:
        run.resume_from = ckpt.latest_checkpoint(recipe.run_dir, verified=True, note=run.print_main)
    elif ckpt.list_checkpoints(recipe.run_dir):
        raise TrainError(f"{recipe.run_dir} already holds checkpoints: continue it with resume=true, "
                         "or start a new run with name=<new name>")
    threads = set_threads(cfg.threads) if run.device.type == "cpu" else torch.get_num_threads()
    seed_everything(cfg.seed)
    run.tokenizer = tokenizer or load_tokenizer(str(model_folder(recipe.model.name)))  # names an encoder too
    kind = objective or objective_class(recipe.objective.name)
    if not kind.multi_process and (dist.active or recipe.nproc > 1):
        raise TrainError(f"{kind.name} runs in one process: set nproc=1")
    if kind.fixed_data:  # data first: a mistake in it should not wait for the model to load
        run.splits = kind.load(recipe, run.tokenizer)
    _load_model(run, model, objective)
    if dist.main:  # after the model is prepared: a continued adapter's own options are recorded
        resolved = rcp.to_yaml(recipe)
        (recipe.run_dir / "recipe.yaml").write_text(resolved)
        run.print_main(f"[tunesmith] run folder: {recipe.run_dir}\n--- resolved recipe ---\n{resolved}-----------------------")
    n_train, n_total = count_parameters(run.model)
    strategy = f" · {dist.strategy} × {dist.world} processes" if dist.active else ""
    run.print_main(f"[tunesmith] objective {run.objective.name} · method {run.method.name}: {n_train:,} trainable of "
            f"{n_total:,} parameters ({100 * n_train / n_total:.3f}%) · device {run.device} · {threads} threads · "
            f"{cfg.precision}{strategy}")
    if run.method.describe(run.model):
        run.print_main(f"[tunesmith] {run.method.name}: {run.method.describe(run.model)}")
    if changed_rope(run.model):
        run.print_main(f"[tunesmith] rope: {describe_rope(changed_rope(run.model))}")
    run.objective.prepare(run)
    _plan_steps(run)
    _build_optimizer(run)


def _load_model(run: Run, model, objective) -> None:
    """Model, method and objective, the model wrapped for the run's processes."""
    recipe = run.recipe
    run.model, run.tokenizer, run.method = prepare_model(recipe, model, run.tokenizer)  # seeded: same on every rank
    if run.dist.active:
        torch.manual_seed(recipe.train.seed + run.dist.rank)  # dropout streams differ per rank; data order does not
    run.model.to(run.device)
    training_mode(run.model, recipe.train)
    run.objective = objective or build_objective(recipe, run.model)
    run.runner = distributed.wrap(LossModule(run.model, run.objective, run.method), run.dist, run.device,
                                  decoder_layers(run.model))
    tok = run.tokenizer
    run.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _plan_steps(run: Run) -> None:
    """The batch source, the number of steps and the validation batches."""
    recipe, dist = run.recipe, run.dist
    run.source = run.objective.source(run)
    if run.source is None:
        run.source = DataStream(run.splits.train, run.objective, recipe, dist, run.pad_id)
        if recipe.train.effective_batch:
            run.print_main(apply_effective_batch(run.source, recipe.train, dist.world))
        run.total_steps = run.source.total_steps()
        if run.splits.val:
            val = MicroBatches(run.splits.val, run.objective, recipe.data, recipe.train, recipe.train.seed,
                               run.pad_id, shuffle=False).epoch_batches()
            run.val_batches = val[dist.rank::dist.world]
        run.print_main(f"[tunesmith] {run.source.describe(len(run.splits.train), len(run.splits.val or []), run.total_steps)}")
    elif recipe.train.effective_batch:
        raise TrainError(f"train.effective_batch: objective {run.objective.name} makes its own batches; "
                         "size them with its own options")
    else:
        run.total_steps = run.source.total_steps()
    run.method.on_train_start(run.model, run.total_steps)


def _build_optimizer(run: Run) -> None:
    recipe, cfg = run.recipe, run.recipe.train
    run.optimizer = build_optimizer(run.model, cfg, run.method)
    run.scheduler = build_scheduler(run.optimizer, cfg, run.total_steps)
    if run.resume_from is not None:
        state = ckpt.load_checkpoint(run.resume_from, run.model, run.optimizer, run.scheduler, run.dist,
                                     method=run.method)
        run.start_step = run.step = state["step"]
        run.source.restore(state, run.start_step)
        run.print_main(f"[tunesmith] resumed from {run.resume_from} (step {run.start_step})")
    elif recipe.resume:
        run.print_main(f"[tunesmith] resume=true but {recipe.run_dir} has no checkpoint yet: starting fresh")
    run.dist.barrier()
    if run.dist.main:
        run.log = MetricsLog(recipe.run_dir, resume_step=run.start_step if run.resume_from else None,
                             report_to=cfg.report_to, config=rcp.to_dict(recipe))
    run.params = [p for p in run.model.parameters() if p.requires_grad]
    run.guard = DivergenceGuard(vocab_size=run.model.config.vocab_size, token_loss=run.objective.token_loss,
                                spikes=run.objective.trends_down, patience=cfg.divergence_patience)


# --------------------------------------------------------------------------------------------------
# the steps


def run_steps(run: Run, started) -> str:
    """Step until done or interrupted; returns "completed" or "interrupted"."""
    recipe, dist = run.recipe, run.dist
    run.t_start = time.perf_counter()
    bar = tqdm(total=run.total_steps, initial=run.start_step, desc=f"train {recipe.name}", unit="step",
               dynamic_ncols=True, disable=not dist.main)
    try:
        with Interrupt() as interrupt:
            while run.step < run.total_steps:
                row, window = one_step(run)
                started()
                _show(run, bar, row)
                val = _validate(run)
                _evaluate(run)
                stop = bool(_STOP_AFTER and run.step >= _STOP_AFTER[-1]) or bool(dist.sum(float(bool(interrupt.requested))))
                _maybe_save(run, window, val, stop)
                if stop and run.step < run.total_steps:
                    if dist.main:
                        tqdm.write(f"[tunesmith] stopped at step {run.step}; continue with: resume=true")
                    return "interrupted"
    except Diverged as e:
        raise stopped(recipe.run_dir, e, note=run.print_main, main=dist.main) from None
    finally:
        bar.close()
        if run.log:
            run.log.close()
    return "completed"


def one_step(run: Run) -> tuple[dict, object]:
    """One optimizer step (or `window.passes` of them on the same batches); returns its log row."""
    cfg, dist, step = run.recipe.train, run.dist, run.step
    t0 = time.perf_counter()
    window = run.source.window(step)
    if run.epoch_hooked != window.epoch:  # a new epoch (or the first of this session)
        run.epoch_hooked = window.epoch
        run.method.on_epoch(run.model, window.epoch, run.optimizer)
    losses, norms, sums = [], [], {}
    for _ in range(window.passes):
        loss, _, n_tokens, metrics = backward_window(run.runner, window.batches, run.device, cfg.precision,
                                                     window.units, scale=dist.world)
        loss, n_tokens = dist.sum(loss), int(dist.sum(n_tokens))
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + dist.sum(v)
        run.guard.check_loss(loss, step + 1)
        if not window.batches:  # nothing to train this step (GRPO: no signal): still one step, all-zero
            for p in run.params:
                p.grad = torch.zeros_like(p)
        norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        run.guard.check_grad(norm, step + 1)
        run.optimizer.step()
        run.method.after_step(run.model, step + 1, run.optimizer)
        run.optimizer.zero_grad(set_to_none=True)
        run.guard.check_weights(run.params, step + 1, reduce=dist.sum)
        losses.append(loss)
        norms.append(norm)
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    run.step = step + 1
    run.guard.observe(sum(losses) / len(losses), norms[-1], run.step, expect_grad=bool(window.batches))
    return _row(run, window, losses, norms, sums, n_tokens, lr, time.perf_counter() - t0), window


def _row(run: Run, window, losses, norms, sums, n_tokens, lr, dt) -> dict:
    tokens = window.tokens if window.tokens is not None else n_tokens
    run.tokens_seen += tokens
    per = max(window.metric_units or window.units, 1) * len(losses)
    unit = run.objective.unit
    return {"step": run.step, "loss": sum(losses) / len(losses), "lr": lr, "grad_norm": norms[-1], "tokens": tokens,
            unit: window.units, "tokens_per_s": tokens / dt, f"{unit}_per_s": window.units / dt, "step_s": dt,
            "peak_mem_gb": peak_memory_gb(run.device), **window.metrics,
            **{k: v / per for k, v in sorted(sums.items())}}


def _show(run: Run, bar, row: dict) -> None:
    cfg = run.recipe.train
    if run.log and (run.step % cfg.log_every == 0 or run.step == run.total_steps):
        run.log.write(row)
    shown = {k.split("/")[-1]: f"{row[k]:.3f}" for k in ("rewards/margins", "rewards/accuracies", "reward_mean")
             if k in row}
    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:,.0f}", **shown)
    bar.update(1)


def _validate(run: Run) -> float | None:
    """Validation loss every `train.eval_every` steps and at the end (fixed-data objectives)."""
    cfg, dist, step = run.recipe.train, run.dist, run.step
    if run.val_batches is None or not ((cfg.eval_every and step % cfg.eval_every == 0) or step == run.total_steps):
        return None
    total, count = mean_loss(run.runner, run.val_batches, run.device, cfg.precision, limit=cfg.eval_batches,
                             reduce=False)
    run.last_val = dist.sum(total) / max(dist.sum(count), 1)
    if run.log:
        run.log.write({"step": step, "val_loss": run.last_val, "val_ppl": math.exp(min(run.last_val, 50))})
    if dist.main:
        tqdm.write(f"[tunesmith] step {step}: validation loss {run.last_val:.4f}")
    return run.last_val


def _evaluate(run: Run) -> None:
    """The recipe's eval task every `eval.every` steps (the end is measured by close_run)."""
    recipe, step = run.recipe, run.step
    if not (recipe.eval.task and recipe.eval.every and step % recipe.eval.every == 0):
        return
    if step == run.total_steps and run.objective.evaluates_at_end:
        return
    if run.dist.active:
        raise TrainError("eval.every (generation during training) runs in one process only; "
                         "measure the saved adapter with `tunesmith eval` instead")
    result = evaluate_task(run.model, run.tokenizer, recipe)
    run.log.write({"step": step, f"eval_{result.metric}": result.main})
    tqdm.write(f"[tunesmith] step {step}: {result.task} {result.split} {result.metric} {100 * result.main:.1f}%")


def _maybe_save(run: Run, window, val: float | None, stop: bool) -> None:
    cfg, step = run.recipe.train, run.step
    if not (step == run.total_steps or (cfg.save_every and step % cfg.save_every == 0) or stop):
        return
    info = {"epoch": window.metrics.get("epoch", window.epoch), "total_steps": run.total_steps,
            "objective": run.objective.name, "healthy": run.guard.healthy, "val_loss": val,
            **run.source.state(step)}
    ckpt.save_checkpoint(run.recipe.run_dir, step, run.model, run.optimizer, run.scheduler, info, cfg.keep_last,
                         run.dist, method=run.method)


# --------------------------------------------------------------------------------------------------
# the end


def close_run(run: Run, status: str) -> RunResult:
    recipe, dist = run.recipe, run.dist
    elapsed = time.perf_counter() - run.t_start
    n_train, n_total = count_parameters(run.model)
    summary = {"objective": run.objective.name, "steps": run.step, "session_steps": run.step - run.start_step,
               "wall_s": elapsed, "tokens_per_s": run.tokens_seen / max(elapsed, 1e-9),
               "peak_mem_gb": peak_memory_gb(run.device), "val_loss": run.last_val, "processes": dist.world,
               "trainable_parameters": n_train, "parameters": n_total}
    output, eval_result = None, None
    if status == "completed":
        eval_result = _final_eval(run, summary)
        output = save_output(recipe, run.model, run.tokenizer, run.method, dist, run.objective)
        run.print_main(f"[tunesmith] done: step {run.step}/{run.total_steps} ({run.step - run.start_step} in this session, "
                f"{elapsed:.0f} s), {summary['tokens_per_s']:,.0f} tokens/s, peak memory "
                f"{summary['peak_mem_gb']:.2f} GB → {output}")
    if dist.main:
        from .report import write_report

        rows = read_metrics(recipe.run_dir / "metrics.jsonl")
        write_report(recipe.run_dir, summary, run.objective.report_sections(recipe.run_dir, rows, eval_result))
    dist.barrier()
    return RunResult(recipe.run_dir, status, run.step, run.total_steps, output, summary)


def _final_eval(run: Run, summary: dict):
    recipe = run.recipe
    if not (recipe.eval.task and run.objective.evaluates_at_end) or run.dist.active:
        return None
    from ..eval.runner import save_result

    result = evaluate_task(run.model, run.tokenizer, recipe)
    save_result(result, recipe.run_dir / f"eval-{result.split}.json", model=recipe.model.name,
                adapter=str(recipe.run_dir / "adapter"))
    summary[f"eval_{result.metric}"] = result.main
    run.print_main(f"[tunesmith] {result.task} {result.split} {result.metric}: {100 * result.main:.1f}% "
            f"({result.summary['examples']} examples)")
    return result
