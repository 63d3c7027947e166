"""Which real facts does SmolLM2-135M-Instruct know? Asks every candidate in knowledge_data.REAL_FACTS
in each of its relation's question wordings, with the knowledge task's system prompt and no context
(greedy), and prints the facts answered right in every wording: the PARAMETRIC list of knowledge_data.

    python benchmarks/synthesis/knowledge/check_parametric.py [--model smollm2-135m-instruct]
"""
from __future__ import annotations

import argparse

from tunesmith.data.tasks import knowledge_data as kd
from tunesmith.data.tasks.knowledge import SYSTEM, answer_line, mentions, render
from tunesmith.infer.generate import generate
from tunesmith.models.load import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()
    model, tok = load_model(args.model, "fp32")
    model.eval()
    asks = [(f, q) for f in kd.REAL_FACTS for q in kd.RELATIONS[f[0]].questions]
    prompts = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": render(q.format(s=f[1]))}]
               for f, q in asks]
    outs = generate(model, tok, prompts, max_new_tokens=24, batch_size=16)
    right: dict[tuple, list[bool]] = {}
    for (f, q), out in zip(asks, outs):
        ok = mentions(answer_line(out), f[2])
        right.setdefault(f, []).append(ok)
        print(f"{'ok ' if ok else '-- '} {q.format(s=f[1])!r} -> {answer_line(out)!r}")
    known = [f for f in kd.REAL_FACTS if all(right[f])]
    print(f"\n{len(known)} of {len(kd.REAL_FACTS)} facts answered right in every wording:")
    print("PARAMETRIC = (")
    for r, s, _ in known:
        print(f"    ({r!r}, {s!r}),")
    print(")")


if __name__ == "__main__":
    main()
