"""Preference pairs for the DPO family: one prompt, a chosen and a rejected answer.

Accepted records (column names through `data.columns`: prompt, chosen, rejected, messages, system):

- `{"prompt": str, "chosen": str, "rejected": str}`, optionally `system`;
- `{"messages": [...], "chosen": ..., "rejected": ...}`: `messages` is the shared conversation and
  ends with a user turn;
- `chosen`/`rejected` may be a string, an assistant message `{"role": "assistant", "content": ...}`,
  or a list of messages: either a continuation of the prompt (TRL's conversational style, e.g.
  `[{"role": "assistant", ...}]`) or the whole conversation (Anthropic HH style, then `prompt` and
  `messages` may be absent). The two sides must agree on everything before their last assistant turn.
- tool calling (see `tools.py`): a `tools` column shared by both sides, `tool_calls` on assistant
  messages (an answer may be a call: chosen calls the right tool, rejected the wrong one) and `tool`
  results in the shared conversation. Both sides keep and render their calls.

Each side is rendered with the chat template like any chat, but only its final answer (and that
turn's terminator) is weighted: the prompt tokens are identical on both sides and only the answers
enter the sequence log-probabilities.

Batches: plan over pairs (length = both sides together), then collate `flatten_pairs(...)` so a pair
never straddles two micro-batches; segment 2i+1 is pair i's chosen side and 2i+2 its rejected side.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypedDict

from tqdm.auto import tqdm

from ..config import DataConfig
from .errors import DataError
from .formats import Message, check_message, column
from .tools import ToolChat, answer_text, check_conversation, inline_tools, parse_tools, tools_of, uses_tools
from .load import PROGRESS_MIN_RECORDS, no_usable, read_splits, split_stats
from .render import Renderer, Sample, fit_length
from .skipped import NOTHING_TO_TRAIN, Skipped, announce


class PairSample(TypedDict):
    chosen: Sample
    rejected: Sample


@dataclass
class PairSplits:
    train: list[PairSample]
    val: list[PairSample] | None
    stats: dict  # {"train": {...}, "val": {...}}: split_stats over both sides, plus pair counts
    format: str = "preference"


def load_pairs(cfg: DataConfig, tokenizer, seed: int = 0, report: bool = True) -> PairSplits:
    """Read, split and tokenize preference pairs; the same split rules as `load_data`.

    `max_length`/`overflow` apply to each side; a pair is dropped when either side is dropped or
    keeps no trained token; skipped pairs are counted in `stats[split]["skipped"]` and, with `report`,
    printed (one line per reason, with the first such record). `train_on_prompt` and
    `assistant_turns` do not apply: only the final answers train.

    Raises:
        DataError: a missing file, a bad record (the message names it and the field), or a split left
        with no usable pair.
    """
    if cfg.format not in ("auto", "preference"):
        raise DataError(f"data.format={cfg.format} cannot feed a preference objective; preference records "
                        "need chosen/rejected answers (set data.format=preference or auto)")
    records, val_records, val_name = read_splits(cfg, seed)

    renderer = Renderer(tokenizer, assistant_turns="last")
    train, train_stats = _build(records, cfg, renderer, cfg.train)
    stats = {"train": train_stats}
    val = None
    if val_records is not None:
        val, stats["val"] = _build(val_records, cfg, renderer, val_name)
    if report:
        announce(stats, cfg.max_length)
    return PairSplits(train=train, val=val, stats=stats)


def flatten_pairs(pairs: list[PairSample]) -> list[Sample]:
    """[chosen 1, rejected 1, chosen 2, ...]: collated, pair i is segments 2i+1 and 2i+2 (or rows 2i, 2i+1)."""
    return [s for p in pairs for s in (p["chosen"], p["rejected"])]


def pair_lengths(pairs: list[PairSample]) -> list[int]:
    """Tokens of each pair (both sides), for `plan_batches` (then collate `flatten_pairs` of each group)."""
    return [len(p["chosen"]["input_ids"]) + len(p["rejected"]["input_ids"]) for p in pairs]


def render_pair(renderer: Renderer, fields: dict[str, Any], where: str, cfg: DataConfig) -> PairSample:
    """Check one record and render both sides; only each side's final answer is weighted."""
    if renderer.train_on_prompt or renderer.assistant_turns != "last":
        raise ValueError("render_pair needs a Renderer(tokenizer, assistant_turns='last') without train_on_prompt")
    context, chosen, rejected = pair_messages(fields, where, cfg)
    tools = tools_of(context)
    out = {}
    for side, answer in (("chosen", chosen), ("rejected", rejected)):
        conversation = context + [answer]
        try:
            if cfg.tool_format == "inline" and uses_tools(conversation, tools):
                out[side] = renderer.chat(inline_tools(conversation, tools))
            else:
                out[side] = renderer.chat(conversation, tools)
        except DataError as e:
            raise DataError(f"{where}: {column(cfg, side)}: {e}") from None
    return out  # type: ignore[return-value]


