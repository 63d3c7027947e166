"""Render an example into token ids plus per-token loss weights.

`weights[t]` is the loss weight for predicting `input_ids[t]` from the tokens before it, so
`weights[0]` is always 0. 0 = not trained, 1 = trained (other values are left to importance-aware
losses, and to a record's `weight`, see `weigh`).

Chats are rendered with the tokenizer's own chat template and tokenized once as a whole string, so
training sees exactly the ids inference will see. Assistant turns are found by rendering message
prefixes (the template has no `{% generation %}` block, so `return_assistant_tokens_mask` would
silently return zeros) and mapped to tokens through the offset mapping.

Tool-calling chats (see `tools.py`) are rendered with the template's `tools=`; an assistant turn
that calls tools trains from where the answer begins to the turn's terminator, so its calls (in
whatever syntax the template writes them) and any text before them train, and tool results,
which are not assistant turns, stay masked.
"""
from __future__ import annotations

import warnings
from bisect import bisect_left, bisect_right
from typing import TypedDict

from jinja2 import TemplateError

from .errors import DataError
from .formats import Example, Message
from .tools import needed_features, probe_template, tools_of, unsupported_error, uses_tools

# Used when a tokenizer has no chat template (base models). Plain ChatML, without a default system
# prompt: a template that is not prefix-stable would break the span search below.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_warned_no_template = False
_MARKER = "tunesmith-answer-marker-5183"  # an answer text no template writes on its own


class Sample(TypedDict):
    """Token ids and loss weights; data with domains adds `domain` (int), the record's domain number."""

    input_ids: list[int]
    weights: list[float]


def chat_template(tokenizer) -> str:
    """The tokenizer's chat template, or ChatML (with a one-time warning) when it has none."""
    global _warned_no_template
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    if not _warned_no_template:
        warnings.warn("the tokenizer has no chat template; chats are rendered as ChatML", stacklevel=2)
        _warned_no_template = True
    return CHATML_TEMPLATE


