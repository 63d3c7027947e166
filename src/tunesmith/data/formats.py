"""Record formats: turn a raw record into what the renderer needs.

- `text`: a `text` column, trained as is.
- `instruction`: `instruction`, optional `input`, `output`, optional `system` columns; becomes a
  system?/user/assistant chat so it is rendered with the model's own chat template.
- `chat`: OpenAI-style `messages`, a list of {role: system|user|assistant, content: str}; with
  tool calling (see `tools.py`), a `tools` column of JSON schemas, `tool_calls` on assistant
  messages and `tool` messages holding the results.

`data.columns` maps these roles to the user's column names, e.g. {output: response}.

Any format: an optional `weight` field (a number >= 0, default 1) scales every trained token of the
record in the loss (`record_weight`, applied by `render.weigh`).
"""
from __future__ import annotations

import json
import math
from typing import Any

from ..config import DataConfig
from .errors import DataError
from .sources import Record
from .tools import ToolChat, check_conversation, check_tool_calls, inline_tools, parse_tools

FORMATS = ("text", "instruction", "chat")
ROLES = ("system", "user", "assistant", "tool")

Message = dict[str, Any]  # role, content: str; assistant: tool_calls; tool: tool_call_id, name
Example = str | list[Message]  # text for `text`, messages for `chat` (a ToolChat with tools) and `instruction`


def column(cfg: DataConfig, role: str) -> str:
    """The user's column name for a role (the role itself unless mapped)."""
    return cfg.columns.get(role, role)


def detect_format(record: Record, cfg: DataConfig) -> str:
    """`cfg.format`, or for `auto` the format the record's columns point at."""
    if cfg.format != "auto":
        return cfg.format
    fields = record.fields
    if column(cfg, "messages") in fields:
        return "chat"
    if column(cfg, "instruction") in fields or column(cfg, "output") in fields:
        return "instruction"
    if column(cfg, "text") in fields:
        return "text"
    raise DataError(
        f"{record.where}: cannot tell the data format from the fields {_field_list(fields)}; expected "
        f"'{column(cfg, 'messages')}' (chat), '{column(cfg, 'instruction')}'+'{column(cfg, 'output')}' "
        f"(instruction) or '{column(cfg, 'text')}' (text); set data.format and map columns with data.columns"
    )


def to_example(record: Record, fmt: str, cfg: DataConfig) -> Example:
    """Check a record against its format and return its text or its chat messages."""
    if fmt == "text":
        return _string(record, cfg, "text", fmt)
    if fmt == "instruction":
        return _instruction_messages(record, cfg)
    if fmt == "chat":
        messages = _with_system_prompt(_chat_messages(record, cfg), cfg.system_prompt)
        return with_tools(messages, record.fields, record.where, cfg)
    raise DataError(f"data.format: unknown format '{fmt}'; choose one of auto, {', '.join(FORMATS)}")


def record_weight(record: Record) -> float:
    """The record's `weight` field: a finite number >= 0 (a numeric string too, as CSV cells are);
    1.0 when absent or null."""
    name = "weight"
    value = record.fields.get(name)
    if value is None:
        return 1.0
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise DataError(f"{record.where}: field '{name}' is {value!r}; expected a number >= 0") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{record.where}: field '{name}' is {type(value).__name__}; expected a number >= 0")
    if not math.isfinite(value) or value < 0:
        raise DataError(f"{record.where}: field '{name}' is {value}; expected a finite number >= 0")
    return float(value)


def _field_list(fields: dict) -> str:
    return "[" + ", ".join(map(str, fields)) + "]"


def _string(record: Record, cfg: DataConfig, role: str, fmt: str, required: bool = True) -> str:
    """The string in the record's column for `role`; '' for an absent optional column."""
    name = column(cfg, role)
    value = record.fields.get(name)
    if value is None:
        if not required:
            return ""
        if name in record.fields:
            raise DataError(f"{record.where}: field '{name}' is null (format {fmt})")
        raise DataError(
            f"{record.where}: record has no field '{name}' (format {fmt}; map your column with "
            f"data.columns.{role}=NAME; the record has {_field_list(record.fields)})"
        )
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a numeric answer in JSON/parquet is still an answer
    if not isinstance(value, str):
        raise DataError(f"{record.where}: field '{name}' is {type(value).__name__}; expected a string")
    return value


def _instruction_messages(record: Record, cfg: DataConfig) -> list[Message]:
    prompt = _string(record, cfg, "instruction", "instruction")
    extra = _string(record, cfg, "input", "instruction", required=False)
    if extra.strip():
        prompt = prompt + "\n\n" + extra
    messages = [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": _string(record, cfg, "output", "instruction")},
    ]
    system = _string(record, cfg, "system", "instruction", required=False) or cfg.system_prompt
    return _with_system_prompt(messages, system)


def _with_system_prompt(messages: list[Message], system: str | None) -> list[Message]:
    if system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system}] + messages
    return messages


def _chat_messages(record: Record, cfg: DataConfig) -> list[Message]:
    name = column(cfg, "messages")
    where = record.where
    if name not in record.fields:
        raise DataError(
            f"{where}: record has no field '{name}' (format chat; map your column with "
            f"data.columns.messages=NAME; the record has {_field_list(record.fields)})"
        )
    messages: Any = record.fields[name]
    if isinstance(messages, str):  # CSV cells hold the list as JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: field '{name}' is a string but not valid JSON ({e.msg})") from None
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{name}' must be a non-empty list of {{role, content}} messages")
    return [check_message(m, where, f"{name}[{i}]") for i, m in enumerate(messages)]


def with_tools(messages: list[Message], fields: dict, where: str, cfg: DataConfig) -> list[Message]:
    """A checked conversation with the record's tools: a ToolChat (rendered by the template with
    `tools=`), or with `data.tool_format=inline` plain messages that hold them as text; a
    conversation without tools comes back as it is."""
    name = column(cfg, "tools")
    tools = parse_tools(fields.get(name), where, name)
    if not tools and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return messages
    check_conversation(messages, tools, where, column(cfg, "messages"))
    if cfg.tool_format == "inline":
        return inline_tools(messages, tools)
    return ToolChat(messages, tools)


def check_message(m: Any, where: str, at: str) -> Message:
    """One {role, content} message, checked; errors name the record and the message (`at`).
    Tool calling keeps `tool_calls` (assistant) and `tool_call_id`/`name` (tool); other extra keys
    are dropped: the chat template must not see them."""
    if not isinstance(m, dict):
        raise DataError(f"{where}: {at} is {type(m).__name__}; expected {{role, content}}")
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
        shown = "missing" if role is None else repr(role)
        raise DataError(f"{where}: {at}.role is {shown}; expected system, user or assistant (or tool, for a "
                        "tool result)")
    out: Message = {"role": role}
    if m.get("tool_calls") not in (None, []):  # parquet exports give every message an empty list
        if role != "assistant":
            raise DataError(f"{where}: {at} has tool_calls but role {role!r}; only assistant messages call tools")
        out["tool_calls"] = check_tool_calls(m["tool_calls"], where, f"{at}.tool_calls")
        content = "" if content is None else content  # a message that only calls has no text
    if role == "tool":
        if isinstance(content, (dict, list)):
            content = json.dumps(content, ensure_ascii=False)  # a structured result, as its JSON text
        for key in ("tool_call_id", "name"):
            if isinstance(m.get(key), str):
                out[key] = m[key]
    if not isinstance(content, str):
        shown = "missing" if content is None else type(content).__name__
        raise DataError(f"{where}: {at}.content is {shown}; expected a string")
    out["content"] = content
    return out
