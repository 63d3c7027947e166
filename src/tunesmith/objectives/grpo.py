"""GRPO with verifiable rewards (Shao et al., 2024, DeepSeekMath §4), top to bottom:
sample a group of completions per prompt → score them → group-relative advantages → clipped
policy-gradient steps on the completion tokens.

    tunesmith train recipes/sql-grpo.yaml        # objective.name: grpo
    train(recipe, objective=GRPO.build(recipe, task=my_task))   # any object with the Task protocol

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

The math (§4.1): group-relative advantages, per-token log-probs of sampled completions, and the
clipped surrogate with a k3 KL penalty.

    A = group_advantages(rewards)                       # (P, G): P prompts, G completions each
    logp = token_logps(model, batch)                    # (N,) one per completion token of the batch
    loss_sum, n, metrics = grpo_loss(logp, old_logp, adv_per_token, ref_logp, epsilon=0.2, kl_beta=0.04)

Like the SFT objective, the loss is a *sum* over tokens: the caller divides by the completion
tokens of the whole step (token-level aggregation, DAPO §3.3), so a long answer counts per token
rather than per sample and micro-batching does not change the gradient.
"""
from __future__ import annotations

import contextlib
import functools
import random
import time
from pathlib import Path

import torch
from pydantic import Field
from torch.utils.checkpoint import checkpoint

from ..config import Config
from ..data import collate, plan_batches, to_device
from ..models.attention import use_attention
from ..plots import plot_curves
from .base import ObjectiveBase, ObjectiveError, Window
from .rewards import RewardError, build_rewards
from .sft import forward_hidden


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(P, G) rewards -> (P, G) advantages: the reward minus its group's mean, divided by the
    group's standard deviation + eps when `scale` (GRPO), only centred otherwise (Dr. GRPO,
    Liu et al., 2025: the std division up-weights groups that are nearly all right or all wrong).
    The std is the sample std (n − 1), as in the paper's reference implementations."""
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be (prompts, samples), got shape {tuple(rewards.shape)}")
    r = rewards.to(torch.float32)
    centred = r - r.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    std = r.std(dim=1, keepdim=True) if r.shape[1] > 1 else torch.zeros_like(r[:, :1])
    return centred / (std + eps)