def pair_messages(fields: dict[str, Any], where: str, cfg: DataConfig) -> tuple[list[Message], Message, Message]:
    """(shared conversation ending with a user or tool turn, chosen answer, rejected answer) of a
    record; with tools, the conversation is a ToolChat carrying the record's schemas."""
    names = {role: column(cfg, role) for role in ("prompt", "messages", "chosen", "rejected", "system", "tools")}
    for role in ("chosen", "rejected"):
        if fields.get(names[role]) is None:
            state = "is null" if names[role] in fields else "is missing"
            raise DataError(f"{where}: field '{names[role]}' {state} (preference records need "
                            f"'{names['chosen']}' and '{names['rejected']}'; map your columns with "
                            f"data.columns.{role}=NAME; the record has [{', '.join(map(str, fields))}])")
    prompt = _prompt(fields, where, names)
    conversations = {role: _side(fields[names[role]], prompt, where, names[role]) for role in ("chosen", "rejected")}
    (ctx_c, ans_c), (ctx_r, ans_r) = conversations["chosen"], conversations["rejected"]
    if ctx_c != ctx_r:
        k = next((i for i, (a, b) in enumerate(zip(ctx_c, ctx_r)) if a != b), min(len(ctx_c), len(ctx_r)))
        raise DataError(f"{where}: '{names['chosen']}' and '{names['rejected']}' differ before their last "
                        f"assistant turn (at message {k}); they must share the conversation")
    if not ctx_c:
        raise DataError(f"{where}: no prompt: give '{names['prompt']}', '{names['messages']}', or "
                        f"'{names['chosen']}'/'{names['rejected']}' as whole conversations")
    if ctx_c[-1]["role"] not in ("user", "tool"):
        source = next((names[r] for r in ("messages", "prompt") if fields.get(names[r]) is not None), names["chosen"])
        raise DataError(f"{where}: field '{source}': the conversation before the answers ends with a "
                        f"{ctx_c[-1]['role']} turn; it must end with a user turn (or a tool result)")
    if answer_text(ans_c).strip() == answer_text(ans_r).strip():
        raise DataError(f"{where}: '{names['chosen']}' == '{names['rejected']}': the two answers are the same")
    system = fields.get(names["system"])
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: field '{names['system']}' is {type(system).__name__}; expected a string")
    system = system or cfg.system_prompt
    if system and ctx_c[0]["role"] != "system":
        ctx_c = [{"role": "system", "content": system}] + ctx_c
    tools = parse_tools(fields.get(names["tools"]), where, names["tools"])
    for side, answer in (("chosen", ans_c), ("rejected", ans_r)):
        check_conversation(ctx_c + [answer], tools, where, f"the '{names[side]}' conversation")
    return (ToolChat(ctx_c, tools) if tools else ctx_c), ans_c, ans_r


def _prompt(fields: dict, where: str, names: dict) -> list[Message]:
    """The shared conversation the record gives explicitly ([] when the sides carry it)."""
    if fields.get(names["messages"]) is not None:
        value = fields[names["messages"]]
        if isinstance(value, str):  # CSV cells hold the list as JSON text
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: field '{names['messages']}' is a string but not valid JSON "
                                f"({e.msg})") from None
        messages = _messages(value, where, names["messages"])
        if not messages:
            raise DataError(f"{where}: field '{names['messages']}' is an empty list")
        return messages
    value = fields.get(names["prompt"])
    if value is None:
        return []
    if isinstance(value, list):  # TRL's conversational style: the prompt as messages
        return _messages(value, where, names["prompt"])
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{names['prompt']}' is {type(value).__name__}; expected a string or messages")
    if not value.strip():
        raise DataError(f"{where}: field '{names['prompt']}' is empty")
    return [{"role": "user", "content": value}]


