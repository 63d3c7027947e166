"""Tool-calling conversations: rendered by a template that writes tools (a Hermes-style ChatML
template written here), refused with a one-line error by SmolLM2's own template (which ignores
them), rendered as text by the inline fallback; only the assistant's calls and answers train;
preference pairs keep their calls."""
import copy
import json
import re

import pytest
import torch

from tests.conftest import make_tiny_model, trained_runs
from tunesmith.data import DataError, Record, Renderer, collate, load_data, to_example
from tunesmith.data.preference import load_pairs, render_pair
from tunesmith.data.tools import ToolChat, inline_tools, probe_template
from tunesmith.objectives.sft import causal_lm_loss
from tunesmith.recipe import DataConfig

END = "<|im_end|>"

# A ChatML template in the Hermes/Qwen style: schemas in the system turn, calls as <tool_call> JSON,
# consecutive tool results grouped into one user turn of <tool_response> blocks.
TOOL_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- 'Tools you may call:\\n<tools>' }}{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' "
    "+ (call.function.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The same, but like Qwen3 it writes an empty <think></think> block before the final assistant turn only,
# so a turn renders differently as the last message than when more messages follow.
THINK_TEMPLATE = TOOL_TEMPLATE.replace(
    "{{- '<|im_start|>assistant' }}",
    "{{- '<|im_start|>assistant' }}{%- if loop.last %}{{- '\\n<think>\\n\\n</think>\\n' }}{%- endif %}",
).replace(
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}",
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if loop.last and message.role == 'assistant' %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{{- message.content + '<|im_end|>\\n' }}",
)
assert THINK_TEMPLATE.count("<think>") == 2

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def call(name, **args):
    return {"type": "function", "function": {"name": name, "arguments": args}}


def call_text(name, **args):
    """The call as TOOL_TEMPLATE (and the inline fallback) writes it."""
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>'


RECORD = {
    "tools": [WEATHER, TIME],
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", city="Paris")]},
        {"role": "tool", "name": "get_weather", "content": "18 C, sunny"},
        {"role": "assistant", "content": "It is 18 C and sunny in Paris."},
    ],
}
PARALLEL = {
    "tools": [WEATHER, TIME],
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Weather and time in Oslo?"},
        {"role": "assistant", "content": "Let me look both up.",
         "tool_calls": [call("get_weather", city="Oslo"), call("get_time", city="Oslo")]},
        {"role": "tool", "name": "get_weather", "content": "-3 C, snow"},
        {"role": "tool", "name": "get_time", "content": {"time": "14:05"}},
        {"role": "assistant", "content": "Snowing at -3 C; it is 14:05."},
    ],
}


@pytest.fixture(scope="module")
def tool_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TOOL_TEMPLATE
    return tok


def example(record, **cfg):
    return to_example(Record("mem.jsonl:1", record), "chat", DataConfig(**cfg))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def untrained_text(sample, tokenizer) -> str:
    return tokenizer.decode([t for t, w in zip(sample["input_ids"], sample["weights"]) if not w])


# --------------------------------------------------------------------------------------------------
# rendering through a template that renders tools


def test_tool_chat_renders_through_the_template_and_trains_calls_and_answers(tool_tokenizer):
    ex = example(RECORD)
    assert isinstance(ex, ToolChat) and [t["function"]["name"] for t in ex.tools] == ["get_weather", "get_time"]
    sample = Renderer(tool_tokenizer)(ex)
    # the ids are exactly the template's own rendering with tools=...
    full = tool_tokenizer.apply_chat_template(list(ex), tools=ex.tools, tokenize=False)
    assert sample["input_ids"] == tool_tokenizer(full, add_special_tokens=False)["input_ids"]
    assert trained_runs(sample, tool_tokenizer) == [call_text("get_weather", city="Paris") + END,
                                                    "It is 18 C and sunny in Paris." + END]
    prompt = untrained_text(sample, tool_tokenizer)
    for text in ('"name": "get_time"', "Weather in Paris?", "<tool_response>\n18 C, sunny\n</tool_response>"):
        assert text in prompt  # schemas, the question and the tool result are seen but not trained


def test_text_before_calls_parallel_calls_and_grouped_results(tool_tokenizer):
    sample = Renderer(tool_tokenizer)(example(PARALLEL))
    calls = call_text("get_weather", city="Oslo") + "\n" + call_text("get_time", city="Oslo")
    assert trained_runs(sample, tool_tokenizer) == ["Let me look both up.\n" + calls + END,
                                                    "Snowing at -3 C; it is 14:05." + END]
    prompt = untrained_text(sample, tool_tokenizer)
    assert '<tool_response>\n-3 C, snow\n</tool_response>\n<tool_response>\n{"time": "14:05"}\n</tool_response>' in prompt
    assert "Answer briefly.\n\nTools you may call:" in prompt


