"""Write examples/preference.jsonl: (prompt, chosen, rejected) triples — a right and a wrong unit
conversion — to try the preference objectives (DPO, IPO, hinge, SimPO, ORPO).

    python examples/make_preference.py
"""
import json
import random
from pathlib import Path

from make_chat import ASK, UNITS, answer


def main(path="examples/preference.jsonl", count=300, seed=1):
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        frm, to, factor = rng.choice(UNITS)
        n = rng.randint(2, 99)
        wrong = factor * rng.choice([10, 0.1]) if factor >= 10 else factor + rng.choice([1, 2])
        wrong = int(wrong) if float(wrong).is_integer() else wrong
        rows.append({"prompt": rng.choice(ASK).format(n=n, frm=frm, to=to),
                     "chosen": answer(n, frm, to, factor),
                     "rejected": answer(n, frm, to, wrong)})
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} preference pairs to {path}")


if __name__ == "__main__":
    main()