def _side(value: Any, prompt: list[Message], where: str, name: str) -> tuple[list[Message], Message]:
    """(conversation before the answer, the answer) of one side."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a numeric answer is still an answer, as in the other formats
    if isinstance(value, str):
        conversation = prompt + [{"role": "assistant", "content": value}]
    elif isinstance(value, dict):
        conversation = prompt + _messages([value], where, name, single=True)
    elif isinstance(value, list):
        messages = _messages(value, where, name)
        # The whole conversation (starting with the prompt), or its continuation after the prompt.
        conversation = messages if messages[:len(prompt)] == prompt else prompt + messages
    else:
        raise DataError(f"{where}: field '{name}' is {type(value).__name__}; expected a string, an "
                        "assistant message or a list of messages")
    if not conversation or conversation[-1]["role"] != "assistant":
        raise DataError(f"{where}: field '{name}' does not end with an assistant answer")
    answer = conversation[-1]
    if not answer_text(answer).strip():
        raise DataError(f"{where}: field '{name}' is an empty answer")
    return conversation[:-1], answer


def _messages(value: Any, where: str, name: str, single: bool = False) -> list[Message]:
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{name}' is {type(value).__name__}; expected a list of "
                        "{role, content} messages")
    out = [check_message(m, where, name if single else f"{name}[{i}]") for i, m in enumerate(value)]
    if single and out[0]["role"] != "assistant":
        raise DataError(f"{where}: {name}.role is {out[0]['role']!r}; the answer must be an assistant message")
    return out


def _build(records, cfg: DataConfig, renderer: Renderer, name: str):
    """Render records into pairs, applying max_length/overflow to each side; a pair that cannot train
    is skipped, counted with its first location (see `skipped.py`)."""
    pairs: list[PairSample] = []
    skipped = Skipped()
    bar = tqdm(records, desc=f"tokenizing {name}", unit=" records", disable=len(records) < PROGRESS_MIN_RECORDS)
    for record in bar:
        pair = render_pair(renderer, record.fields, record.where, cfg)
        fitted = {side: fit_length(pair[side], cfg.max_length, cfg.overflow) for side in ("chosen", "rejected")}
        if any(s is None for s, _ in fitted.values()):
            skipped.add("too_long", record.where)
        elif not all(any(s["weights"]) for s, _ in fitted.values()):
            # truncation cut an answer off entirely (an answer always has trained tokens before that)
            cut = any(t for _, t in fitted.values())
            skipped.add("cut_off" if cut else "no_trained", record.where)
        else:
            if any(t for _, t in fitted.values()):
                skipped.add_truncated(record.where)
            pairs.append({"chosen": fitted["chosen"][0], "rejected": fitted["rejected"][0]})
    if not pairs:
        raise DataError(no_usable(name, skipped, cfg, "pairs"))
    return pairs, split_stats(flatten_pairs(pairs), records=len(records), pairs=len(pairs),
                              dropped_too_long=skipped.count("too_long"), truncated=skipped.truncated,
                              truncated_first=skipped.first_truncated,
                              no_trained_token=skipped.count(*NOTHING_TO_TRAIN), skipped=skipped.as_stats(),
                              **side_stats(pairs))


def side_stats(pairs: list[PairSample]) -> dict:
    """Median and largest length of each side, and the tokens each side trains."""
    out = {}
    for side in ("chosen", "rejected"):
        lengths = sorted(len(p[side]["input_ids"]) for p in pairs)
        out[f"{side}_p50"] = lengths[(len(lengths) - 1) // 2]
        out[f"{side}_max"] = lengths[-1]
        out[f"{side}_trained"] = int(sum(sum(1 for w in p[side]["weights"] if w) for p in pairs))
    return out
