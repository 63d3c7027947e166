"""Tool-calling conversations: the format TRL, Axolotl and LLaMA-Factory read.

A chat record may carry a `tools` column (a list of JSON schemas, or that list as JSON text);
assistant messages may carry `tool_calls` and a `tool` role holds a call's result:

    {"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}],
     "messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "tool_calls": [{"type": "function", "function":
                      {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "name": "get_weather", "content": "18 C, sunny"},
                  {"role": "assistant", "content": "It is 18 C and sunny in Paris."}]}

Everything is normalised to what transformers' chat templates expect (schemas wrapped as
{"type": "function", "function": ...}, `arguments` a dict even when the data holds JSON text, as
OpenAI's API writes it), then rendered by the model's own template with `tools=`. Templates differ
in whether they render tools at all (SmolLM2's ignores them), so a probe conversation is rendered
once per tokenizer and a record whose tools would vanish is an error, not silently trained without
its calls. `data.tool_format=inline` is the fallback: the schemas, calls and results are written
into ordinary messages as Hermes-style <tools>/<tool_call>/<tool_response> text, which any template
renders (and inference must then use the same text format).
"""
from __future__ import annotations

import json
from typing import Any

from jinja2 import TemplateError

from .errors import DataError

TOOL_FORMATS = ("template", "inline")
INLINE_HINT = ("set data.tool_format=inline to write tools, calls and results into the messages as text, "
               "or use a model whose chat template renders tools")


class ToolChat(list):
    """A chat example (its messages, as a list) plus the JSON schemas of the tools it may call.

    A list subclass so that everything that reads chat examples as message lists keeps working;
    note that slicing or `+` gives a plain list, so pass `tools` on explicitly after editing."""

    def __init__(self, messages, tools: list[dict] | None):
        super().__init__(messages)
        self.tools = tools or None


def tools_of(example: Any) -> list[dict] | None:
    """The tool schemas an example carries (None for plain chats and texts)."""
    return getattr(example, "tools", None) or None


def like(example: Any, messages: list[dict]) -> list[dict]:
    """`messages` (an edited copy of a chat example's) with the example's tools kept, for code that
    rewrites messages (cleaning, scrubbing) and must not lose the schemas on the way."""
    tools = tools_of(example)
    return ToolChat(messages, tools) if tools else messages


def as_record(example: Any) -> dict:
    """An example as a record that reads back as the same example: {"text"} or {"messages"[, "tools"]}."""
    if isinstance(example, str):
        return {"text": example}
    tools = tools_of(example)
    return {"messages": list(example), **({"tools": tools} if tools else {})}


def uses_tools(messages: list[dict], tools: list[dict] | None) -> bool:
    """Whether a conversation needs a template that renders tools."""
    return bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)


def answer_text(message: dict) -> str:
    """What an assistant turn says: its content followed by its calls as JSON; used to tell an empty
    answer (nothing to train) and two identical answers (a preference pair with no preference)."""
    calls = [json.dumps(c["function"], sort_keys=True) for c in message.get("tool_calls") or ()]
    return "\n".join([message["content"], *calls]) if calls else message["content"]


# ---- checking and normalising records


