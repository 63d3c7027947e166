"""The `dashboard` verb: a local web page of runs, their live curves and evaluations (`tunesmith.dashboard`).

    tunesmith dashboard runs/                       # http://127.0.0.1:8765/
    tunesmith dashboard runs/ --allow-train         # with a form that starts `tunesmith train`
"""
from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_BENCH = Path("benchmarks/methods/results.json")


def cmd_dashboard(args) -> int:
    from ..dashboard import DashboardError, dashboard

    bench = args.bench if args.bench is not None else (DEFAULT_BENCH if DEFAULT_BENCH.is_file() else None)
    try:
        dashboard(args.runs, host=args.host, port=args.port, bench=bench, allow_train=args.allow_train,
                  live_window=args.live_window)
    except DashboardError as e:
        print(f"tunesmith: error: {e}", file=sys.stderr)
        return 2
    return 0


def add_dashboard_verb(sub) -> None:
    """The `dashboard` subcommand."""
    p = sub.add_parser("dashboard", help="a local web page of runs: status, live curves, comparisons, evaluations")
    p.add_argument("runs", nargs="?", default="runs", help="the folder that holds the run folders (default: runs)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--bench", default=None, metavar="FILE",
                   help=f"a benchmark results.json shown as a table (default: {DEFAULT_BENCH} if it exists here)")
    p.add_argument("--allow-train", action="store_true",
                   help="show a recipe form that starts `tunesmith train` in the runs folder (off by default)")
    p.add_argument("--live-window", type=float, default=None, metavar="SECONDS",
                   help="a run whose files changed this recently counts as running (default: 120)")
    p.set_defaults(fn=cmd_dashboard)
