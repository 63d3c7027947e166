"""Run a model on a task: generate, score, summarise, write per-example records.

    result = evaluate(model, tokenizer, get_eval_task("sql"), split="test", limit=100)
    print(format_summary(result))

The summary holds the task's main metric (`accuracy` = share of correct greedy answers, or pass@k
from n samples with the unbiased estimator), the mean partial score, and for text tasks corpus BLEU
and chrF; when examples carry `meta["group"]` (the knowledge task's conditions), `by_group` gives
each group's count and accuracy. `shots=k` puts k training examples before each question as earlier
chat turns: the in-context baseline that fine-tuning is compared against (eval/shots.py: one evaluation per shot
count, `max` = as many as fit the context, a table and a curve).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..data.tasks.base import Example


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message says why."""


@dataclass
class EvalResult:
    task: str
    split: str
    metric: str
    summary: dict
    records: list[dict] = field(default_factory=list)

    @property
    def main(self) -> float:
        return self.summary[self.metric]


def get_eval_task(name: str, metric: str | None = None, seed: int = 0):
    """A built-in task (`sql`, `json`, `humaneval`) or a JSONL task file (with its metric)."""
    if name.endswith(".jsonl"):
        from .files import FileTask

        return FileTask(name, metric or "exact_match")
    if name == "humaneval":
        from .humaneval import HumanEvalTask

        return HumanEvalTask()
    from ..data.tasks import get_task

    return get_task(name, seed=seed)


def build_prompt(task, example: Example, shots: list[Example]):
    """The chat for one question: system prompt, k solved examples as earlier turns, the question."""
    messages = []
    if getattr(task, "system_prompt", None):
        messages.append({"role": "system", "content": task.system_prompt})
    for s in shots:
        messages += [{"role": "user", "content": s.prompt}, {"role": "assistant", "content": s.reference}]
    messages.append({"role": "user", "content": example.prompt})
    return messages


def stop_rule(task, stop: list[str] | None = None, task_stop: bool = True) -> dict:
    """generate()'s stop arguments for `task`: the given `stop` strings, plus (with `task_stop`) the
    task's own rule, its `stop` strings and `answer_end` (data/tasks: a scorer that reads only the
    first line, the first JSON object, the first closed ```sql block... stops there), so generation
    ends where the answer does instead of at max_new_tokens, and no verdict changes."""
    strings = list(stop or ())
    answer_end = None
    if task_stop:
        strings += list(getattr(task, "stop", None) or ())
        answer_end = getattr(task, "answer_end", None)
    return {"stop": strings or None, "answer_end": answer_end}


