"""GRPO with verifiable rewards (Shao et al., 2024, DeepSeekMath §4), top to bottom:
sample a group of completions per prompt → score them → group-relative advantages → clipped
policy-gradient steps on the completion tokens.

    make quickstart                              # SFT: writes runs/quickstart/adapter
    tunesmith train recipes/sql-grpo.yaml        # objective.name: grpo → train_grpo(recipe)

    result = train_grpo(load_recipe("recipes/sql-grpo.yaml"))
    result = train_grpo(recipe, task=my_task)    # any object with the Task protocol (eval/task.py)

One step:
1. prompts: `prompts_per_step` examples of the task split; step s takes prompts s·P … s·P+P−1 of a
   seeded shuffle per pass over the split, so a step's prompts depend only on (seed, s).
2. rollouts: `samples` completions per prompt, sampled at `temperature` with stock sdpa attention
   and a KV cache, from a generator seeded by (seed, s). The sampled token ids are kept (never
   re-tokenized) and end with the end-of-turn token when the model produced one.
3. rewards (objectives/rewards.py) → advantages, normalised inside each group.
4. training rows: prompt ids + completion ids, weight 1 on completion tokens, packed into
   micro-batches of `train.batch_tokens`. With kl_beta = 0, completions whose advantage is 0
   (every group whose rewards were all equal) contribute exactly zero gradient and are skipped.
5. `iterations` optimizer steps on the clipped loss, normalised by all completion tokens of the
   step. The "old" log-probs are those of the first pass (before any update of this step), so
   the ratio is exactly 1 on the first iteration. With kl_beta > 0, the reference is the policy
   this run started from (the SFT adapter of `model.adapter`, or the base model for a fresh LoRA):
   its trainable weights are kept aside and swapped in for a no-grad pass.

The lr schedule advances once per GRPO step (`train.steps` of them). Ctrl-C finishes the step and
writes a checkpoint; resume=true continues exactly (the sampling seed is per step).
"""
from __future__ import annotations

import contextlib
import functools
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import recipe as rcp
from ..data import collate, plan_batches
from ..eval.runner import build_prompt, get_eval_task, save_result
from ..infer.generate import left_pad, render_prompt, stop_ids
from ..methods import count_parameters
from ..models.attention import use_attention
from ..models.load import load_tokenizer
from ..objectives.grpo import group_advantages, grpo_loss, token_logps
from ..objectives.rewards import RewardError, build_rewards
from . import checkpoint as ckpt
from . import distributed
from .loop import RunResult, _Interrupt, evaluate_task, prepare_model, save_output, seed_everything, to_device, training_mode
from .metrics import MetricsLog, read_metrics
from .optim import build_optimizer, build_scheduler
from .runtime import autocast, peak_memory_gb, pick_device, set_threads
from .safety import Diverged, DivergenceGuard, TrainError, run_folder, stopped


# --------------------------------------------------------------------------------------------------
# prompts and rollouts


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(f"tunesmith-grpo:{seed}:{epoch}").shuffle(order)  # str seeds are stable across runs
    return tuple(order)


def prompt_indices(n: int, per_step: int, seed: int, step: int) -> list[int]:
    """Indices into the split for 0-based `step`: a fresh seeded shuffle per pass over the split."""
    return [_permutation(n, seed, k // n)[k % n] for k in range(step * per_step, (step + 1) * per_step)]


def encode_prompt(tokenizer, task, example) -> list[int]:
    """The chat (system prompt + question) with the assistant turn opened, as token ids."""
    text = render_prompt(tokenizer, build_prompt(task, example, []))
    templated = getattr(tokenizer, "chat_template", None) is not None
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


@torch.no_grad()
def sample_completions(model, rows: list[list[int]], *, max_new_tokens: int, temperature: float, seed: int,
                       stops: list[int], pad: int, precision: str) -> list[list[int]]:
    """Sample one completion per prompt row (left-padded batch, KV cache, stock sdpa attention);
    return the new token ids of each, up to and including the first stop token.
    Seeded by `seed`, without touching the caller's RNG."""
    device = next(model.parameters()).device
    input_ids, mask = left_pad(rows, pad)
    training_attention = model.config._attn_implementation
    was_training = model.training
    use_attention(model, "sdpa")
    model.eval()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), autocast(device, precision):
            torch.manual_seed(seed)
            # plain sampling from softmax(logits / T): the distribution the loss assumes
            out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                 top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0,
                                 eos_token_id=stops, pad_token_id=pad, use_cache=True)
    finally:
        model.set_attn_implementation(training_attention)
        model.train(was_training)
    stop_set, completions = set(stops), []
    for row in out[:, input_ids.shape[1]:].tolist():
        end = next((j + 1 for j, t in enumerate(row) if t in stop_set), len(row))
        completions.append(row[:end])
    return completions