def _json_value(value: Any, where: str, at: str) -> Any:
    """Parsed JSON text, for columns that CSV/parquet datasets often store as strings."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: {at} is a string but not valid JSON ({e.msg})") from None


def parse_tools(value: Any, where: str, name: str) -> list[dict] | None:
    """A record's tool schemas, each as {"type": "function", "function": {name, description?, parameters?}}
    (bare {name, ...} schemas are wrapped); None when the column is absent or empty."""
    value = _json_value(value, where, f"field '{name}'")
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{name}' is {type(value).__name__}; expected a list of tool JSON schemas")
    tools, seen = [], set()
    for k, tool in enumerate(value):
        at = f"{name}[{k}]"
        if not isinstance(tool, dict):
            raise DataError(f"{where}: {at} is {type(tool).__name__}; expected a JSON schema object")
        if "function" in tool:
            if tool.get("type", "function") != "function":
                raise DataError(f"{where}: {at}.type is {tool['type']!r}; only function tools are supported")
            spec, at = tool["function"], at + ".function"
        else:
            spec = tool
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise DataError(f"{where}: {at}.name is missing or not a string; every tool needs a name")
        if "parameters" in spec and not isinstance(spec["parameters"], dict):
            raise DataError(f"{where}: {at}.parameters is {type(spec['parameters']).__name__}; expected a JSON "
                            "schema object")
        if spec["name"] in seen:
            raise DataError(f"{where}: {at}.name {spec['name']!r} is declared twice")
        seen.add(spec["name"])
        tools.append({"type": "function", "function": spec})
    return tools


def check_tool_calls(value: Any, where: str, at: str) -> list[dict]:
    """An assistant message's `tool_calls`, each normalised to {"type": "function", "function": {name,
    arguments: dict}} (plus its `id` when given). OpenAI writes `arguments` as JSON text; templates
    expect a dict (Qwen's writes `arguments | tojson`, which would quote the text a second time)."""
    value = _json_value(value, where, at)
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {at} must be a non-empty list of tool calls")
    calls = []
    for k, call in enumerate(value):
        here = f"{at}[{k}]"
        if not isinstance(call, dict):
            raise DataError(f"{where}: {here} is {type(call).__name__}; expected {{function: {{name, arguments}}}}")
        fn = call.get("function", call)  # a bare {name, arguments} call is accepted too
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(f"{where}: {here}.function.name is missing or not a string")
        args = _json_value(fn.get("arguments", {}), where, f"{here}.function.arguments")
        if not isinstance(args, dict):
            raise DataError(f"{where}: {here}.function.arguments is {type(args).__name__}; expected an object "
                            "(or its JSON text)")
        out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            out["id"] = call["id"]
        calls.append(out)
    return calls


def check_conversation(messages: list[dict], tools: list[dict] | None, where: str, name: str) -> None:
    """Calls name declared tools (when the record declares any) and every tool result answers a call."""
    declared = {t["function"]["name"] for t in tools or ()}
    calling = False  # inside a run of assistant-call / tool-result messages
    for i, m in enumerate(messages):
        for k, call in enumerate(m.get("tool_calls") or ()):
            called = call["function"]["name"]
            if declared and called not in declared:
                raise DataError(f"{where}: {name}[{i}].tool_calls[{k}] calls {called!r}, which is not among the "
                                f"tools [{', '.join(sorted(declared))}]")
        if m["role"] == "tool" and not calling:
            raise DataError(f"{where}: {name}[{i}] is a tool result, but no assistant tool call comes before it")
        calling = bool(m.get("tool_calls")) or (calling and m["role"] == "tool")


# ---- the inline fallback


def inline_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The conversation as plain system/user/assistant messages: the schemas appended to the system
    prompt, each call written into its assistant message as <tool_call>{"name", "arguments"}</tool_call>,
    consecutive tool results merged into one user message of <tool_response> blocks."""
    out: list[dict] = []
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("from_tools"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "from_tools": True})
        elif m.get("tool_calls"):
            calls = [f"<tool_call>\n{json.dumps(c['function'], ensure_ascii=False)}\n</tool_call>"
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(([m["content"]] if m["content"] else []) + calls)})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    out = [{"role": m["role"], "content": m["content"]} for m in out]
    if tools:
        block = ("You can call these tools; their JSON schemas:\n<tools>\n"
                 + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
                 + "\n</tools>\nTo call one, answer with <tool_call>\n{\"name\": ..., \"arguments\": {...}}\n"
                   "</tool_call>; results come back in <tool_response> blocks.")
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}" if out[0]["content"] else block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


# ---- does the template render tools?

_PROBE_NAME = "tunesmith_probe_lookup"
_PROBE_ARG = "probe-argument-4711"
_PROBE_RESULT = "probe-result-0815"
_PROBE_TOOLS = [{"type": "function", "function": {
    "name": _PROBE_NAME, "description": "Look a key up.",
    "parameters": {"type": "object", "properties": {"key": {"type": "string", "description": "The key."}},
                   "required": ["key"]}}}]
_PROBE_CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"id": "probe0001", "type": "function", "function": {"name": _PROBE_NAME, "arguments": {"key": _PROBE_ARG}}}]}
_PROBE_RESULT_MSG = {"role": "tool", "tool_call_id": "probe0001", "name": _PROBE_NAME, "content": _PROBE_RESULT}
_PROBE_USER = {"role": "user", "content": "Look up the probe key."}

FEATURES = {
    "schemas": "the tools column's JSON schemas",
    "calls": "assistant tool calls",
    "results": "tool results",
}


def probe_template(render) -> dict[str, str | None]:
    """Which tool features a template renders: {feature: None if it does, else why not}.

    `render(messages, tools, generation)` is the renderer's own call into the template. A feature
    counts as rendered when its marker text shows up: the tool's name for the schemas, the call's
    argument value (and one more mention of the name) for calls, the result text for results."""
    def attempt(messages, generation=False):
        try:
            return render(messages, _PROBE_TOOLS, generation), None
        except (TemplateError, TypeError, ValueError, KeyError) as e:  # templates raise_exception(...) or trip on a key
            return None, f"the template raised: {e}"

    out: dict[str, str | None] = {}
    base, error = attempt([_PROBE_USER], generation=True)
    out["schemas"] = error or (None if _PROBE_NAME in base else "the tool's name is not in the rendered text")
    calls, error = attempt([_PROBE_USER, _PROBE_CALL])
    if error is None and not (_PROBE_ARG in calls and calls.count(_PROBE_NAME) > (base or "").count(_PROBE_NAME)):
        error = "the call's name and arguments are not in the rendered text"
    out["calls"] = error
    results, error = attempt([_PROBE_USER, _PROBE_CALL, _PROBE_RESULT_MSG])
    out["results"] = error or (None if _PROBE_RESULT in results else "the result is not in the rendered text")
    return out


def needed_features(messages: list[dict], tools: list[dict] | None) -> list[str]:
    """The tool features a conversation uses, in FEATURES order."""
    need = {"schemas": bool(tools), "calls": any(m.get("tool_calls") for m in messages),
            "results": any(m["role"] == "tool" for m in messages)}
    return [f for f in FEATURES if need[f]]


def unsupported_error(missing: dict[str, str]) -> DataError:
    """The one-line error for a record the template cannot render (the caller prefixes the record):
    each feature it uses that the probe did not find, {feature: why}."""
    what = " and ".join(f"{FEATURES[f]} ({reason})" for f, reason in missing.items())
    return DataError(f"the model's chat template cannot render {what}, as a probe conversation shows; {INLINE_HINT}")
