"""The `plan` verb (`tunesmith.plan`)."""
from __future__ import annotations


def add_plan_verb(sub) -> None:
    """The `plan` subcommand."""
    p = sub.add_parser("plan", help="pick method and settings for a time/memory budget (in progress)")
    p.set_defaults(fn=lambda args: 2)
