"""Write examples/tools.jsonl (tool-calling chats) and examples/tools_preference.jsonl (pairs whose
answers are tool calls): unit conversions through a `convert` tool, a `weather` tool that some
chats use and small talk that needs no tool, so a model learns when to call and when to answer.

    python examples/make_tools.py

Train on SmolLM2, whose chat template does not render tools, with data.tool_format=inline.
"""
import json
import random
from pathlib import Path

from make_chat import ASK, UNITS

TOOLS = [
    {"type": "function", "function": {
        "name": "convert", "description": "Convert a quantity from one unit to another.",
        "parameters": {"type": "object", "required": ["value", "from_unit", "to_unit"], "properties": {
            "value": {"type": "number"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"}}}}},
    {"type": "function", "function": {
        "name": "weather", "description": "The current weather in a city.",
        "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}},
]
CITIES = ["Paris", "Oslo", "Lima", "Nairobi", "Osaka", "Quito", "Perth", "Tallinn"]
SKIES = ["sunny", "cloudy", "raining", "snowing", "windy"]
SMALL_TALK = [("Hello!", "Hello! I can convert units and look up the weather."),
              ("Thanks, that helps.", "You're welcome."),
              ("What can you do?", "I can convert between units and tell you the weather in a city.")]


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def conversion(rng):
    frm, to, factor = rng.choice(UNITS)
    n = rng.randint(2, 99)
    question = rng.choice(ASK).format(n=n, frm=frm, to=to)
    return question, call("convert", value=n, from_unit=frm, to_unit=to), {"value": n * factor, "unit": to}, \
        f"{n} {frm} is {n * factor} {to}."


def weather(rng):
    city, sky, temp = rng.choice(CITIES), rng.choice(SKIES), rng.randint(-5, 32)
    return f"What's the weather like in {city}?", call("weather", city=city), f"{temp} C, {sky}", \
        f"It is {temp} C and {sky} in {city}."


def chat(rng):
    kind = rng.random()
    if kind < 0.15:
        question, answer = rng.choice(SMALL_TALK)
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    question, tool_call, result, answer = (conversion if kind < 0.7 else weather)(rng)
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": "", "tool_calls": [tool_call]},
            {"role": "tool", "name": tool_call["function"]["name"],
             "content": result if isinstance(result, str) else json.dumps(result)},
            {"role": "assistant", "content": answer}]


def pair(rng):
    """Chosen calls the right tool with the right arguments; rejected swaps the units or the tool."""
    question, good, _, _ = conversion(rng)
    args = good["function"]["arguments"]
    if rng.random() < 0.5:
        bad = call("convert", value=args["value"], from_unit=args["to_unit"], to_unit=args["from_unit"])
    else:
        bad = call("weather", city=rng.choice(CITIES))
    return {"tools": TOOLS, "prompt": question,
            "chosen": [{"role": "assistant", "content": "", "tool_calls": [good]}],
            "rejected": [{"role": "assistant", "content": "", "tool_calls": [bad]}]}


def main(folder="examples", count=200, pairs=100, seed=2):
    rng = random.Random(seed)
    rows = [{"tools": TOOLS, "messages": chat(rng)} for _ in range(count)]
    Path(folder, "tools.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefs = [pair(rng) for _ in range(pairs)]
    Path(folder, "tools_preference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    print(f"wrote {len(rows)} tool-calling chats to {folder}/tools.jsonl and {len(prefs)} pairs to "
          f"{folder}/tools_preference.jsonl")


if __name__ == "__main__":
    main()