def evaluate(model, tokenizer, task, *, split: str = "test", limit: int | None = None, shots: int = 0,
             samples: int = 1, temperature: float = 0.0, top_p: float = 1.0, ks: tuple[int, ...] = (1,),
             max_new_tokens: int = 256, batch_size: int = 16, seed: int = 0, progress: bool = True,
             share_prefix: bool = False, stop: list[str] | None = None, task_stop: bool = True) -> EvalResult:
    """Generate answers for a split of `task`, score them and summarise. `share_prefix`: greedy prompts
    with shots prefill their common instruction and demonstrations once (eval/prefix.py). `stop`:
    strings that end an answer; `task_stop=False` turns the task's own stop rule off (see stop_rule).
    generate() batches the prompts longest first (little padding; similar questions end together)
    and returns them in order, so records keep the examples' order."""
    from ..infer.generate import StopRule, generate
    from .metrics import bleu, chrf, chrf_pp, pass_at_k

    if samples > 1 and temperature <= 0:
        raise EvalError(f"{samples} samples per example need sampling: set a temperature > 0")
    if max(ks) > samples:
        raise EvalError(f"pass@{max(ks)} needs at least {max(ks)} samples per example (got samples={samples})")
    examples = task.examples(split)[:limit] if limit else task.examples(split)
    if not examples:
        raise EvalError(f"task {task.name} has no examples in split {split}")
    shot_pool = task.examples("train")[:shots] if shots else []
    if len(shot_pool) < shots:  # fewer demonstrations than asked would mislabel the result
        raise EvalError(f"{shots} shots need as many training examples; task {task.name} has {len(shot_pool)}")
    prompts = [build_prompt(task, ex, shot_pool) for ex in examples]
    stops = stop_rule(task, stop, task_stop)
    t0 = time.perf_counter()
    if share_prefix and shots and samples == 1 and temperature <= 0:
        from .prefix import generate_greedy

        # this path generates to eos; the same cut keeps its answers equal to generate()'s
        rule = StopRule(**stops)
        outputs = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        outputs = [o if (c := rule.cut(o)) is None else o[:c] for o in outputs]
    else:
        outputs = generate(model, tokenizer, [p for p in prompts for _ in range(samples)],
                           max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                           batch_size=batch_size, **stops)
    gen_s = time.perf_counter() - t0
    records, n_correct, partial = [], [], []
    for i, ex in enumerate(examples):
        outs = outputs[i * samples:(i + 1) * samples]
        verdicts = [task.score(o, ex) for o in outs]
        n_correct.append(sum(v.correct for v in verdicts))
        partial.append(verdicts[0].score)
        records.append({
            "id": ex.id, "prompt": ex.prompt, "prediction": outs[0], "reference": ex.reference,
            "correct": verdicts[0].correct, "score": verdicts[0].score, "error": verdicts[0].error,
            "extracted": verdicts[0].extracted,
            **({"samples": [{"prediction": o, "correct": v.correct} for o, v in zip(outs, verdicts)]}
               if samples > 1 else {}),
        })
    summary = {"examples": len(examples), "accuracy": sum(r["correct"] for r in records) / len(records),
               "mean_score": sum(partial) / len(partial), "generation_s": gen_s, "shots": shots}
    if any("group" in ex.meta for ex in examples):
        summary["by_group"] = by_group(examples, records)
    if samples > 1:
        for k in ks:
            summary[f"pass@{k}"] = sum(pass_at_k(samples, c, k) for c in n_correct) / len(examples)
    if task.metric in ("bleu", "chrf", "chrf++"):
        # A task that extracts its answer (translation: the first line) is scored on what it extracted.
        preds = [r["extracted"] if r["extracted"] is not None else r["prediction"].strip() for r in records]
        refs = [r["reference"] for r in records]
        summary["bleu"], summary["chrf"], summary["chrf++"] = bleu(preds, refs), chrf(preds, refs), chrf_pp(preds, refs)
    metric = task.metric if task.metric in summary else ("pass@1" if "pass@1" in summary else "accuracy")
    return EvalResult(task.name, split, metric, summary, records)


def by_group(examples: list[Example], records: list[dict]) -> dict:
    """Accuracy per `meta["group"]` (e.g. the knowledge task's conditions), groups in first-seen order."""
    groups: dict[str, list[bool]] = {}
    for ex, r in zip(examples, records):
        groups.setdefault(str(ex.meta.get("group", "-")), []).append(r["correct"])
    return {g: {"examples": len(c), "accuracy": sum(c) / len(c)} for g, c in groups.items()}


def save_result(result: EvalResult, path: str | Path, **context) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"task": result.task, "split": result.split, "metric": result.metric, **context,
               "summary": result.summary, "records": result.records}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
    return path


def format_summary(result: EvalResult) -> str:
    rows = [("task", f"{result.task} ({result.split})"), ("examples", str(result.summary["examples"]))]
    for key, value in result.summary.items():
        if key in ("examples", "by_group"):
            continue
        if key in ("accuracy", "mean_score") or key.startswith("pass@"):
            rows.append((key, f"{100 * value:.1f}%"))
        elif isinstance(value, float):
            rows.append((key, f"{value:.2f}"))
        else:
            rows.append((key, str(value)))
    if result.summary.get("by_group"):
        rows.append(("by group", "accuracy"))
    for group, g in result.summary.get("by_group", {}).items():
        rows.append((f"  {group}", f"{100 * g['accuracy']:.1f}%  ({g['examples']} examples)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