def test_last_turn_only_and_train_on_prompt(tool_tokenizer):
    ending_in_a_call = {**RECORD, "messages": RECORD["messages"][:2]}
    last = Renderer(tool_tokenizer, assistant_turns="last")
    assert trained_runs(last(example(RECORD)), tool_tokenizer) == ["It is 18 C and sunny in Paris." + END]
    assert trained_runs(last(example(ending_in_a_call)), tool_tokenizer) == [call_text("get_weather", city="Paris") + END]
    everything = Renderer(tool_tokenizer, train_on_prompt=True)(example(RECORD))
    assert everything["weights"] == [0.0] + [1.0] * (len(everything["input_ids"]) - 1)


def test_a_block_before_the_final_turn_only_is_neither_required_nor_trained(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = THINK_TEMPLATE
    ending_in_a_call = {**RECORD, "messages": RECORD["messages"][:2]}
    for record, runs in ((RECORD, [call_text("get_weather", city="Paris") + END, "It is 18 C and sunny in Paris." + END]),
                         (ending_in_a_call, [call_text("get_weather", city="Paris") + END])):
        ex = example(record)
        sample = Renderer(tok)(ex)
        full = tok.apply_chat_template(list(ex), tools=ex.tools, tokenize=False)
        assert full.count("<think>") == 1  # only before the last turn
        assert sample["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]
        assert trained_runs(sample, tok) == runs
    pair = render_pair_(tok, PAIR)
    assert trained_runs(pair["chosen"], tok) == [call_text("get_time", city="Lima") + END]
    assert "<think>" in untrained_text(pair["chosen"], tok)


def test_openai_and_bare_spellings_render_the_same(tool_tokenizer):
    """OpenAI writes arguments as JSON text and datasets often store tools as JSON text or bare
    {name, parameters}: all normalise to the same conversation and the same tokens."""
    messages = copy.deepcopy(RECORD["messages"])
    messages[1]["tool_calls"] = [{"id": "call_1", "type": "function",
                                  "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    other = {"tools": json.dumps([WEATHER["function"], TIME]), "messages": messages}
    render = Renderer(tool_tokenizer)
    a, b = render(example(RECORD)), render(example(other))
    assert a == b
    assert example(other)[1]["tool_calls"][0]["id"] == "call_1"  # kept for templates that write ids


def test_chats_without_tools_are_unchanged(tool_tokenizer, tokenizer):
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    ex = example(chat)
    assert type(ex) is list  # no ToolChat, no probe, the template sees no tools
    assert trained_runs(Renderer(tokenizer)(ex), tokenizer) == ["Hello!" + END]
    assert trained_runs(Renderer(tool_tokenizer)(ex), tool_tokenizer) == ["Hello!" + END]
    # parquet/datasets exports give every message every key: empty calls and null ids are no tool use
    filled = {"tools": None, "messages": [{**m, "tool_calls": [], "tool_call_id": None, "name": None}
                                          for m in chat["messages"]]}
    assert type(example(filled)) is list and example(filled) == ex


def test_loss_covers_exactly_the_calls_and_answers(tool_tokenizer):
    """The SFT loss equals, by hand, the summed NLL of the tokens inside the call and answer texts
    (found by searching the rendered string, not through the renderer's mask)."""
    sample = Renderer(tool_tokenizer)(example(PARALLEL))
    full = tool_tokenizer.apply_chat_template(list(example(PARALLEL)), tools=[WEATHER, TIME], tokenize=False)
    enc = tool_tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    spans = []
    for text in ("Let me look both up.\n" + call_text("get_weather", city="Oslo") + "\n"
                 + call_text("get_time", city="Oslo") + END, "Snowing at -3 C; it is 14:05." + END):
        start = full.index(text)
        spans.append((start, start + len(text)))
    inside = [t for t, (s, e) in enumerate(enc["offset_mapping"]) if any(a <= s and e <= b for a, b in spans)]
    model = make_tiny_model(tool_tokenizer)
    batch = collate([sample], packing=True, pad_id=tool_tokenizer.pad_token_id)
    with torch.no_grad():
        loss_sum, n, _ = causal_lm_loss(model, batch, chunk=0)
        logp = torch.log_softmax(model(torch.tensor([enc["input_ids"]])).logits[0].float(), -1)
    ids = enc["input_ids"]
    by_hand = -sum(logp[t - 1, ids[t]] for t in inside)
    assert n == len(inside) > 40
    torch.testing.assert_close(loss_sum, by_hand, atol=1e-3, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# a template that cannot render tools: SmolLM2's own


def test_smollm2_template_renders_tool_results_but_not_schemas_or_calls(tokenizer):
    """SmolLM2's template writes message['content'] for every role: a tool message comes out as a
    `tool` turn, but the tools argument and tool_calls are silently dropped."""
    support = probe_template(lambda m, t, g: tokenizer.apply_chat_template(m, tools=t, tokenize=False,
                                                                           add_generation_prompt=g))
    assert support["results"] is None
    assert support["schemas"] and support["calls"]  # reasons, not None
    rendered = tokenizer.apply_chat_template(list(example(RECORD)), tools=[WEATHER], tokenize=False)
    assert "get_weather" not in rendered and "Paris\"" not in rendered  # what training would silently lose


def test_smollm2_refuses_tool_records_naming_the_line(tokenizer, tmp_path):
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    path = write_jsonl(tmp_path / "t.jsonl", [plain, RECORD])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: the model's chat template cannot render the "
                                        r"tools column's JSON schemas \(.*\) and assistant tool calls .*set data\.tool_format=inline"):
        load_data(DataConfig(train=str(path)), tokenizer, report=False)
    no_schemas = {"messages": RECORD["messages"]}  # calls without a tools column
    path = write_jsonl(tmp_path / "c.jsonl", [no_schemas])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: .*cannot render assistant tool calls"):
        load_data(DataConfig(train=str(path)), tokenizer, report=False)


def test_a_template_that_raises_on_the_tool_role(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
                         "{{ raise_exception('roles must be system, user or assistant') }}{% endif %}"
                         "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}")
    with pytest.raises(DataError, match=r"cannot render assistant tool calls \(.*\) and tool results \(the template "
                                        r"raised: roles must be system, user or assistant\), as a probe"):
        Renderer(tok)(example({"messages": RECORD["messages"]}))


def test_inline_fallback_trains_smollm2_on_the_same_calls(tokenizer, tmp_path):
    ex = example(RECORD, tool_format="inline")
    assert [m["role"] for m in ex] == ["system", "user", "assistant", "user", "assistant"]
    sample = Renderer(tokenizer)(ex)
    full = tokenizer.apply_chat_template(ex, tokenize=False)
    assert sample["input_ids"] == tokenizer(full, add_special_tokens=False)["input_ids"]
    assert trained_runs(sample, tokenizer) == [call_text("get_weather", city="Paris") + END,
                                               "It is 18 C and sunny in Paris." + END]
    prompt = untrained_text(sample, tokenizer)
    assert json.dumps(WEATHER) in prompt and "<tool_response>\n18 C, sunny\n</tool_response>" in prompt
    # through load_data, a record ending in a call is kept (the call is its answer), not skipped as empty
    path = write_jsonl(tmp_path / "t.jsonl", [RECORD, {**RECORD, "messages": RECORD["messages"][:2]}])
    splits = load_data(DataConfig(train=str(path), tool_format="inline", assistant_turns="last"), tokenizer,
                       report=False)
    assert len(splits.train) == 2
    assert trained_runs(splits.train[1], tokenizer) == [call_text("get_weather", city="Paris") + END]


def test_inline_merges_into_the_system_prompt_and_groups_results():
    messages = example(PARALLEL)
    out = inline_tools(list(messages), messages.tools)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user", "assistant"]
    assert out[0]["content"].startswith("Answer briefly.\n\nYou can call these tools")
    assert out[3]["content"] == ('<tool_response>\n-3 C, snow\n</tool_response>\n'
                                 '<tool_response>\n{"time": "14:05"}\n</tool_response>')
    assert out[2]["content"] == ("Let me look both up.\n" + call_text("get_weather", city="Oslo") + "\n"
                                 + call_text("get_time", city="Oslo"))
    assert all(set(m) == {"role", "content"} for m in out)


def test_a_record_ending_in_a_call_is_kept_by_load_data(tool_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [RECORD, {**RECORD, "messages": RECORD["messages"][:2]}])
    splits = load_data(DataConfig(train=str(path), assistant_turns="last"), tool_tokenizer, report=False)
    assert len(splits.train) == 2 and splits.stats["train"]["skipped"] == {}
    assert trained_runs(splits.train[1], tool_tokenizer) == [call_text("get_weather", city="Paris") + END]


# --------------------------------------------------------------------------------------------------
# bad records: one line naming the record and the field


def _with(index, **changes):
    messages = copy.deepcopy(RECORD["messages"])
    messages[index] = {**messages[index], **changes}
    return {"tools": RECORD["tools"], "messages": messages}


BAD = [
    (_with(1, tool_calls=[call("get_wether", city="Paris")]),
     r"messages\[1\]\.tool_calls\[0\] calls 'get_wether', which is not among the tools \[get_time, get_weather\]"),
    (_with(1, tool_calls=[{"function": {"name": "get_weather", "arguments": "{city: Paris}"}}]),
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments is a string but not valid JSON"),
    (_with(1, tool_calls=[{"function": {"name": "get_weather", "arguments": [1]}}]),
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments is list; expected an object"),
    (_with(1, tool_calls={}), r"messages\[1\]\.tool_calls must be a non-empty list"),
    (_with(1, tool_calls=[]), r"messages\[1\]\.content is missing"),  # [] is no call (parquet fills it in)
    (_with(0, tool_calls=[call("get_weather", city="Paris")]),
     r"messages\[0\] has tool_calls but role 'user'; only assistant messages call tools"),
    (_with(1, tool_calls=None, role="tool", content="x"), r"messages\[1\] is a tool result, but no assistant tool call comes before it"),
    (_with(1, tool_calls=None), r"messages\[1\]\.content is missing; expected a string"),
    ({**RECORD, "tools": {"name": "x"}}, r"field 'tools' is dict; expected a list of tool JSON schemas"),
    ({**RECORD, "tools": [{"description": "no name"}]}, r"tools\[0\]\.name is missing"),
    ({**RECORD, "tools": [WEATHER, WEATHER]}, r"tools\[1\]\.function\.name 'get_weather' is declared twice"),
    ({**RECORD, "tools": "[{"}, r"field 'tools' is a string but not valid JSON"),
]


@pytest.mark.parametrize("record,message", BAD)
def test_bad_tool_records(record, message):
    with pytest.raises(DataError, match="^mem.jsonl:1: " + message):
        example(record)


def test_tools_column_mapping(tool_tokenizer):
    mapped = {"functions": RECORD["tools"], "messages": RECORD["messages"]}
    a = Renderer(tool_tokenizer)(example(mapped, columns={"tools": "functions"}))
    assert a == Renderer(tool_tokenizer)(example(RECORD))


# --------------------------------------------------------------------------------------------------
# preference pairs keep their tool calls

PAIR = {
    "tools": [WEATHER, TIME],
    "prompt": [{"role": "user", "content": "What time is it in Lima?"}],
    "chosen": [{"role": "assistant", "content": "", "tool_calls": [call("get_time", city="Lima")]}],
    "rejected": [{"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Lima")]}],
}


def render_pair_(tokenizer, record, **cfg):
    return render_pair(Renderer(tokenizer, assistant_turns="last"), record, "mem.jsonl:1", DataConfig(**cfg))


def test_preference_pair_of_calls_keeps_both_calls(tool_tokenizer):
    pair = render_pair_(tool_tokenizer, PAIR)
    assert trained_runs(pair["chosen"], tool_tokenizer) == [call_text("get_time", city="Lima") + END]
    assert trained_runs(pair["rejected"], tool_tokenizer) == [call_text("get_weather", city="Lima") + END]
    k = next(i for i, w in enumerate(pair["chosen"]["weights"]) if w)
    assert pair["chosen"]["input_ids"][:k] == pair["rejected"]["input_ids"][:k]  # the same prompt, tools included
    assert '"name": "get_time"' in tool_tokenizer.decode(pair["chosen"]["input_ids"][:k])


def test_preference_after_a_tool_result_and_with_the_inline_fallback(tool_tokenizer, tokenizer):
    record = {"tools": [WEATHER], "messages": RECORD["messages"][:3],
              "chosen": "It is 18 C and sunny.", "rejected": {"role": "assistant", "content": "I cannot know."}}
    pair = render_pair_(tool_tokenizer, record)
    assert trained_runs(pair["chosen"], tool_tokenizer) == ["It is 18 C and sunny." + END]
    prompt = tool_tokenizer.decode(pair["rejected"]["input_ids"])
    assert call_text("get_weather", city="Paris") in prompt and "<tool_response>\n18 C, sunny" in prompt
    # SmolLM2 refuses the calls; with data.tool_format=inline it trains them as text
    with pytest.raises(DataError, match=r"^mem.jsonl:1: chosen: the model's chat template cannot render the tools"):
        render_pair_(tokenizer, PAIR)
    pair = render_pair_(tokenizer, PAIR, tool_format="inline")
    assert trained_runs(pair["chosen"], tokenizer) == [call_text("get_time", city="Lima") + END]
    assert trained_runs(pair["rejected"], tokenizer) == [call_text("get_weather", city="Lima") + END]


def test_preference_pair_errors(tool_tokenizer, tmp_path):
    same = {**PAIR, "rejected": PAIR["chosen"]}
    with pytest.raises(DataError, match=r"^mem.jsonl:1: 'chosen' == 'rejected': the two answers are the same"):
        render_pair_(tool_tokenizer, same)
    undeclared = {**PAIR, "tools": [WEATHER]}
    with pytest.raises(DataError, match=r"^mem.jsonl:1: the 'chosen' conversation\[1\]\.tool_calls\[0\] calls 'get_time'"):
        render_pair_(tool_tokenizer, undeclared)
    path = write_jsonl(tmp_path / "p.jsonl", [PAIR, {**PAIR, "prompt": "Time in Quito?",
                                                     "chosen": [{"role": "assistant", "tool_calls": [call("get_time", city="Quito")]}]}])
    pairs = load_pairs(DataConfig(train=str(path)), tool_tokenizer, report=False)
    assert len(pairs.train) == 2 and pairs.stats["train"]["chosen_trained"] > 0


# --------------------------------------------------------------------------------------------------
# end to end: a short LoRA run and a short DPO run of a tiny model whose template renders tools


@pytest.fixture(scope="module")
def tool_model_dir(tool_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-tool-model")
    make_tiny_model(tool_tokenizer).save_pretrained(path)
    tool_tokenizer.save_pretrained(path)
    return path


def weather_chats(n):
    rows = []
    for i in range(n):
        city = ["Paris", "Oslo", "Lima", "Quito"][i % 4]
        messages = copy.deepcopy(RECORD["messages"])
        messages[0]["content"] = f"Weather in {city}?"
        messages[1]["tool_calls"] = [call("get_weather", city=city)]
        messages[2]["content"] = f"{10 + i} C"
        messages[3]["content"] = f"It is {10 + i} C in {city}."
        rows.append({"tools": RECORD["tools"], "messages": messages})
    return rows


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_training_on_tool_chats(tmp_path, tool_model_dir, objective):
    from tests.conftest import train_losses
    from tunesmith.recipe import load_recipe
    from tunesmith.train.loop import train

    if objective == "sft":
        rows = weather_chats(16)
    else:
        rows = [{**PAIR, "prompt": f"Time in {c}?",
                 "chosen": [{"role": "assistant", "tool_calls": [call("get_time", city=c)]}],
                 "rejected": [{"role": "assistant", "tool_calls": [call("get_weather", city=c)]}]}
                for c in ["Lima", "Oslo", "Perth", "Quito", "Paris", "Osaka", "Tallinn", "Nairobi"]]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    recipe = load_recipe(None, [
        f"model.name={tool_model_dir}", f"data.train={data}", f"output_dir={tmp_path / 'runs'}", "name=t",
        f"objective.name={objective}", "train.batch_tokens=1024", "train.steps=4", "train.precision=fp32",
        "train.lr=1e-2", "train.warmup=0", "data.max_length=512"])
    result = train(recipe)
    assert result.status == "completed" and result.step == 4
    losses = train_losses(result.run_dir)
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_rewritten_messages_keep_their_tools_and_round_trip(tool_tokenizer, tmp_path):
    """Code that edits an example's messages (data prepare's cleaning) keeps the tools with `like`,
    and `as_record` writes a record that reads back as the same example and the same tokens."""
    from tunesmith.data.tools import as_record, like

    ex = example(PARALLEL)
    edited = like(ex, [{**m, "content": m["content"].upper()} for m in ex])
    assert edited.tools == ex.tools and edited[1]["content"] == "WEATHER AND TIME IN OSLO?"
    plain = example({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})
    assert type(like(plain, list(plain))) is list
    back = example(json.loads(json.dumps(as_record(ex))))
    assert back == ex and back.tools == ex.tools
    assert Renderer(tool_tokenizer)(back) == Renderer(tool_tokenizer)(ex)
    assert as_record("plain text") == {"text": "plain text"}