def _chunk_logps(head, h, targets, temperature: float):
    logits = head(h).float()  # (n, vocab), fp32 whatever the autocast dtype
    if temperature != 1.0:
        logits = logits / temperature
    # log_softmax gathered at the target, without materialising the (n, vocab) log-probs
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps(model, batch: dict, chunk: int = 1024, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) for every trained target of a collated batch: (N,) in the order of
    `batch["weights"][:, 1:] > 0` flattened (row by row, left to right).

    As in the SFT loss, only trained positions go through the lm_head, `chunk` at a time, each
    chunk recomputed in backward. `temperature` divides the logits, so the log-probs are those of
    the distribution the completions were sampled from (TRL does the same)."""
    hidden = forward_hidden(model, batch)  # (B, T, d)
    keep = batch["weights"][:, 1:] > 0  # position t predicts token t+1
    h = hidden[:, :-1][keep]  # (N, d)
    targets = batch["input_ids"][:, 1:][keep]  # (N,)
    head = model.get_output_embeddings()
    parts = []
    chunk = chunk if chunk > 0 else max(h.shape[0], 1)  # 0: one piece
    for i in range(0, h.shape[0], chunk):
        sl = slice(i, i + chunk)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logps, head, h[sl], targets[sl], temperature, use_reentrant=False))
        else:
            parts.append(_chunk_logps(head, h[sl], targets[sl], temperature))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
              ref_logp: torch.Tensor | None = None, epsilon: float = 0.2, kl_beta: float = 0.0):
    """The clipped surrogate per token, summed.

    ratio = exp(logp − old_logp); objective = min(ratio·A, clip(ratio, 1−ε, 1+ε)·A);
    loss = −objective + kl_beta · KL, with KL the k3 estimator exp(ref − logp) − (ref − logp) − 1
    (unbiased for KL(π‖π_ref), always ≥ 0; Schulman, 2020).

    Args:
        logp: (N,) log-probs of the current policy (with grad).
        old_logp: (N,) log-probs of the policy that sampled the completions (no grad).
        advantages: (N,) each completion's advantage repeated over its tokens.
        ref_logp: (N,) log-probs of the reference model; needed when kl_beta > 0.

    Returns:
        (loss_sum, n_tokens, metrics): metrics are means over these tokens: `clip_fraction` (tokens
        whose ratio is clipped, i.e. carry no gradient), `ratio`, and `kl` when a reference is given.
    """
    if kl_beta > 0 and ref_logp is None:
        raise ValueError("kl_beta > 0 needs the reference log-probs (ref_logp)")
    old_logp, advantages = old_logp.detach(), advantages.detach().to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    n = logp.numel()
    with torch.no_grad():
        is_clipped = ((ratio > 1.0 + epsilon) & (advantages > 0)) | ((ratio < 1.0 - epsilon) & (advantages < 0))
        metrics = {"clip_fraction": float(is_clipped.float().mean()) if n else 0.0,
                   "ratio": float(ratio.mean()) if n else 1.0}
    if ref_logp is not None:
        d = ref_logp.detach() - logp
        kl = torch.exp(d) - d - 1.0
        metrics["kl"] = float(kl.detach().mean()) if n else 0.0
        if kl_beta > 0:
            per_token = per_token + kl_beta * kl
    return per_token.sum(), n, metrics


# --------------------------------------------------------------------------------------------------
# the objective: prompts, rollouts, rewards → micro-batches (the batch source), and the loss


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
    from ..eval.runner import build_prompt
    from ..infer.generate import render_prompt

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
    from ..infer.generate import left_pad
    from ..runtime import autocast

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


def plot_rewards(rows: list[dict], path: Path) -> bool:
    steps = [r for r in rows if "reward_mean" in r]
    evals = {key.replace("_", " ", 1): [(r["step"], r[key]) for r in rows if key in r]
             for key in sorted({k for r in rows for k in r if k.startswith("eval_")})}
    return plot_curves({"mean reward": [(r["step"], r["reward_mean"]) for r in steps],
                        "pass rate (task reward 1)": [(r["step"], r["pass_rate"]) for r in steps]},
                       path, "reward / share", points=evals)


def reward_sections(run_dir: Path, rows: list[dict], eval_result=None) -> list[str]:
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


class GrpoConfig(Config):
    task: str = "sql"
    "Prompts and verifier: a built-in task (sql, json, humaneval) or a JSONL task file."
    reward: list[str] = Field(default_factory=lambda: ["task"])
    "Reward functions summed: task (the task's verifier), exact_match, format, or module:function."
    samples: int = 8
    "Completions per prompt (the group)."
    prompts_per_step: int = 4
    "Prompts per optimizer step."
    temperature: float = 1.0
    "Sampling temperature of the completions."
    max_new_tokens: int = 96
    "Longest completion."
    epsilon: float = 0.2
    "Clip range of the importance ratio."
    kl_beta: float = 0.0
    "Weight of the KL penalty to the reference (0 = none)."
    iterations: int = 1
    "Optimizer steps on each batch of completions (the ratio is 1 on the first)."
    scale_rewards: bool = True
    "Divide advantages by the group's reward std (False: Dr. GRPO)."
    split: str = "train"
    "Task split the prompts come from."


class GRPO(ObjectiveBase):
    """GRPO's clipped policy-gradient loss; its batches come from `Rollouts` (steps 1–4 above)."""

    name, unit, trends_down, multi_process, evaluates_at_end, fixed_data = \
        "grpo", "completion_tokens", False, False, True, False
    Options, block, block_doc = GrpoConfig, "grpo", "Options of grpo."

    def __init__(self, cfg, task, examples, rewards, chunk: int = 1024):
        self.cfg, self.task, self.examples, self.rewards, self.chunk = cfg, task, examples, rewards, chunk

    @classmethod
    def build(cls, recipe, model=None, task=None, **extras):
        """`task` replaces `objective.grpo.task` with a Task object (data/tasks/base.py)."""
        opts = recipe.objective.grpo
        check_options(opts, recipe.train.steps)
        try:
            task = task or _eval_task(opts.task, recipe.eval)
            examples = task.examples(opts.split)
            rewards = build_rewards(opts.reward, task)
        except (ValueError, OSError) as e:  # unknown task or split, a reward that cannot be imported, ...
            raise ObjectiveError(f"objective.grpo: {e}") from None
        if not examples:
            raise ObjectiveError(f"task {task.name} has no examples in split {opts.split}")
        return cls(opts, task, examples, rewards, recipe.train.loss_chunk)

    def source(self, run):
        return Rollouts(run, self)

    def __call__(self, model, batch):
        logp = token_logps(model, batch, self.chunk, self.cfg.temperature)
        state = batch["state"]  # kept across the step's iterations
        if "old" not in state:  # first pass: the policy has not moved since sampling
            state["old"] = logp.detach()
        loss_sum, n, metrics = grpo_loss(logp, state["old"], batch["advantages"], batch.get("ref_logps"),
                                         self.cfg.epsilon, self.cfg.kl_beta)
        return loss_sum, n, {k: v * n for k, v in metrics.items()}  # sums: the harness averages

    def report_sections(self, run_dir, rows, eval_result) -> list[str]:
        return reward_sections(run_dir, rows, eval_result)


