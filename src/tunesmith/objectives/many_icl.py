"""Many-shot in-context fine-tuning (ManyICL; He, Peng, Jiang, Go, 2025; methods.md §6).

A training sequence is the task's instruction followed by k demonstrations (x_1, y_1) ... (x_k, y_k)
from its training set, as chat turns — exactly the prompt `tunesmith eval --shots k` builds — and
every answer in it trains, not only the last; the instruction and the inputs are masked:

    L = −Σ_{i=1..k} Σ_t log p(y_{i,t} | instr, x_1, y_1, ..., x_i, y_{i,<t})

so one sequence gives k supervised examples, at shot counts 0 ... k−1. In the harness's protocol the
loss sum is that double sum over a micro-batch's sequences and its units are the answer tokens (each
answer's turn terminator included, as in SFT); the harness divides by the units of the whole
accumulation window. The loss is SFT's weighted token loss; what ManyICL changes is the data:

- records are one question and one answer each (chat or instruction format); the instruction is
  their system message (or `data.system_prompt`), and records with different instructions or
  domains never share a sequence;
- each pass over the data (`many_icl.repeats` of them) shuffles every group's examples from the seed
  and the pass number, then cuts the order into sequences of as many demonstrations as fit
  `data.max_length` (or `many_icl.shots`), so each example appears once per pass, at a new
  position after new demonstrations;
- `data.assistant_turns=last` trains only each sequence's final answer: the plain many-shot
  fine-tuning baseline whose inefficiency ManyICL removes.

    objective:
      name: many_icl
      many_icl: {shots: null, repeats: 2}
    data: {train: task:sql/train, max_length: 2048}
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from pydantic import Field

from ..config import Config
from .base import ObjectiveError
from .sft import SFT


class ManyICLConfig(Config):
    shots: int | None = Field(None, gt=0)
    "Most demonstrations in one training sequence (null: as many as fit data.max_length)."
    repeats: int = Field(1, gt=0)
    "Passes over the training examples, each shuffled into new sequences: every example is seen this many times, at different positions and after different demonstrations."


@dataclass
class Demo:
    """One training example as a demonstration: its question and answer, and where it came from."""

    user: str
    answer: str
    where: str
    tokens: int = 0
    "What the turn pair adds to a rendered sequence (measured once; the sequence is checked exactly)."


def demos_of(records, cfg) -> dict[tuple, list[Demo]]:
    """The records as demonstrations grouped by (domain, instruction): a sequence draws from one group.
    Raises ObjectiveError naming the record that is not one question and one answer."""
    from ..data.formats import detect_format, to_example

    fmt = detect_format(records[0], cfg)
    if fmt not in ("chat", "instruction"):
        raise ObjectiveError(f"many_icl builds sequences of questions and answers; {records[0].where} is "
                             f"{fmt} data (give chat or instruction records)")
    groups: dict[tuple, list[Demo]] = {}
    for record in records:
        messages = to_example(record, fmt, cfg)
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        turns = messages[1:] if system is not None else messages
        if [m["role"] for m in turns] != ["user", "assistant"] or any(m.get("tool_calls") for m in turns):
            raise ObjectiveError(f"{record.where}: many_icl needs one user question and one assistant answer per "
                                 f"record (an optional system message first), got roles "
                                 f"{[m['role'] for m in messages]}")
        if not turns[1]["content"].strip():
            raise ObjectiveError(f"{record.where}: the answer is empty: nothing to train")
        groups.setdefault((record.fields.get("domain"), system), []).append(
            Demo(turns[0]["content"], turns[1]["content"], record.where))
    return groups


def sequence_messages(system: str | None, demos: list[Demo]) -> list[dict]:
    """The chat of one sequence: the instruction, then each demonstration as a user and an assistant turn
    (what `eval.runner.build_prompt` puts before a question)."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    for d in demos:
        messages += [{"role": "user", "content": d.user}, {"role": "assistant", "content": d.answer}]
    return messages


