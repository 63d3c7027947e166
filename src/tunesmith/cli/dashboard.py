"""The `dashboard` verb (`tunesmith.dashboard`)."""
from __future__ import annotations


def add_dashboard_verb(sub) -> None:
    """The `dashboard` subcommand."""
    p = sub.add_parser("dashboard", help="a local web page of runs (in progress)")
    p.set_defaults(fn=lambda args: 2)
