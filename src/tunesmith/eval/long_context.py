"""Long-context retrieval prompts: a fact hidden at a chosen depth of a haystack sized in tokens.

    prompt = build_prompt("passkey", tokenizer, length=4096, depth=0.5, seed=0)
    grid = run_grid(model, tokenizer, "passkey", [1024, 4096], [0, 0.5, 1], samples=2)   # eval/long_grid.py

Three tasks, each prompt deterministic given (task, length, depth, seed):
- `passkey` (Mohtashami & Jaggi, 2023): the instruction, the filler "The grass is green. ..." repeated,
  the line "The pass key is NNNNN. Remember it. NNNNN is the pass key." at depth d, and "What is the
  pass key?". Correct when the 5-digit key appears in the answer.
- `needle` (multi-needle, as in RULER, Hsieh et al., 2024): k lines "The special magic number for
  <word> is NNNNNNN." in a haystack of varied sentences from a small template grammar; the asked one
  sits at depth d, the k-1 distractors at seeded random depths. Correct when the first number of the
  answer is the asked one.
- `kv` (Liu et al., 2023, "Lost in the Middle"): a JSON object of random UUID keys and values; the
  asked key is the pair at depth d. Correct when the first UUID of the answer is its value.

Depth d is the fraction of the haystack before the fact (0: first, 1: last). The prompt goes through
the model's chat template as one user message and the assistant's reply is primed ("The pass key
is", "The special magic number for <word> is", 'The corresponding value is "'): small instruct
models then answer with the fact instead of a preamble, so a few new tokens settle the score. A
tokenizer without a chat template gets the raw text followed by the same primer. The haystack is
sized with the tokenizer so that the prompt plus the answer's `max_new_tokens` come to `length`
tokens (at most one haystack unit less), so a prompt at a model's full context still fits in it.
"""
from __future__ import annotations

import json
import random
import re
import uuid
from dataclasses import dataclass

from .runner import EvalError

LONG_TASKS = ("passkey", "needle", "kv")
NEW_TOKENS = {"passkey": 8, "needle": 12, "kv": 40}  # the primed answer: the fact plus a little slack

PASSKEY_INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                       "I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NEEDLE_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                      "I will quiz you about the numbers afterwards.")
KV_INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."

# The needle haystack's grammar: subject, verb, object, ending; 10^4 plain sentences.
SUBJECTS = ("The old miller", "A young sailor", "The village baker", "Her cousin", "The quiet scholar",
            "A travelling merchant", "The farmer's daughter", "The captain", "An elderly priest", "The blacksmith")
VERBS = ("walked to", "wrote a letter about", "spoke at length of", "dreamed of", "painted", "carried bread to",
         "sang about", "looked across", "remembered", "argued about")
OBJECTS = ("the river", "the northern hills", "the harbour", "the market square", "the orchard", "the ruined chapel",
           "the long road", "the winter fields", "the lighthouse", "the edge of the forest")
ENDINGS = ("before dawn.", "in the rain.", "for many years.", "without a word.", "as the bells rang.",
           "while the fire burned low.", "on the first day of spring.", "after the harvest.", "with great care.",
           "under a pale moon.")
NEEDLE_WORDS = ("amber", "falcon", "harbor", "lantern", "meadow", "quartz", "saffron", "thistle", "velvet", "willow",
                "cobalt", "ember", "glacier", "juniper", "marble", "nectar", "orchid", "pepper", "raven", "sierra")

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass
class LongPrompt:
    """One rendered prompt: its text (template and primer included), token ids, and the answer sought."""

    task: str
    length: int
    depth: float
    text: str
    ids: list[int]
    expected: str


def parse_lengths(text: str) -> list[int]:
    """Token lengths from `1k,2k,4k` (k = 1024) or plain numbers, in order, repeats dropped."""
    lengths: list[int] = []
    for item in str(text).split(","):
        item = item.strip().lower()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(k?)", item)
        if not m or float(m.group(1)) <= 0:
            raise EvalError(f"--lengths: expected token counts such as 1k,2k,4k (k = 1024), got {item!r}")
        n = int(float(m.group(1)) * (1024 if m.group(2) else 1))
        if n not in lengths:
            lengths.append(n)
    return lengths


def parse_depths(text: str) -> list[float]:
    """Depths from `0,0.25,0.5,0.75,1`: fractions of the haystack in [0, 1], in order, repeats dropped."""
    depths: list[float] = []
    for item in str(text).split(","):
        try:
            d = float(item)
        except ValueError:
            raise EvalError(f"--depths: expected fractions in [0, 1] such as 0,0.5,1, got {item.strip()!r}") from None
        if not 0 <= d <= 1:
            raise EvalError(f"--depths: {d:g} is outside [0, 1] (0 = start of the text, 1 = end)")
        if d not in depths:
            depths.append(d)
    return depths


def format_length(n: int) -> str:
    """1024 -> "1k", 1536 -> "1.5k", 1000 -> "1000": the spelling `--lengths` takes."""
    return f"{n / 1024:g}k" if n % 256 == 0 else str(n)