class Renderer:
    """Turns examples (text or chat messages) into Samples for one tokenizer and masking policy."""

    def __init__(self, tokenizer, *, train_on_prompt: bool = False, assistant_turns: str = "all"):
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("the model's tokenizer is a slow (Python) tokenizer; tunesmith needs a fast one "
                            "(a tokenizer.json) to map assistant text to tokens")
        self.tokenizer = tokenizer
        self.train_on_prompt = train_on_prompt
        self.assistant_turns = assistant_turns
        self.template = chat_template(tokenizer)
        # Turn terminators (<|im_end|>, <|eot_id|>, <end_of_turn>) are special tokens: the first one
        # after an answer is trained so the model learns to stop.
        special = set(tokenizer.all_special_ids)
        special |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.special_ids = special
        self._tool_support: dict[str, str | None] | None = None  # probed on the first tool chat

    def __call__(self, example: Example) -> Sample:
        return self.text(example) if isinstance(example, str) else self.chat(example, tools_of(example))

    def text(self, text: str) -> Sample:
        """Plain text: every token after the first trains, and an eos ends it."""
        ids = self.tokenizer(text)["input_ids"]  # special tokens as the tokenizer adds them (e.g. bos)
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        return {"input_ids": ids, "weights": [0.0] + [1.0] * (len(ids) - 1)}

    def chat(self, messages: list[Message], tools: list[dict] | None = None) -> Sample:
        """A chat rendered with the template (with `tools`, the JSON schemas it may call); by default
        only assistant answers and calls, and their terminators, train."""
        tools = tools or tools_of(messages)
        if uses_tools(messages, tools):
            self.check_tools(messages, tools)
        full = self._render(messages, tools=tools)
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        if self.train_on_prompt:
            return {"input_ids": ids, "weights": [0.0] + [1.0] * (len(ids) - 1)}

        starts = [s for s, _ in enc["offset_mapping"]]
        ends = [e for _, e in enc["offset_mapping"]]
        weights = [0.0] * len(ids)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.assistant_turns == "last":
            turns = turns[-1:]
        cursor = 0
        for i in turns:
            if messages[i].get("tool_calls"):
                content_start, stop = self._call_turn_span(ids, starts, ends, messages, i, full, tools)
                content_end = stop
            else:
                content_start, content_end, turn_end = self._assistant_span(messages, i, full, cursor, tools)
                stop = self._terminator_end(ids, starts, ends, full, content_end, turn_end)
            # Every token overlapping [content_start, stop) trains.
            for t in range(bisect_right(ends, content_start), bisect_left(starts, stop)):
                weights[t] = 1.0
            cursor = content_end
        weights[0] = 0.0  # nothing predicts the first token
        return {"input_ids": ids, "weights": weights}

    def check_tools(self, messages: list[Message], tools: list[dict] | None) -> None:
        """Raise (one line, for the caller to prefix with the record) if the template drops a tool
        feature this conversation uses; the template is probed once per Renderer."""
        if self._tool_support is None:
            self._tool_support = probe_template(
                lambda msgs, tls, gen: self._render(msgs, gen, tls, wrap_errors=False))
        missing = {f: self._tool_support[f] for f in needed_features(messages, tools) if self._tool_support[f]}
        if missing:
            raise unsupported_error(missing)

    def _render(self, messages: list[Message], generation: bool = False, tools=None, wrap_errors=True) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools, chat_template=self.template, tokenize=False, add_generation_prompt=generation
            )
        except TemplateError as e:  # the template's raise_exception(...): it refuses this conversation
            if not wrap_errors:
                raise
            raise DataError(f"the chat template refused this conversation: {e}") from None

    def _call_turn_span(self, ids, starts, ends, messages, i, full, tools) -> tuple[int, int]:
        """(start, stop) in characters of `full` of what assistant message i trains when it calls tools:
        from where its own text begins through the last special token of its turn (the terminator), so
        the calls train in the template's own syntax.

        The turn is rendered as the last message; some templates write text before a final answer
        only (Qwen3's empty <think></think> block), which a marker answer reveals and which is then
        neither required in `full` nor trained."""
        start = self._prefix_len(messages[:i], full, True, tools)
        alone = self._render(messages[: i + 1], False, tools)
        if start is None or not alone.startswith(full[:start]):
            raise DataError(f"assistant message {i} calls tools, but the chat template renders the conversation "
                            "before it differently when it goes on, so its tokens cannot be found; "
                            "set data.tool_format=inline")
        marked = self._render(messages[:i] + [{"role": "assistant", "content": _MARKER}], False, tools)
        at = marked.find(_MARKER, start)
        filler = marked[start:at] if at >= 0 and marked.startswith(full[:start]) else ""
        turn = alone[start:]
        if filler and turn.startswith(filler) and not full.startswith(turn, start):
            turn = turn[len(filler):]  # a final-turn-only block that `full` does not have here
        if not turn.strip() or not full.startswith(turn, start):
            raise DataError(f"assistant message {i} calls tools, but the chat template renders its turn "
                            "differently when more messages follow, so its tokens cannot be found; "
                            "set data.tool_format=inline")
        for call in messages[i]["tool_calls"]:
            if call["function"]["name"] not in turn:
                raise DataError(f"cannot find the call to {call['function']['name']!r} of assistant message {i} "
                                "in the text the chat template rendered")
        end = start + len(turn)
        if filler and full.startswith(filler, start):
            start += len(filler)
        first, last = bisect_left(starts, start), bisect_left(starts, end)
        for t in range(last - 1, first - 1, -1):
            if ids[t] in self.special_ids:
                return start, ends[t]
        return start, start + len(full[start:end].rstrip())

    def _prefix_len(self, messages: list[Message], full: str, generation: bool, tools=None) -> int | None:
        """Length of the rendering of `messages` if it is a prefix of `full`, else None."""
        if not messages:
            return None  # templates refuse an empty conversation
        prefix = self._render(messages, generation, tools)
        return len(prefix) if full.startswith(prefix) else None

    def _assistant_span(self, messages, i, full, cursor, tools=None) -> tuple[int, int, int | None]:
        """(content start, content end, turn end) of assistant message i, in characters of `full`.

        The rendering of messages[:i] with a generation prompt ends where the answer begins; that of
        messages[:i+1] ends where the turn (terminator and template newline included) ends. A template
        that is not prefix-stable (say, one that rewrites earlier turns) falls back to searching the text.
        """
        start = self._prefix_len(messages[:i], full, True, tools)
        end = self._prefix_len(messages[: i + 1], full, False, tools)
        start = cursor if start is None else start
        # Templates may trim the content, so search for the stripped text inside the turn.
        text = messages[i]["content"].strip()
        pos = full.find(text, start, len(full) if end is None else end)
        if pos < 0:
            raise DataError(f"cannot find assistant message {i} in the text the chat template rendered")
        return pos, pos + len(text), end

    def _terminator_end(self, ids, starts, ends, full, content_end, turn_end) -> int:
        """Where the trained part of a turn stops: after the first special token that follows the
        answer (<|im_end|>), so the template's newline after it and the next header stay untrained."""
        last = len(ids) if turn_end is None else bisect_left(starts, turn_end)
        for t in range(bisect_left(starts, content_end), last):
            if ids[t] in self.special_ids:
                return ends[t]
        if turn_end is None:
            return content_end
        # No special terminator (ChatML text on a base tokenizer): train the turn's suffix up to its
        # last visible character.
        return content_end + len(full[content_end:turn_end].rstrip())


def weigh(sample: Sample, weight: float) -> Sample:
    """The sample with every token weight multiplied by its record's `weight` (formats.record_weight).

    The SFT loss sums weight * NLL over trained tokens and divides by the number of trained tokens,
    so a record of weight 2 adds to the loss sum (and its gradient) exactly what the record twice
    would, and one of weight 0 trains nothing (it is skipped as having no trained token)."""
    if weight == 1.0:
        return sample
    return {**sample, "weights": [w * weight for w in sample["weights"]]}


def fit_length(sample: Sample, max_length: int, overflow: str) -> tuple[Sample | None, bool]:
    """Apply `max_length`: returns (sample or None when dropped, whether it was truncated)."""
    if len(sample["input_ids"]) <= max_length:
        return sample, False
    if overflow == "drop":
        return None, False
    return {**sample, "input_ids": sample["input_ids"][:max_length], "weights": sample["weights"][:max_length]}, True
