"""Replay every hostile input and fault tunesmith must answer well, and print a table:
case, expected, got — with totals of tracebacks, forged passes, poisoned checkpoints and silent drops.

    python benchmarks/reliability/run.py                # every case
    python benchmarks/reliability/run.py -k sandbox     # cases whose group or name contains "sandbox"

Writes results.md and results.json beside this file (only for a full run).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import Case, Outcome  # noqa: E402


def collect() -> list[Case]:
    cases = []
    for path in sorted(HERE.glob("cases_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cases += module.CASES
    return cases


def run_case(case: Case) -> tuple[Outcome, float]:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tunesmith-rel-") as tmp:
        try:
            outcome = case.run(Path(tmp))
        except Exception as e:  # the harness itself hit a traceback: the case failed
            tb = traceback.format_exc(limit=3)
            outcome = Outcome(got=f"{type(e).__name__}: {e}"[:160], ok=False, traceback=True)
            print(tb, file=sys.stderr)
        outcome.got = outcome.got.replace(tmp, "<tmp>")  # the table speaks of the case, not this machine
    return outcome, time.perf_counter() - t0


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", default="", help="only cases whose group or name contains this")
    args = ap.parse_args()
    cases = [c for c in collect() if args.k in c.group or args.k in c.name]
    rows = []
    for i, case in enumerate(cases, 1):
        outcome, dt = run_case(case)
        mark = "ok " if outcome.ok else "BAD"
        print(f"[{i}/{len(cases)}] {mark} {case.group}/{case.name} ({dt:.1f} s): {outcome.got}", flush=True)
        rows.append({"group": case.group, "case": case.name, "expected": case.expected, "got": outcome.got,
                     "ok": outcome.ok, "traceback": outcome.traceback, "forged": outcome.forged,
                     "poisoned": outcome.poisoned, "silent_drop": outcome.silent_drop, "seconds": round(dt, 1)})
    totals = {"cases": len(rows), "as expected": sum(r["ok"] for r in rows),
              "tracebacks": sum(r["traceback"] for r in rows), "forged passes": sum(r["forged"] for r in rows),
              "poisoned checkpoints": sum(r["poisoned"] for r in rows),
              "silent drops": sum(r["silent_drop"] for r in rows)}
    lines = ["| # | group | case | expected | got | as expected |", "|---|---|---|---|---|---|"]
    lines += [f"| {i} | {r['group']} | {cell(r['case'])} | {cell(r['expected'])} | {cell(r['got'])} | "
              f"{'yes' if r['ok'] else '**no**'} |" for i, r in enumerate(rows, 1)]
    lines += ["", " · ".join(f"{k}: {v}" for k, v in totals.items())]
    table = "\n".join(lines)
    print("\n" + table)
    if not args.k:
        (HERE / "results.md").write_text("# Reliability cases\n\n    python benchmarks/reliability/run.py\n\n"
                                         + table + "\n")
        (HERE / "results.json").write_text(json.dumps({"totals": totals, "cases": rows}, indent=1) + "\n")
    bad = totals["cases"] - totals["as expected"] + totals["tracebacks"] + totals["forged passes"] \
        + totals["poisoned checkpoints"] + totals["silent drops"]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
