"""The context-extension table: perplexity at L/2, L and 2L from `tunesmith eval --task position-ppl`
results, one row per model variant.

    python benchmarks/long_context/extension_table.py base=ppl-base pi=ppl-pi longlora=ppl-longlora \
        --at 4096,8192,16384 > table.md

Each NAME=FOLDER holds a positions.json; the value at a position p is the perplexity of the bucket that
ends at p (with --bucket 2k: positions p-2k..p), so 2L's column is the loss on the last positions of
the stretched context, where an unextended model breaks down."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def load(folder: str) -> dict[int, dict]:
    rows = json.loads((Path(folder) / "positions.json").read_text())["buckets"]
    return {r["end"]: r for r in rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="NAME=FOLDER with a positions.json")
    p.add_argument("--at", default="4096,8192,16384", help="bucket ends to report (tokens)")
    args = p.parse_args()
    at = [int(x) for x in args.at.split(",")]
    print("| variant | " + " | ".join(f"ppl at {a // 1024}k" for a in at) + " | mean loss, all positions |")
    print("|---|" + "---:|" * (len(at) + 1))
    for spec in args.runs:
        name, _, folder = spec.partition("=")
        rows = load(folder)
        cells = [f"{rows[a]['perplexity']:.2f}" if a in rows and rows[a]["loss"] is not None else "–" for a in at]
        total = sum(r["loss"] * r["tokens"] for r in rows.values() if r["loss"] is not None)
        count = sum(r["tokens"] for r in rows.values() if r["loss"] is not None)
        print(f"| {name} | " + " | ".join(cells) + f" | {total / count:.3f} (ppl {math.exp(total / count):.2f}) |")


if __name__ == "__main__":
    main()
