"""LiST-style self-training: a few labelled examples and an unlabelled pool make a classifier adapter.

    stats = self_train(SelfTrainConfig(task="intent", labelled=16, pool=256, rounds=2), "out/")

1. Teacher: a LoRA adapter trained on the K labelled examples, prompt-based (the task's instruction
   and the question in, the label word out: the answer the model would write anyway).
2. Pseudo-labels: the teacher scores every label of the closed label set on every pool question —
   the log-probability of the label's answer tokens (label + end of turn, exactly as SFT trains them),
   one forward pass, no sampling. The pseudo-label is the best label (the greedy answer, restricted
   to the label set), its confidence the softmax of these scores over the label set (an exact
   distribution over the possible answers, where sampling would only estimate it).
3. Student: a new LoRA adapter on the frozen base, trained on the labelled examples plus the
   pseudo-labelled pool, each pseudo-labelled record carrying `weight` = `pseudo_weights(...)`.
4. The student is the next round's teacher; R rounds. The base model is never written: only the
   adapters train.

Re-weighting, and how it differs from the paper. LiST (Wang et al., 2021) meta-learns a weight for
every pseudo-labelled example: a look-ahead step on the pseudo-labelled batch, then the weights that
most reduce the loss on the labelled set (learning to re-weight). Here the weighting is fixed and
simpler: a pseudo-label's weight is its confidence, zero below `threshold`, and with `balance` each
predicted class's total weight is scaled to the mean class total (at most `max_weight` times), so a
teacher that over-predicts one label cannot make the student learn that label only. The labelled
set is used as training data, not as the meta-objective. LiST's students also warm up by distilling
the teacher's soft labels; here each student is trained on hard pseudo-labels, as a fresh adapter
or (`warm_start`) continuing its teacher's.

Outputs in `out/`: `labelled.jsonl` (the teacher's training records), `round-<r>/pseudo.jsonl` (one
record per pool question: the teacher, the label, the confidence, every label's probability and
log-probability, the weight, and the hidden gold label for diagnosis — never trained on),
`round-<r>/train.jsonl` (the student's weighted records), the training runs under `runs/`, and
`stats.json` (per-round validation accuracy, pseudo-label accuracy, timings).
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..jsonl import write_json, write_jsonl


class SelfTrainError(ValueError):
    """A self-training run that cannot start as asked; the message says why."""


@dataclass
class SelfTrainConfig:
    task: str = "intent"
    "A built-in classification task (it has `labels`): the labelled set and the pool come from its train split."
    labelled: int = 16
    "K: the first K training examples keep their labels (a class-balanced prefix for `intent`)."
    pool: int = 256
    "N: the next N training examples, labels hidden, are the unlabelled pool."
    rounds: int = 2
    "Self-training rounds (pseudo-label, train a student); the student is the next teacher."
    threshold: float = 0.0
    "Pseudo-labels with a confidence below this get weight 0 (dropped)."
    balance: bool = True
    "Scale each predicted class's total weight to the mean class total."
    max_weight: float = 3.0
    "The most a class's weights are scaled up by `balance`."
    labelled_weight: float = 1.0
    "Weight of each gold-labelled record in the student's data."
    warm_start: bool = False
    "Each student continues its teacher's adapter (else a fresh adapter on the frozen base)."
    teacher_steps: int = 40
    student_steps: int = 80
    lr: float = 1e-3
    rank: int = 8
    batch_tokens: int = 512
    validation: int = 40
    "Validation examples scored after every training (per-round accuracy)."
    score_batch: int = 16
    "Questions scored together when pseudo-labelling."
    seed: int = 0
    recipe: str | None = None
    "A training recipe to start from (default: tunesmith's defaults with the settings above)."
    overrides: list[str] = field(default_factory=list)
    "`a.b=c` recipe overrides applied last (they win over the settings above)."


# --------------------------------------------------------------------------------------------------
# label scoring


def chat(task, question: str, answer: str | None = None, demos: Sequence[tuple[str, str]] = ()) -> list[dict]:
    """The chat a task question is asked (and, with `answer`, answered) in; `demos`, (question, answer)
    pairs, go before it as earlier turns (in-context examples, as `eval.runner.build_prompt` puts them)."""
    system = [{"role": "system", "content": task.system_prompt}] if getattr(task, "system_prompt", None) else []
    shots = [{"role": r, "content": c} for q, a in demos for r, c in (("user", q), ("assistant", a))]
    reply = [] if answer is None else [{"role": "assistant", "content": answer}]
    return system + shots + [{"role": "user", "content": question}] + reply


def answer_rows(renderer, messages: list[dict], labels: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, each label's answer ids): the chat rendered with each label as the answer, split
    where the trained tokens (the label and its end-of-turn token) begin."""
    prompt, answers = None, []
    for label in labels:
        s = renderer.chat(messages + [{"role": "assistant", "content": label}])
        first = next(t for t, w in enumerate(s["weights"]) if w > 0)
        last = max(t for t, w in enumerate(s["weights"]) if w > 0)
        if prompt is None:
            prompt = s["input_ids"][:first]
        elif s["input_ids"][:first] != prompt:
            raise SelfTrainError(f"the chat template renders the question differently before the label {label!r}")
        answers.append(s["input_ids"][first:last + 1])
    return prompt, answers