@contextlib.contextmanager
def swapped_weights(params: list[torch.nn.Parameter], tensors: list[torch.Tensor]):
    """Run with `tensors` in place of the trainable `params` (the reference policy), then restore."""
    current = [p.data for p in params]
    for p, t in zip(params, tensors):
        p.data = t
    try:
        yield
    finally:
        for p, t in zip(params, current):
            p.data = t


# --------------------------------------------------------------------------------------------------
# the run


def train_grpo(recipe: rcp.Recipe, *, task=None, model=None, tokenizer=None, _stop_after: int | None = None) -> RunResult:
    """Run a GRPO recipe (`objective.name: grpo`) in this process; see the module docstring.
    `task` replaces `objective.grpo.task` with a Task object; `model`/`tokenizer` may be passed in."""
    g, cfg = recipe.objective.grpo, recipe.train
    if distributed.under_launcher() or recipe.nproc > 1:
        raise TrainError("GRPO runs in one process: set nproc=1 (sampling and scoring are not distributed yet)")
    if not cfg.steps:
        raise TrainError("GRPO needs train.steps (there are no epochs of fixed data): e.g. train.steps=50")
    if g.temperature <= 0:
        raise TrainError("objective.grpo.temperature must be > 0: a group of greedy answers is one answer repeated")
    if g.samples < 2:
        raise TrainError("objective.grpo.samples must be >= 2: advantages compare completions of one prompt")
    for name, v in (("prompts_per_step", g.prompts_per_step), ("max_new_tokens", g.max_new_tokens),
                    ("iterations", g.iterations)):
        if v < 1:
            raise TrainError(f"objective.grpo.{name} must be >= 1, got {v}")
    if g.epsilon <= 0 or g.kl_beta < 0:
        raise TrainError(f"objective.grpo: epsilon must be > 0 and kl_beta >= 0 (got {g.epsilon}, {g.kl_beta})")

    with run_folder(recipe.run_dir) as started:
        return _train_grpo(recipe, task, model, tokenizer, _stop_after, started)


