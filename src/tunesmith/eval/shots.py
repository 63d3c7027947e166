"""Evaluation at several shot counts: a model's in-context learning curve on a task.

    counts = parse_shots("0,1,4,16,64,max")
    curve = evaluate_shots(model, tokenizer, task, counts, split="test", limit=100)
    print(format_shot_table(curve))
    plot_shot_curves({"base": curve}, "shots.png")

Shot count k puts the first k training examples before each question as earlier chat turns (the
runner's `evaluate(shots=k)`), so the demonstrations at k=4 are the first four of k=16: along the
curve only the number of demonstrations changes, never which ones. `max` is as many as fit: the
largest k for which every evaluated prompt plus `max_new_tokens` fits in the model's context
(`context`, by default the model's `max_position_embeddings`), capped by the training examples
the task has. ManyICL (objectives/many_icl.py) trains for exactly this curve, so its benchmark and
`tunesmith eval --shots 0,1,4,16,64,max` measure the same thing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .runner import EvalError, EvalResult, build_prompt, evaluate

MAX = "max"


def parse_shots(text: str | int | list) -> list[int | str]:
    """Shot counts from `0,1,4,16,64,max` (or one count): whole numbers >= 0 and `max`, in order,
    repeats dropped. Raises EvalError naming the bad item."""
    items = text if isinstance(text, list) else str(text).split(",")
    counts: list[int | str] = []
    for item in items:
        item = str(item).strip().lower()
        if item == MAX:
            value: int | str = MAX
        elif item.isdigit():
            value = int(item)
        else:
            raise EvalError(f"--shots: expected whole numbers >= 0 or `max` separated by commas, got {item!r}")
        if value not in counts:
            counts.append(value)
    if not counts:
        raise EvalError("--shots: give at least one shot count, e.g. 0,1,4,16,max")
    return counts


def context_length(model, context: int | None = None) -> int:
    """The tokens a prompt and its answer may take: `context` if given, else the model's trained
    context (`max_position_embeddings`)."""
    if context is not None:
        if context < 1:
            raise EvalError(f"--context must be >= 1 token, got {context}")
        return context
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(n, int) or n < 1:
        raise EvalError("the model does not say its context length (max_position_embeddings): give --context N")
    return n


def prompt_tokens(tokenizer, task, examples, pool, k: int) -> list[int]:
    """Tokens of each question's prompt with the first k demonstrations, as generation encodes it."""
    from ..infer.generate import render_prompt

    templated = getattr(tokenizer, "chat_template", None) is not None
    texts = [render_prompt(tokenizer, build_prompt(task, ex, pool[:k])) for ex in examples]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=not templated)["input_ids"]]


def max_shots(tokenizer, task, examples, pool, *, context: int, max_new_tokens: int) -> int:
    """The largest k <= len(pool) for which every prompt plus `max_new_tokens` fits in `context`.

    Prompt length grows with k, so a binary search over k on the longest question finds the
    candidate; the check over all questions guards against a tokenizer merging across turns."""
    budget = context - max_new_tokens
    lengths = prompt_tokens(tokenizer, task, examples, pool, 0)
    if max(lengths) > budget:
        raise EvalError(f"the longest prompt takes {max(lengths)} tokens without any shots: with max_new_tokens="
                        f"{max_new_tokens} it does not fit a context of {context}")
    longest = [examples[max(range(len(lengths)), key=lengths.__getitem__)]]
    lo, hi = 0, len(pool)  # invariant: lo fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if prompt_tokens(tokenizer, task, longest, pool, mid)[0] <= budget:
            lo = mid
        else:
            hi = mid - 1
    while lo > 0 and max(prompt_tokens(tokenizer, task, examples, pool, lo)) > budget:
        lo -= 1
    return lo


@dataclass
class ShotCurve:
    """One evaluation per shot count (ascending), with what `max` resolved to."""

    task: str
    split: str
    metric: str
    results: list[EvalResult]
    context: int
    max_shots: int | None = None
    "What `max` meant here (None: not asked for)."

    def points(self, key: str | None = None) -> list[tuple[int, float]]:
        """(shots, value) of the main metric (or `key` of the summary) at each count."""
        return [(r.summary["shots"], r.summary[key or self.metric]) for r in self.results]

    def label(self, shots: int) -> str:
        return f"max={shots}" if shots == self.max_shots else str(shots)


