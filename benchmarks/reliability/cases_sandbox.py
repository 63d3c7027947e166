"""Reliability cases for the code scorer: every attack program of tests/test_sandbox_attacks.py
scored through the real `score_python`, plus the honest programs that must still pass.

An attack that scores as correct is a forged pass. A case is ok when the verdict and its reason
are the ones the attack table expects.
"""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

from common import ROOT, Case, Outcome, has_traceback


def _attacks():
    spec = importlib.util.spec_from_file_location("sandbox_attacks", ROOT / "tests" / "test_sandbox_attacks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


_table = _attacks()


def _case(attack, honest: bool) -> Case:
    def run(tmp: Path) -> Outcome:
        verdict, ok, got = _table.judge(attack)
        forged = verdict.correct and not honest
        if attack is _table.DAEMON:  # it may pass; what counts is that nothing of it survives
            deadline = time.monotonic() + 3
            while _table.leftover_processes(_table.DAEMON_TOKEN) and time.monotonic() < deadline:
                time.sleep(0.05)
            left = _table.leftover_processes(_table.DAEMON_TOKEN)
            ok, forged = ok and not left, False
            got += f"; {len(left)} process(es) left"
        return Outcome(got=got, ok=ok and not forged, forged=forged,
                       traceback=has_traceback(verdict.error or ""))

    expected = attack.expected + ("; no process left" if attack is _table.DAEMON else "")
    return Case(name=attack.name, group="sandbox", expected=expected, run=run)


CASES: list[Case] = [_case(a, honest=False) for a in _table.ATTACKS] + [_case(a, honest=True) for a in _table.HONEST]
