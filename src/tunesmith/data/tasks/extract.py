"""The `json` task: pull the fields of an order described in free text into a JSON object.

    task = ExtractTask(seed=0)
    ex = task.examples("test")[0]
    ex.prompt      # 'Extract the order as JSON with keys city, day, item, name, quantity.\\nText: ...'
    ex.reference   # '{"city": "Oslo", "day": "Monday", "item": "desk lamp", "name": "Anna Novak", "quantity": 3}'

Orders are written in 20 phrasings from 4 styles (narrative, terse note, customer message, log
line); splits are disjoint in phrasings and in values, as for `sql`. An answer is correct when its
first JSON object has exactly the gold fields and values; the partial score is the share of fields
right.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .base import Example, Verdict
from ._common import CITIES, FIRST_NAMES, LAST_NAMES, GeneratedTask, ValueSplit, generate_splits, rng_for

FIELDS = ("city", "day", "item", "name", "quantity")
ITEMS = [  # no word is shared by two items, so a held-out item shares no word with a training one
    "desk lamp", "office chair", "printer paper", "coffee beans", "water bottle", "USB cable", "notebook",
    "wall clock", "bookshelf", "monitor arm", "laptop stand", "ceiling fan", "shredder", "whiteboard",
    "label maker", "phone charger", "keyboard", "mouse pad", "filing cabinet", "webcam", "headset",
    "coat rack", "tea kettle", "floor mat", "power strip", "stapler", "calculator", "doormat",
    "reading glasses", "footrest",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
QUANTITIES = range(1, 51)
PROMPT = f"Extract the order as JSON with keys {', '.join(FIELDS)}.\nText: {{text}}"


@dataclass(frozen=True)
class Family:
    name: str
    phrasings: tuple[str, ...]


FAMILIES = [
    Family("narrative", (
        "{name} ordered {quantity} units of {item}, to be delivered to {city} on {day}.",
        "On {day}, {name} from {city} bought {quantity} units of {item}.",
        "{name} wants {quantity} units of {item} shipped to {city} by {day}.",
        "A customer named {name} asked for {quantity} units of {item}; delivery to {city} on {day}.",
        "{quantity} units of {item} were ordered by {name}, who lives in {city}, for {day}.")),
    Family("note", (
        "Order note. Customer: {name}. Product: {item}. Qty: {quantity}. City: {city}. Day: {day}.",
        "cust={name}; item={item}; qty={quantity}; city={city}; day={day}",
        "{name} | {item} | qty {quantity} | {city} | {day}",
        "Ship {quantity} x {item} to {name}, {city}, on {day}.",
        "Item: {item} (quantity {quantity}) for {name} in {city}, due {day}.")),
    Family("message", (
        "Hi, this is {name} from {city}. Could I get {quantity} units of {item} on {day}?",
        "Hello! {name} here. Please send {quantity} units of {item} to {city} by {day}.",
        "I'm {name} and I'd like {quantity} units of {item} delivered in {city} on {day}.",
        "Dear shop, please deliver {quantity} units of {item} to me in {city} on {day}. Thanks, {name}",
        "{name} writing: I need {quantity} units of {item} in {city} by {day}.")),
    Family("log", (
        "Delivery on {day} to {city}: {quantity} units of {item}, requested by {name}.",
        "{day}: the {city} branch got an order from {name} for {quantity} units of {item}.",
        "Requested by {name} for {day}: {item}, {quantity} units, destination {city}.",
        "For {day} delivery in {city}, {name} placed an order of {quantity} units of {item}.",
        "New order ({day}) - {quantity} units of {item} for {name}, {city}.")),
]


def first_json_object(text: str) -> dict | None:
    """The first JSON object in `text` (e.g. inside a ```json block), or None."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def json_answer_end(text: str) -> int | None:
    """The `json` task's stop rule: the end of the JSON object that starts at the answer's first `{`,
    once it is complete. That object is what `first_json_object` scores whatever follows. While the
    first `{` does not parse (unfinished, or not JSON at all, when a later object might count): None."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        _, end = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        return None
    return end


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


class ExtractTask(GeneratedTask):
    """Structured extraction of orders to JSON; see the module docstring."""
    name = "json"
    metric = "exact_match"
    system_prompt = "Answer with one JSON object."
    answer_end = staticmethod(json_answer_end)

    def __init__(self, seed: int = 0, n_train: int = 800, n_validation: int = 100, n_test: int = 200):
        super().__init__(seed, n_train, n_validation, n_test)

    def score(self, prediction: str, example: Example) -> Verdict:
        """Correct iff the first JSON object equals the gold object; score = fields right / fields
        in either (a missing, wrong or extra key each cost one)."""
        gold = json.loads(example.reference)
        pred = first_json_object(prediction)
        if pred is None:
            return Verdict(False, 0.0, "unparsable JSON: no JSON object in the answer", prediction.strip())
        keys = set(gold) | set(pred)
        right = sum(k in gold and k in pred and _same(pred[k], gold[k]) for k in keys)
        ok = right == len(keys)
        extracted = json.dumps(pred, sort_keys=True)
        return Verdict(ok, right / len(keys), None if ok else "wrong fields", extracted)

    def _generate(self) -> dict[str, list[Example]]:
        values = ValueSplit(rng_for("json", self.seed, "values"))
        for kind, domain in [("first", FIRST_NAMES), ("last", LAST_NAMES), ("city", CITIES), ("item", ITEMS),
                             ("day", DAYS), ("quantity", QUANTITIES)]:
            values.add(kind, domain)
        pools = values.pools

        def draw_for(split, rng):
            def draw(t):
                template_id, family, i = t
                fields = {k: rng.choice(pools[k][split]) for k in ("city", "day", "item", "quantity")}
                fields["name"] = f"{rng.choice(pools['first'][split])} {rng.choice(pools['last'][split])}"
                text = family.phrasings[i].format(**fields)
                text = text[0].upper() + text[1:]
                reference = json.dumps(fields, sort_keys=True)
                meta = {"template": template_id, "family": family.name, "fields": fields,
                        "values": [fields[k] for k in ("name", "item", "quantity", "city", "day")]}
                return text, (PROMPT.format(text=text), reference, meta)
            return draw

        return generate_splits("json", self.seed, FAMILIES, self.sizes, draw_for)