def _measure(renderer, system, demos: list[Demo]) -> int:
    """Tokens the instruction (and whatever the template writes around the turns) takes; each demo's
    `tokens` set to what its turn pair adds, measured as a second copy of it, so a template that
    writes a default system prompt, or a BOS, counts it once."""
    tokenizer = renderer.tokenizer

    def n_tokens(chosen):
        text = tokenizer.apply_chat_template(sequence_messages(system, chosen), chat_template=renderer.template,
                                             tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    for d in demos:
        d.tokens = n_tokens([d, d]) - n_tokens([d])
    return n_tokens(demos[:1]) - demos[0].tokens


def build_sequences(groups, renderer, *, max_length: int, shots: int | None, repeats: int, seed: int,
                    domains: dict | None = None):
    """(samples, the demonstrations of each sample in order, where the records too long for a sequence of
    their own are).

    Each pass shuffles a group with `Random(seed, pass, group)` and fills sequences greedily; the
    rendered sequence is checked against `max_length` and shortened if the per-demo estimate was low."""
    samples, sequences, too_long = [], [], []
    for g, ((domain, system), demos) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        base = _measure(renderer, system, demos)
        fitting = [d for d in demos if base + d.tokens <= max_length]
        too_long += [d.where for d in demos if base + d.tokens > max_length]
        for r in range(repeats):
            order = list(fitting)
            random.Random(f"tunesmith-many-icl:{seed}:{r}:{g}").shuffle(order)
            i = 0
            while i < len(order):
                chosen, used = [], base
                while i + len(chosen) < len(order) and used + order[i + len(chosen)].tokens <= max_length \
                        and (shots is None or len(chosen) < shots):
                    used += order[i + len(chosen)].tokens
                    chosen.append(order[i + len(chosen)])
                sample, k = _render_fitting(renderer, system, chosen, max_length)
                i += k
                if domains:
                    sample["domain"] = domains[domain]
                samples.append(sample)
                sequences.append(chosen[:k])
    return samples, sequences, too_long


def _render_fitting(renderer, system, chosen: list[Demo], max_length: int):
    """(sample, k): the sequence of the first k of `chosen` (k as large as fits), rendered and masked."""
    for k in range(len(chosen), 0, -1):
        sample = renderer.chat(sequence_messages(system, chosen[:k]))
        if len(sample["input_ids"]) <= max_length:
            return sample, k
    raise ObjectiveError(f"{chosen[0].where}: one demonstration with its instruction does not fit "
                         f"data.max_length={max_length}")  # unreachable when the estimate is exact


def load_many_shot(cfg, options, tokenizer, seed: int = 0, report: bool = True):
    """The recipe's data as many-shot sequences: DataSplits whose samples are whole sequences, and
    whose stats say how many sequences, demonstrations per sequence, and which records were too long."""
    from ..data.load import DataSplits, domain_names, read_splits, split_stats
    from ..data.render import Renderer
    from ..data.shards import is_shard_folder

    if cfg.train_on_prompt:
        raise ObjectiveError("many_icl trains the answers only (the instruction and inputs are masked): "
                             "set data.train_on_prompt=false")
    if cfg.mix or is_shard_folder(cfg.train):
        raise ObjectiveError("many_icl builds its sequences from records: give data.train as records (a file, "
                             "task:NAME/train, or a+b, whose sources never share a sequence), not data.mix or shards")
    records, val_records, val_name = read_splits(cfg, seed)
    domains = domain_names(records + (val_records or []))
    index = {name: k for k, name in enumerate(domains)}
    renderer = Renderer(tokenizer, train_on_prompt=False, assistant_turns=cfg.assistant_turns)
    stats, splits = {}, {}
    for split, rows, name in (("train", records, cfg.train), ("val", val_records, val_name)):
        if rows is None:
            continue
        samples, sequences, too_long = build_sequences(demos_of(rows, cfg), renderer, max_length=cfg.max_length,
                                                    shots=options.shots, repeats=options.repeats, seed=seed,
                                                    domains=index)
        counts = [len(seq) for seq in sequences]
        if not samples:
            raise ObjectiveError(f"no many-shot sequence in {name}: every record is longer than "
                                 f"data.max_length={cfg.max_length} with its instruction (first: {too_long[0]})")
        stats[split] = split_stats(samples, records=len(rows), sequences=len(samples), shots_min=min(counts),
                                   shots_mean=sum(counts) / len(counts), shots_max=max(counts),
                                   dropped_too_long=len(too_long), too_long_first=too_long[0] if too_long else None)
        splits[split] = samples
    if report:
        for split, s in stats.items():
            print(f"[tunesmith] many_icl {split}: {s['records']} examples -> {s['sequences']} sequences of "
                  f"{s['shots_min']}-{s['shots_max']} shots (mean {s['shots_mean']:.1f}), "
                  f"{s['dropped_too_long']} too long for data.max_length={cfg.max_length}", flush=True)
    return DataSplits(train=splits["train"], val=splits.get("val"), stats=stats, format="chat", domains=domains)


class ManyICL(SFT):
    """SFT's weighted token loss over many-shot sequences in which every answer trains (domains, for an
    MoE routed by domain, carry over from SFT)."""

    name = "many_icl"
    Options, block = ManyICLConfig, "many_icl"
    block_doc = ("Options of many_icl: how many demonstrations a training sequence holds and how many "
                 "shuffled passes over the examples build them.")

    @classmethod
    def load(cls, recipe, tokenizer):
        return load_many_shot(recipe.data, recipe.objective.many_icl, tokenizer, seed=recipe.train.seed)