def score(task: str, answer: str, expected: str) -> bool:
    """passkey: the key appears in the answer; needle: its first number is the expected one; kv: its
    first UUID is the expected value."""
    if task == "passkey":
        return expected in answer
    if task == "needle":
        found = re.findall(r"\d+", answer)
    else:
        found = UUID_RE.findall(answer.lower())
    return bool(found) and found[0] == expected


def build_prompt(task: str, tokenizer, length: int, depth: float, seed: int = 0,
                 max_new_tokens: int | None = None, needles: int = 4) -> LongPrompt:
    """The prompt of `task` whose tokens plus `max_new_tokens` (default: the task's) come to about
    `length`, with the fact at `depth`; the same arguments always give the same prompt."""
    if task not in LONG_TASKS:
        raise EvalError(f"unknown long-context task {task!r}: one of {', '.join(LONG_TASKS)}")
    rng = random.Random(f"{task}|{length}|{depth}|{seed}")  # a string seed: stable across runs and platforms
    compose = {"passkey": _passkey, "needle": lambda r, d: _needle(r, d, needles), "kv": _kv}[task](rng, depth)
    budget = length - (NEW_TOKENS[task] if max_new_tokens is None else max_new_tokens)
    text, ids, expected = _fit(tokenizer, compose, budget, length)
    return LongPrompt(task, length, depth, text, ids, expected)


def _passkey(rng: random.Random, depth: float):
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."

    def compose(n: int):
        units = [FILLER[i % len(FILLER)] for i in range(n)]
        units.insert(round(depth * n), needle)
        user = f"{PASSKEY_INSTRUCTION}\n\n{' '.join(units)}\n\nWhat is the pass key?"
        return user, "The pass key is", key
    return compose


def _needle(rng: random.Random, depth: float, k: int):
    if not 1 <= k <= len(NEEDLE_WORDS):
        raise EvalError(f"needles: expected 1 to {len(NEEDLE_WORDS)} needles, got {k}")
    words = rng.sample(NEEDLE_WORDS, k)
    numbers = rng.sample(range(1_000_000, 10_000_000), k)
    at = [depth] + [rng.random() for _ in range(k - 1)]  # the asked needle first, distractors anywhere
    sentences: list[str] = []

    def compose(n: int):
        while len(sentences) < n:
            sentences.append(" ".join(rng.choice(part) for part in (SUBJECTS, VERBS, OBJECTS, ENDINGS)))
        units = sentences[:n]
        # Insert from the deepest down, so each insertion leaves the earlier positions where they were.
        for i in sorted(range(k), key=lambda i: (-at[i], i)):
            units.insert(round(at[i] * n), f"The special magic number for {words[i]} is {numbers[i]}.")
        question = f"What is the special magic number for {words[0]} mentioned in the provided text?"
        user = f"{NEEDLE_INSTRUCTION}\n\n{' '.join(units)}\n\n{question}"
        return user, f"The special magic number for {words[0]} mentioned in the provided text is", str(numbers[0])
    return compose


def _kv(rng: random.Random, depth: float):
    pairs: list[tuple[str, str]] = []

    def compose(n: int):
        n = max(n, 1)
        while len(pairs) < n:
            pairs.append(tuple(str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(2)))
        key, value = pairs[round(depth * (n - 1))]
        data = json.dumps(dict(pairs[:n]), indent=1)
        user = f"{KV_INSTRUCTION}\n\nJSON data:\n{data}\n\nKey: \"{key}\"\nCorresponding value:"
        return user, 'The corresponding value is "', value
    return compose


def render(tokenizer, user: str, primer: str) -> tuple[str, list[int]]:
    """The text the model continues (chat template with the assistant's turn opened, then `primer`;
    raw text without a template) and its token ids, encoded as generation encodes prompts."""
    from ..infer.generate import render_prompt

    templated = getattr(tokenizer, "chat_template", None) is not None
    text = render_prompt(tokenizer, user) + primer if templated else f"{user}\n\n{primer}"
    return text, tokenizer(text, add_special_tokens=not templated)["input_ids"]


def _fit(tokenizer, compose, budget: int, length: int):
    """(text, ids, expected) with the haystack unit count n whose prompt comes nearest `budget` tokens
    without passing it: a per-unit estimate from two probes, then corrections by the measured difference."""
    measure = {}

    def tokens(n: int) -> int:
        if n not in measure:
            user, primer, expected = compose(n)
            measure[n] = (*render(tokenizer, user, primer), expected)
        return len(measure[n][1])

    fixed, probe = tokens(1), 64
    per_unit = max((tokens(probe + 1) - fixed) / probe, 1e-3)
    if fixed > budget:
        raise EvalError(f"a {length}-token prompt is too short: the task's fixed text and answer take "
                        f"{fixed + length - budget} tokens")
    n = 1 + round((budget - fixed) / per_unit)
    for _ in range(6):  # the estimate is off by a few tokens where units merge; converges in 1-2 steps
        step = round((budget - tokens(n)) / per_unit)
        if step == 0:
            break
        n = max(1, n + step)
    while n > 1 and tokens(n) > budget:  # never over: the answer must still fit in `length`
        n -= 1
    return measure[n]