def evaluate_shots(model, tokenizer, task, counts, *, split: str = "test", limit: int | None = None,
                   context: int | None = None, max_new_tokens: int = 256, progress: bool = True,
                   share_prefix: bool = True, **evaluate_kw) -> ShotCurve:
    """Evaluate `task` once per shot count in `counts` (ints and/or `max`); `evaluate_kw` go to
    `evaluate` (samples, temperature, batch_size, seed...). Each summary gains `prompt_tokens`
    (the mean prompt length) so the cost of a point is visible beside its score. `share_prefix`:
    greedy decoding prefills the demonstrations, common to every prompt, once (eval/prefix.py)."""
    counts = parse_shots(counts)
    examples = task.examples(split)[:limit] if limit else task.examples(split)
    if not examples:
        raise EvalError(f"task {task.name} has no examples in split {split}")
    pool = task.examples("train")
    asked = [k for k in counts if k != MAX]
    if asked and max(asked) > len(pool):
        raise EvalError(f"{max(asked)} shots need as many training examples; task {task.name} has {len(pool)}")
    n_ctx = context_length(model, context)
    top = max_shots(tokenizer, task, examples, pool, context=n_ctx, max_new_tokens=max_new_tokens) \
        if MAX in counts else None
    if asked:
        longest = max(prompt_tokens(tokenizer, task, examples, pool, max(asked)))
        if longest + max_new_tokens > n_ctx:
            raise EvalError(f"{max(asked)} shots make prompts of up to {longest} tokens: with max_new_tokens="
                            f"{max_new_tokens} they exceed the context of {n_ctx} (use `max`, or fewer shots)")
    results = []
    for k in sorted({top if k == MAX else k for k in counts}):
        if progress:
            print(f"[tunesmith] eval {task.name} ({split}) with {k} shots", flush=True)
        result = evaluate(model, tokenizer, task, split=split, limit=limit, shots=k, max_new_tokens=max_new_tokens,
                          progress=progress, share_prefix=share_prefix, **evaluate_kw)
        lengths = prompt_tokens(tokenizer, task, examples, pool, k)
        result.summary["prompt_tokens"] = sum(lengths) / len(lengths)
        results.append(result)
    return ShotCurve(task.name, split, results[0].metric, results, n_ctx, top)


def format_shot_table(curve: ShotCurve) -> str:
    """A markdown table: one row per shot count with the main metric, mean score, prompt length, time."""
    percent = curve.metric in ("accuracy", "mean_score") or curve.metric.startswith("pass@")
    head = f"| shots | examples | {curve.metric} | mean score | prompt tokens | generation s |\n|---|---|---|---|---|---|"
    rows = []
    for r in curve.results:
        s = r.summary
        main = f"{100 * s[curve.metric]:.1f}%" if percent else f"{s[curve.metric]:.2f}"
        rows.append(f"| {curve.label(s['shots'])} | {s['examples']} | {main} | {100 * s['mean_score']:.1f}% | "
                    f"{s['prompt_tokens']:.0f} | {s['generation_s']:.1f} |")
    return "\n".join([head, *rows])


def plot_shot_curves(curves: dict[str, ShotCurve], path: str | Path, key: str | None = None) -> bool:
    """The main metric (or `key`) against the shot count, one marked line per named curve, on a
    symlog x axis (0 stays visible, 1/4/16/64 spread evenly). False when nothing was drawn."""
    from ..plots import plot_curves

    first = next(iter(curves.values()))
    metric = key or first.metric
    percent = metric in ("accuracy", "mean_score") or metric.startswith("pass@")
    points = {name: [(k, 100 * v if percent else v) for k, v in c.points(metric)] for name, c in curves.items()}
    return plot_curves({}, Path(path), f"{metric} (%)" if percent else metric, points=points, xlabel="shots",
                       xscale="symlog", title=f"{first.task} ({first.split})")


def save_shots(curve: ShotCurve, path: str | Path, **context) -> Path:
    """Every shot count's summary and per-example records in one JSON file (written aside, renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"task": curve.task, "split": curve.split, "metric": curve.metric, "context": curve.context,
               "max_shots": curve.max_shots, **context,
               "results": [{"shots": r.summary["shots"], "summary": r.summary, "records": r.records}
                           for r in curve.results]}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
    return path


def load_shots(path: str | Path) -> ShotCurve:
    """A curve saved by `save_shots` (to plot several runs together without evaluating again)."""
    data = json.loads(Path(path).read_text())
    results = [EvalResult(data["task"], data["split"], data["metric"], r["summary"], r["records"])
               for r in data["results"]]
    return ShotCurve(data["task"], data["split"], data["metric"], results, data["context"], data.get("max_shots"))