def _eval_task(name, eval_cfg):
    from ..eval.runner import get_eval_task

    return get_eval_task(name, eval_cfg.metric, seed=eval_cfg.seed)


def check_options(opts, steps) -> None:
    if not steps:
        raise ObjectiveError("GRPO needs train.steps (there are no epochs of fixed data): e.opts. train.steps=50")
    if opts.temperature <= 0:
        raise ObjectiveError("objective.grpo.temperature must be > 0: a group of greedy answers is one answer repeated")
    if opts.samples < 2:
        raise ObjectiveError("objective.grpo.samples must be >= 2: advantages compare completions of one prompt")
    for name in ("prompts_per_step", "max_new_tokens", "iterations"):
        if getattr(opts, name) < 1:
            raise ObjectiveError(f"objective.grpo.{name} must be >= 1, got {getattr(opts, name)}")
    if opts.epsilon <= 0 or opts.kl_beta < 0:
        raise ObjectiveError(f"objective.grpo: epsilon must be > 0 and kl_beta >= 0 (got {opts.epsilon}, {opts.kl_beta})")


class Rollouts:
    """GRPO's batch source: each step samples a group of completions per prompt, scores them and
    packs the trainable ones into micro-batches (state-free: a step's prompts and samples depend
    only on (seed, step), so a resumed run continues exactly)."""

    def __init__(self, run, objective: GRPO):
        from ..infer.generate import stop_ids

        self.run, self.obj, self.opts, self.cfg = run, objective, objective.cfg, run.recipe.train
        params = [p for p in run.model.parameters() if p.requires_grad]
        # the reference policy = the trainable weights as this stage starts (before a checkpoint is loaded)
        self.reference = (params, [p.detach().clone() for p in params]) if self.opts.kl_beta > 0 else None
        self.stops = stop_ids(run.model, run.tokenizer)
        self.pad = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else self.stops[0]
        self.prompt_ids: dict[int, list[int]] = {}
        eval_cfg = run.recipe.eval
        if eval_cfg.task == self.opts.task and eval_cfg.split == self.opts.split:
            run.print_main(f"[tunesmith] note: eval.split={self.opts.split} is also where the GRPO prompts come from; "
                    "measure a held-out split (eval.split=test) to see generalisation")
        run.print_main(f"[tunesmith] GRPO on {objective.task.name}/{self.opts.split} ({len(objective.examples)} prompts) · "
                f"reward {' + '.join(self.opts.reward)} · {self.opts.prompts_per_step} prompts × {self.opts.samples} "
                "samples a step")

    def total_steps(self) -> int:
        return self.cfg.steps

    def state(self, step: int) -> dict:
        return {}

    def restore(self, state: dict, step: int) -> None:
        return None

    def _sample(self, step: int):
        opts, obj, run = self.opts, self.obj, self.run
        picked = prompt_indices(len(obj.examples), opts.prompts_per_step, self.cfg.seed, step)
        for i in picked:
            if i not in self.prompt_ids:
                self.prompt_ids[i] = encode_prompt(run.tokenizer, obj.task, obj.examples[i])
        examples = [obj.examples[i] for i in picked for _ in range(opts.samples)]
        rows = [self.prompt_ids[i] for i in picked for _ in range(opts.samples)]
        completions = sample_completions(run.model, rows, max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
                                         seed=step_seed(self.cfg.seed, step), stops=self.stops, pad=self.pad,
                                         precision=self.cfg.precision)
        return examples, rows, completions, run.tokenizer.batch_decode(completions, skip_special_tokens=True)

    def _score(self, texts, examples):
        try:
            parts = self.obj.rewards.components(texts, examples)
        except RewardError as e:
            raise ObjectiveError(str(e)) from e
        reward = torch.stack(list(parts.values())).sum(0)  # (P·G,)
        passed = parts["task"] if "task" in parts else torch.tensor(
            [float(self.obj.task.score(t, ex).correct) for t, ex in zip(texts, examples)])
        adv = group_advantages(reward.view(-1, self.opts.samples), scale=self.opts.scale_rewards).view(-1)
        return parts, reward, passed, adv

    def _pack(self, rows, completions, adv, keep) -> list[dict]:
        from ..runtime import autocast

        device, opts = self.run.device, self.opts
        samples = [{"input_ids": rows[j] + completions[j],
                    "weights": [0.0] * len(rows[j]) + [1.0] * len(completions[j])} for j in keep]
        plan = plan_batches([len(s["input_ids"]) for s in samples], packing=True, batch_tokens=self.cfg.batch_tokens,
                            batch_size=1, seed=0, epoch=0, shuffle=False)
        micro = []
        for group in plan:
            batch = to_device(collate([samples[k] for k in group], packing=True, pad_id=self.pad), device)
            batch["advantages"] = torch.cat([adv[keep[k]].repeat(len(completions[keep[k]])) for k in group]).to(device)
            batch["state"] = {}
            micro.append(batch)
        if self.reference is not None:
            with torch.no_grad(), swapped_weights(*self.reference), autocast(device, self.cfg.precision):
                for batch in micro:
                    batch["ref_logps"] = token_logps(self.run.model, batch, self.cfg.loss_chunk, opts.temperature)
        return micro

    def window(self, step: int) -> Window:
        opts, t0 = self.opts, time.perf_counter()
        examples, rows, completions, texts = self._sample(step)
        gen_s = time.perf_counter() - t0
        parts, reward, passed, adv = self._score(texts, examples)
        keep = [j for j in range(len(rows)) if opts.kl_beta > 0 or adv[j] != 0]
        total = sum(len(c) for c in completions)  # the loss normaliser: every completion token
        trained = sum(len(completions[j]) for j in keep)
        metrics = {"reward_mean": float(reward.mean()), "reward_std": float(reward.std()),
                   "pass_rate": float((passed == 1).float().mean()),
                   **{f"reward_{k}": float(v.mean()) for k, v in parts.items()},
                   "completion_len": total / len(completions),
                   "truncated": sum(bool(c) and c[-1] not in self.stops for c in completions) / len(completions),
                   "zero_signal_groups": float((adv.view(-1, opts.samples) == 0).all(1).float().mean()),
                   "trained_tokens": trained, "generation_s": gen_s}
        return Window(batches=self._pack(rows, completions, adv, keep), units=total,
                      epoch=step * opts.prompts_per_step // len(self.obj.examples), metrics=metrics, passes=opts.iterations,
                      tokens=sum(len(r) + len(c) for r, c in zip(rows, completions)), metric_units=trained)
