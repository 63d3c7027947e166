"""Write examples/chat.jsonl: a small, deterministic chat dataset (unit conversions, answered in
one fixed style, some of them multi-turn) to try tunesmith on before bringing your own data.

    python examples/make_chat.py
"""
import json
import random
from pathlib import Path

UNITS = [  # (from, to, factor)
    ("kilometres", "metres", 1000), ("metres", "centimetres", 100), ("kilograms", "grams", 1000),
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("litres", "millilitres", 1000),
    ("days", "hours", 24), ("weeks", "days", 7), ("tonnes", "kilograms", 1000), ("feet", "inches", 12),
]
ASK = ["How many {to} are in {n} {frm}?", "Convert {n} {frm} to {to}.", "What is {n} {frm} in {to}?",
       "{n} {frm} is how many {to}?"]


def answer(n, frm, to, factor):
    return f"{n} {frm} × {factor} = {n * factor} {to}. Answer: {n * factor} {to}"


def main(path="examples/chat.jsonl", count=400, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        messages = []
        for _ in range(1 if i % 4 else 2):  # every 4th chat has two turns
            frm, to, factor = rng.choice(UNITS)
            n = rng.randint(2, 99)
            messages.append({"role": "user", "content": rng.choice(ASK).format(n=n, frm=frm, to=to)})
            messages.append({"role": "assistant", "content": answer(n, frm, to, factor)})
        rows.append({"messages": messages})
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} chats to {path}")


if __name__ == "__main__":
    main()