def _forward(model, ids, past, attention, positions):
    """Last hidden states (B, T, d) and the grown cache, continuing `past`."""
    from ..eval.prefix import CACHE_ARG  # `cache` in newer transformers, `past_key_values` before

    body = getattr(model, model.base_model_prefix)
    out = body(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, **{CACHE_ARG: past})
    return out.last_hidden_state, getattr(out, CACHE_ARG)


def _expanded(cache, times: int):
    past = copy.deepcopy(cache)
    past.batch_repeat_interleave(times)
    return past


def _right_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def _score_batch(model, prefix_cache, p: int, suffixes: list[list[int]], answers: list[list[list[int]]],
                 pad: int) -> torch.Tensor:
    """(B, L) label log-probabilities of a batch of questions that continue a cached prefix of length p:
    the questions run once, then every label continues a copy of each question's cache."""
    head, device = model.get_output_embeddings(), next(model.parameters()).device
    b, n_labels = len(suffixes), len(answers[0])
    ids, mask = _right_pad(suffixes, pad)
    lens = mask.sum(1)
    attention = torch.cat([torch.ones(b, p, dtype=torch.long), mask], 1)
    past = _expanded(prefix_cache, b) if prefix_cache is not None else None
    positions = (p + torch.arange(ids.shape[1])).expand(b, -1)
    h, cache = _forward(model, ids.to(device), past, attention.to(device), positions.to(device))
    first = torch.log_softmax(head(h[torch.arange(b), lens - 1]).float(), -1)  # (B, V): the label's first token
    rows = [a for per in answers for a in per]  # question-major: (q0, l0), (q0, l1), ...
    aids, amask = _right_pad(rows, pad)
    attention = torch.cat([attention.repeat_interleave(n_labels, 0), amask], 1)
    positions = p + lens.repeat_interleave(n_labels)[:, None] + torch.arange(aids.shape[1])[None]
    cache.batch_repeat_interleave(n_labels)
    h, _ = _forward(model, aids.to(device), cache, attention.to(device), positions.to(device))
    logp = torch.log_softmax(head(h[:, :-1]).float(), -1) if aids.shape[1] > 1 else None
    out = torch.zeros(b * n_labels)
    for r, a in enumerate(rows):
        total = first[r // n_labels, a[0]]
        if len(a) > 1:
            total = total + logp[r, torch.arange(len(a) - 1), torch.tensor(a[1:])].sum()
        out[r] = total
    return out.view(b, n_labels)


@torch.inference_mode()
def label_logprobs(model, tokenizer, task, questions: Sequence[str], labels: Sequence[str], *,
                   demos: Sequence[tuple[str, str]] = (), batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """(N, L): log P(label's answer tokens | question) under `model`, for every question and label
    (after the in-context `demos`, if any).

    The prefix shared by every question (system prompt, chat header) is computed once; each batch of
    questions continues a copy of it, and each label a copy of its question's cache."""
    from ..data.render import Renderer
    from ..eval.prefix import shared_prefix

    renderer = Renderer(tokenizer, assistant_turns="last")
    rendered = [answer_rows(renderer, chat(task, q, demos=demos), labels) for q in questions]
    p = shared_prefix([prompt for prompt, _ in rendered]) if len(rendered) > 1 else len(rendered[0][0]) - 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        prefix_cache = None
        if p > 0:
            _, prefix_cache = _forward(model, torch.tensor([rendered[0][0][:p]], device=device), None, None,
                                       torch.arange(p, device=device)[None])
        out = []
        for start in tqdm(range(0, len(rendered), batch_size), desc="scoring labels", unit=" batches",
                          disable=not progress):
            chunk = rendered[start:start + batch_size]
            out.append(_score_batch(model, prefix_cache, p, [prompt[p:] for prompt, _ in chunk],
                                    [answers for _, answers in chunk], pad))
    finally:
        model.train(was_training)
    return torch.cat(out)


def confidences(logprobs: torch.Tensor) -> torch.Tensor:
    """Each row's label distribution: the softmax of the label log-probabilities."""
    return torch.softmax(logprobs.double(), -1).float()


# --------------------------------------------------------------------------------------------------
# weighting


def pseudo_weights(confidence: Sequence[float], predicted: Sequence[str], *, threshold: float = 0.0,
                   balance: bool = True, max_weight: float = 3.0) -> list[float]:
    """A weight per pseudo-label: its confidence, 0 below `threshold`; with `balance`, each predicted
    class's weights are scaled so its total becomes the mean total of the classes present, by a
    factor of at most `max_weight` (a class predicted once is not blown up to dominate)."""
    weights = [float(c) if c >= threshold else 0.0 for c in confidence]
    if not balance:
        return weights
    totals: dict[str, float] = {}
    for w, label in zip(weights, predicted):
        totals[label] = totals.get(label, 0.0) + w
    present = {k: t for k, t in totals.items() if t > 0}
    if not present:
        return weights
    mean = sum(present.values()) / len(present)
    return [w * min(max_weight, mean / present[label]) if w > 0 else 0.0 for w, label in zip(weights, predicted)]


# --------------------------------------------------------------------------------------------------
# the loop




def _record(task, example, label: str, weight: float | None = None) -> dict:
    row = {"messages": chat(task, example.prompt, label), "id": example.id}
    return row if weight is None else {**row, "weight": round(weight, 6)}


def train_adapter(cfg: SelfTrainConfig, records: list[dict], folder: Path, model_name: str, steps: int,
                  start: str | None = None):
    """Train a LoRA adapter on `records` through the normal harness, fresh or continuing the adapter
    `start`; (adapter folder, seconds)."""
    from ..recipe import load_recipe
    from ..train.loop import train

    data = write_jsonl(folder / "train.jsonl", records)
    overrides = [f"model.name={model_name}", f"data.train={data}", f"output_dir={folder.parent / 'runs'}",
                 f"name={folder.name}", "data.val_fraction=0", f"train.steps={steps}", f"train.lr={cfg.lr}",
                 f"train.batch_tokens={cfg.batch_tokens}", "train.precision=fp32", "train.warmup=0.1",
                 "train.save_every=0", f"train.seed={cfg.seed}", "method.name=lora",
                 f"method.lora.rank={cfg.rank}", f"method.lora.alpha={2 * cfg.rank}",
                 *([f"model.adapter={start}"] if start else []), *cfg.overrides]
    t0 = time.perf_counter()
    result = train(load_recipe(cfg.recipe, overrides))
    if result.output is None:
        raise SelfTrainError(f"training {folder.name} did not complete ({result.status})")
    return result.output, time.perf_counter() - t0


def label_accuracy(model, tok, task, examples, labels, *, demos=(), batch_size: int = 16,
                   progress: bool = True) -> float:
    """Share of `examples` whose best-scored label is the gold one: closed-set classification by the
    label words' log-probabilities (how prompt-based fine-tuning classifies), no generation."""
    lp = label_logprobs(model, tok, task, [e.prompt for e in examples], labels, demos=demos, batch_size=batch_size,
                        progress=progress)
    return sum(labels[i] == e.reference for i, e in zip(lp.argmax(-1).tolist(), examples)) / len(examples)


def _accuracy(model, tok, task, examples, labels, cfg: SelfTrainConfig, progress: bool) -> float:
    return label_accuracy(model, tok, task, examples, labels, batch_size=cfg.score_batch, progress=progress)


def pseudo_label(model, tok, task, pool, labels, cfg: SelfTrainConfig, teacher: str, round_: int,
                 progress: bool) -> list[dict]:
    """One provenance record per pool question: the teacher's label, confidence, scores and weight."""
    lp = label_logprobs(model, tok, task, [e.prompt for e in pool], labels, batch_size=cfg.score_batch,
                        progress=progress)
    conf = confidences(lp)
    best = conf.argmax(-1).tolist()
    predicted = [labels[i] for i in best]
    weights = pseudo_weights([conf[k, i].item() for k, i in enumerate(best)], predicted,
                             threshold=cfg.threshold, balance=cfg.balance, max_weight=cfg.max_weight)
    return [{"id": e.id, "question": e.prompt, "label": predicted[k], "confidence": round(conf[k, best[k]].item(), 6),
             "probs": {lab: round(conf[k, j].item(), 6) for j, lab in enumerate(labels)},
             "logprobs": {lab: round(lp[k, j].item(), 4) for j, lab in enumerate(labels)},
             "weight": round(weights[k], 6), "teacher": teacher, "round": round_, "gold": e.reference}
            for k, e in enumerate(pool)]


def _setup(cfg: SelfTrainConfig):
    """(task, labels, labelled examples, pool examples, validation examples), checked."""
    from ..eval.runner import get_eval_task

    if cfg.rounds < 1 or cfg.labelled < 1 or cfg.pool < 1:
        raise SelfTrainError("self-training needs labelled >= 1, pool >= 1 and rounds >= 1")
    if not 0 <= cfg.threshold <= 1 or cfg.max_weight < 1 or cfg.labelled_weight < 0:
        raise SelfTrainError("threshold must be in [0, 1], max_weight >= 1 and labelled_weight >= 0")
    try:
        task = get_eval_task(cfg.task, seed=cfg.seed)
    except ValueError as e:
        raise SelfTrainError(str(e)) from None
    labels = list(getattr(task, "labels", None) or [])
    if not labels:
        raise SelfTrainError(f"task {cfg.task} has no label set (`labels`); self-training needs a classification "
                             "task such as intent")
    train_ex = task.examples("train")
    if cfg.labelled + cfg.pool > len(train_ex):
        raise SelfTrainError(f"labelled {cfg.labelled} + pool {cfg.pool} exceed the {len(train_ex)} training "
                             f"examples of {cfg.task}")
    val = task.examples("validation")[:cfg.validation]
    return task, labels, train_ex[:cfg.labelled], train_ex[cfg.labelled:cfg.labelled + cfg.pool], val


def self_train(cfg: SelfTrainConfig, out_dir: str | Path, model_name: str | None = None,
               teacher_adapter: str | None = None, dtype: str = "fp32", progress: bool = True) -> dict:
    """Run LiST-style self-training (module docstring) into `out_dir`; returns the stats it writes.
    `teacher_adapter`: an adapter already trained on the labelled set (the teacher round is skipped);
    `dtype`: of the model that scores labels (training follows the recipe)."""
    from ..infer.generate import load_for_inference
    from ..models.load import DEFAULT_MODEL

    task, labels, labelled, pool, val = _setup(cfg)
    out = Path(out_dir)
    if (out / "stats.json").exists() or (out / "runs").exists():
        raise SelfTrainError(f"{out} already holds a self-training run; choose another output folder")
    model_name = model_name or DEFAULT_MODEL
    gold = [_record(task, e, e.reference) for e in labelled]
    write_jsonl(out / "labelled.jsonl", gold)
    train_s, label_s, rounds = 0.0, 0.0, []
    teacher, teacher_s = teacher_adapter, None
    if teacher is None:
        teacher, teacher_s = train_adapter(cfg, gold, out / "teacher", model_name, cfg.teacher_steps)
        train_s += teacher_s
    model, tok = load_for_inference(model_name, str(teacher), dtype=dtype)
    accuracy = [_accuracy(model, tok, task, val, labels, cfg, progress)] if val else []
    for r in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        pseudo = pseudo_label(model, tok, task, pool, labels, cfg, str(teacher), r, progress)
        label_s += time.perf_counter() - t0
        write_jsonl(out / f"round-{r}" / "pseudo.jsonl", pseudo)
        records = [{**g, "weight": cfg.labelled_weight} for g in gold]
        records += [{"messages": chat(task, p["question"], p["label"]), "id": p["id"], "weight": p["weight"]}
                    for p in pseudo if p["weight"] > 0]
        del model
        teacher, seconds = train_adapter(cfg, records, out / f"round-{r}", model_name, cfg.student_steps,
                                         str(teacher) if cfg.warm_start else None)
        train_s += seconds
        model, tok = load_for_inference(model_name, str(teacher), dtype=dtype)
        if val:
            accuracy.append(_accuracy(model, tok, task, val, labels, cfg, progress))
        rounds.append(_round_stats(r, pseudo, labels, seconds, accuracy[-1] if val else None))
    stats = {"method": "list-self-train", "task": cfg.task, "model": model_name, "generated": len(pool) * cfg.rounds,
             "kept": sum(x["kept"] for x in rounds), "dropped": {"below_threshold": sum(x["dropped"] for x in rounds)},
             "generation_s": label_s, "samples_per_s": len(pool) * cfg.rounds / max(label_s, 1e-9),
             "train_s": train_s, "teacher_train_s": teacher_s, "val_accuracy": accuracy,
             "val_examples": len(val), "student": str(teacher),
             "rounds": rounds, "config": asdict(cfg)}
    write_json(out / "stats.json", stats)
    return stats


def _round_stats(r: int, pseudo: list[dict], labels: list[str], train_s: float, val_accuracy) -> dict:
    kept = [p for p in pseudo if p["weight"] > 0]
    return {"round": r, "kept": len(kept), "dropped": len(pseudo) - len(kept),
            "pseudo_label_accuracy": sum(p["label"] == p["gold"] for p in pseudo) / len(pseudo),
            "kept_accuracy": sum(p["label"] == p["gold"] for p in kept) / len(kept) if kept else None,
            "mean_confidence": sum(p["confidence"] for p in pseudo) / len(pseudo),
            "predicted": {lab: sum(p["label"] == lab for p in pseudo) for lab in labels},
            "student_train_s": train_s, "student_val_accuracy": val_accuracy}