def _train_grpo(recipe, task, model, tokenizer, _stop_after, started) -> RunResult:
    g, cfg = recipe.objective.grpo, recipe.train
    run_dir, total_steps = recipe.run_dir, cfg.steps
    resume_from = ckpt.latest_checkpoint(run_dir, verified=True) if recipe.resume else None
    if not recipe.resume and ckpt.list_checkpoints(run_dir):
        raise TrainError(f"{run_dir} already holds checkpoints: continue it with resume=true, "
                         "or start a new run with name=<new name>")
    device = pick_device(cfg.device)
    threads = set_threads(cfg.threads) if device.type == "cpu" else torch.get_num_threads()
    seed_everything(cfg.seed)
    resolved = rcp.to_yaml(recipe)
    (run_dir / "recipe.yaml").write_text(resolved)
    print(f"[tunesmith] run folder: {run_dir}\n--- resolved recipe ---\n{resolved}-----------------------", flush=True)

    # ---- task, prompts, rewards
    try:
        if task is None:
            task = get_eval_task(g.task, recipe.eval.metric, seed=recipe.eval.seed)
        examples = task.examples(g.split)
        rewards = build_rewards(g.reward, task)
    except (ValueError, OSError) as e:  # unknown task or split, a reward that cannot be imported, ...
        raise TrainError(f"objective.grpo: {e}") from None
    if not examples:
        raise TrainError(f"task {task.name} has no examples in split {g.split}")
    if recipe.eval.task == g.task and recipe.eval.split == g.split:
        print(f"[tunesmith] note: eval.split={g.split} is also where the GRPO prompts come from; "
              "measure a held-out split (eval.split=test) to see generalisation", flush=True)

    # ---- model (LoRA, possibly continuing model.adapter), optimizer, schedule
    if tokenizer is None:
        tokenizer = load_tokenizer(recipe.model.name)
    model, tokenizer, method = prepare_model(recipe, model, tokenizer)
    method.on_train_start(model, total_steps)
    model.to(device)
    training_mode(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    # the reference policy = the trainable weights as this stage starts (before any checkpoint is loaded)
    reference = [p.detach().clone() for p in params] if g.kl_beta > 0 else None
    stops = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    prompt_ids: dict[int, list[int]] = {}
    n_train, n_total = count_parameters(model)
    print(f"[tunesmith] GRPO on {task.name}/{g.split} ({len(examples)} prompts) · reward {' + '.join(g.reward)} · "
          f"{g.prompts_per_step} prompts × {g.samples} samples a step · method {method.name}: {n_train:,} trainable "
          f"of {n_total:,} · device {device} · {threads} threads · {cfg.precision}", flush=True)

    optimizer = build_optimizer(model, cfg, method)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    start_step = 0
    if resume_from is not None:
        start_step = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler, method=method)["step"]
        print(f"[tunesmith] resumed from {resume_from} (step {start_step})", flush=True)
    elif recipe.resume:
        print(f"[tunesmith] resume=true but {run_dir} has no checkpoint yet: starting fresh", flush=True)
    log = MetricsLog(run_dir, resume_step=start_step if resume_from else None)
    guard = DivergenceGuard(vocab_size=model.config.vocab_size, token_loss=False, spikes=False,
                            patience=cfg.divergence_patience)
    epoch_hooked = None

    status, step, t_start, tokens_seen = "completed", start_step, time.perf_counter(), 0
    bar = tqdm(total=total_steps, initial=start_step, desc=f"grpo {recipe.name}", unit="step", dynamic_ncols=True)
    try:
        with _Interrupt() as interrupt:
            while step < total_steps:
                t0 = time.perf_counter()
                epoch = step * g.prompts_per_step // len(examples)  # passes over the prompts
                if epoch != epoch_hooked:  # a new pass (or the first of this session)
                    epoch_hooked = epoch
                    method.on_epoch(model, epoch, optimizer)
                # ---- 1. prompts of this step, each repeated `samples` times (a group)
                picked = prompt_indices(len(examples), g.prompts_per_step, cfg.seed, step)
                for i in picked:
                    if i not in prompt_ids:
                        prompt_ids[i] = encode_prompt(tokenizer, task, examples[i])
                group_examples = [examples[i] for i in picked for _ in range(g.samples)]
                rows = [prompt_ids[i] for i in picked for _ in range(g.samples)]

                # ---- 2. rollouts
                completions = sample_completions(model, rows, max_new_tokens=g.max_new_tokens,
                                                 temperature=g.temperature, seed=step_seed(cfg.seed, step),
                                                 stops=stops, pad=pad, precision=cfg.precision)
                texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
                gen_s = time.perf_counter() - t0

                # ---- 3. rewards → advantages
                try:
                    parts = rewards.components(texts, group_examples)
                except RewardError as e:
                    raise TrainError(str(e)) from e
                reward = torch.stack(list(parts.values())).sum(0)  # (P·G,)
                passed = parts["task"] if "task" in parts else torch.tensor(
                    [float(task.score(t, ex).correct) for t, ex in zip(texts, group_examples)])
                adv = group_advantages(reward.view(-1, g.samples), scale=g.scale_rewards).view(-1)

                # ---- 4. training rows, packed into micro-batches
                total_tokens = sum(len(c) for c in completions)  # the loss normaliser (all completions)
                keep = [j for j in range(len(rows)) if g.kl_beta > 0 or adv[j] != 0]
                samples = [{"input_ids": rows[j] + completions[j],
                            "weights": [0.0] * len(rows[j]) + [1.0] * len(completions[j])} for j in keep]
                plan = plan_batches([len(s["input_ids"]) for s in samples], packing=True,
                                    batch_tokens=cfg.batch_tokens, batch_size=1, seed=0, epoch=0, shuffle=False)
                micro = []
                for batch_idx in plan:
                    batch = to_device(collate([samples[k] for k in batch_idx], packing=True, pad_id=pad), device)
                    adv_tok = torch.cat([adv[keep[k]].repeat(len(completions[keep[k]])) for k in batch_idx])
                    micro.append({"batch": batch, "adv": adv_tok.to(device), "old": None, "ref": None})
                if reference is not None:
                    with torch.no_grad(), swapped_weights(params, reference), autocast(device, cfg.precision):
                        for mb in micro:
                            mb["ref"] = token_logps(model, mb["batch"], cfg.loss_chunk, g.temperature)

                # ---- 5. clipped policy-gradient steps
                losses, norms, stats, counted = [], [], {"clip_fraction": 0.0, "ratio": 0.0, "kl": 0.0}, 0
                for _ in range(g.iterations):
                    loss_total = 0.0
                    for mb in micro:
                        with autocast(device, cfg.precision):
                            logp = token_logps(model, mb["batch"], cfg.loss_chunk, g.temperature)
                        if mb["old"] is None:  # first pass: the policy has not moved since sampling
                            mb["old"] = logp.detach()
                        loss_sum, n, m = grpo_loss(logp, mb["old"], mb["adv"], mb["ref"], g.epsilon, g.kl_beta)
                        (loss_sum / max(total_tokens, 1)).backward()
                        loss_total += float(loss_sum.detach())
                        for k in stats:  # token-weighted means over all passes
                            stats[k] += m.get(k, 0.0) * n
                        counted += n
                    loss = loss_total / max(total_tokens, 1)
                    guard.check_loss(loss, step + 1)
                    for p in params:  # no trainable completion this step: a zero gradient, still one step
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                    norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")))
                    guard.check_grad(norm, step + 1)
                    optimizer.step()
                    method.after_step(model, step + 1, optimizer)
                    optimizer.zero_grad(set_to_none=True)
                    guard.check_weights(params, step + 1)
                    losses.append(loss)
                    norms.append(norm)
                stats = {k: v / max(counted, 1) for k, v in stats.items()}
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                step += 1
                guard.observe(losses[-1], norms[-1], step, expect_grad=bool(keep))
                started()

                # ---- log
                dt = time.perf_counter() - t0
                n_tokens = sum(len(r) + len(c) for r, c in zip(rows, completions))
                tokens_seen += n_tokens
                trained = sum(len(completions[j]) for j in keep)
                row = {"step": step, "loss": sum(losses) / len(losses), "reward_mean": float(reward.mean()),
                       "reward_std": float(reward.std()), "pass_rate": float((passed == 1).float().mean()),
                       **{f"reward_{k}": float(v.mean()) for k, v in parts.items()},
                       "completion_len": total_tokens / len(completions),
                       "truncated": sum(bool(c) and c[-1] not in stops for c in completions)
                       / len(completions),
                       "zero_signal_groups": float((adv.view(-1, g.samples) == 0).all(1).float().mean()),
                       "clip_fraction": stats["clip_fraction"], "ratio": stats["ratio"], "lr": lr,
                       "grad_norm": norms[-1], "trained_tokens": trained, "tokens": n_tokens,
                       "tokens_per_s": n_tokens / dt, "generation_s": gen_s, "step_s": dt,
                       "peak_mem_gb": peak_memory_gb(device)}
                if reference is not None:
                    row["kl"] = stats["kl"]
                if step % cfg.log_every == 0 or step == total_steps:
                    log.write(row)
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", passed=f"{row['pass_rate']:.2f}",
                                len=f"{row['completion_len']:.0f}", s=f"{dt:.0f}")
                bar.update(1)

                if recipe.eval.task and recipe.eval.every and step % recipe.eval.every == 0 and step != total_steps:
                    result = evaluate_task(model, tokenizer, recipe)
                    log.write({"step": step, f"eval_{result.metric}": result.main})
                    tqdm.write(f"[tunesmith] step {step}: {result.task} {result.split} {result.metric} "
                               f"{100 * result.main:.1f}%")

                stop = (_stop_after is not None and step >= _stop_after) or bool(interrupt.requested)
                if step == total_steps or (cfg.save_every and step % cfg.save_every == 0) or stop:
                    ckpt.save_checkpoint(run_dir, step, model, optimizer, scheduler,
                                         {"total_steps": total_steps, "objective": "grpo", "healthy": guard.healthy},
                                         cfg.keep_last, method=method)
                if stop and step < total_steps:
                    status = "interrupted"
                    tqdm.write(f"[tunesmith] stopped at step {step}; continue with: resume=true")
                    break
    except Diverged as e:
        raise stopped(run_dir, e) from None
    finally:
        bar.close()
        log.close()

    elapsed = time.perf_counter() - t_start
    summary = {"steps": step, "session_steps": step - start_step, "wall_s": elapsed,
               "tokens_per_s": tokens_seen / max(elapsed, 1e-9), "peak_mem_gb": peak_memory_gb(device)}
    rows_logged = [r for r in read_metrics(run_dir / "metrics.jsonl") if "reward_mean" in r]
    if rows_logged:
        summary["step_s_median"] = sorted(r["step_s"] for r in rows_logged)[len(rows_logged) // 2]
    output, eval_result = None, None
    if status == "completed":
        if recipe.eval.task:
            eval_result = evaluate_task(model, tokenizer, recipe)
            save_result(eval_result, run_dir / f"eval-{eval_result.split}.json", model=recipe.model.name,
                        adapter=str(run_dir / "adapter"))
            summary[f"eval_{eval_result.metric}"] = eval_result.main
            print(f"[tunesmith] {eval_result.task} {eval_result.split} {eval_result.metric}: "
                  f"{100 * eval_result.main:.1f}% ({eval_result.summary['examples']} examples)", flush=True)
        output = save_output(recipe, model, tokenizer, method)
        print(f"[tunesmith] done: step {step}/{total_steps} ({step - start_step} in this session, {elapsed:.0f} s) "
              f"→ {output}", flush=True)
    from .report import write_report

    write_report(run_dir, summary, reward_sections(run_dir, eval_result))
    return RunResult(run_dir, status, step, total_steps, output, summary)


# --------------------------------------------------------------------------------------------------
# report


def plot_rewards(rows: list[dict], path: Path) -> bool:
    steps = [r for r in rows if "reward_mean" in r]
    if not steps:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["step"] for r in steps]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(x, [r["reward_mean"] for r in steps], label="mean reward", lw=1.2)
    ax.plot(x, [r["pass_rate"] for r in steps], label="pass rate (task reward 1)", lw=1.2)
    for key in sorted({k for r in rows for k in r if k.startswith("eval_")}):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), "o-", label=key.replace("_", " ", 1), lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("reward / share")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def reward_sections(run_dir: Path, eval_result=None) -> list[str]:
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    steps = [r for r in rows if "reward_mean" in r]
    lines = []
    if steps:
        k = max(1, len(steps) // 5)  # first vs last fifth of the run: single steps are noisy
        mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
        lines += ["## Rewards", "", f"| figure | first {k} steps | last {k} steps |", "|---|---|---|"]
        for key in ("reward_mean", "pass_rate", "completion_len", "step_s"):
            lines.append(f"| {key} | {mean(steps[:k], key):.3f} | {mean(steps[-k:], key):.3f} |")
        lines.append("")
        if plot_rewards(rows, Path(run_dir) / "reward.png"):
            lines += ["![reward curve](reward.png)", ""]
    if eval_result is not None:
        lines += [f"## Evaluation: {eval_result.task} ({eval_result.split} split, "
                  f"{eval_result.summary['examples']} examples)", "",
                  f"{eval_result.metric}: **{100 * eval_result.main:.1f}%**", ""]
    return ["\n".join(lines)] if lines else []
