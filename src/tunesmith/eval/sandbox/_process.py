"""Parent side, during and after a run: start one sandboxed child, read its output, kill
everything it started, and say how it ended."""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

from . import _setup
from ._setup import Plan, warn_once

EXIT_GRACE_S = 1.0
"How long to keep reading output after the child exits, in case stray processes still hold it."
REAP_WAIT_S = 3.0
"How long to wait for killed leftovers to disappear (init may reap orphaned zombies lazily)."


@dataclass
class SandboxResult:
    ok: bool
    "True iff the program exited with status 0 within its limits."
    returncode: int | None
    "Exit status; negative for death by signal (-9 after a timeout kill); None if it never started."
    stdout: str
    stderr: str
    "On failure its last line says why: the program's exception, or a `[sandbox] ...` note."
    reason: str | None
    "None on success, else one of timeout, cpu-time, memory, network, processes, error."
    wall_s: float
    isolation: tuple[str, ...] = ()
    "What the sandbox achieved, e.g. bwrap, netns, pidns, uid=65534, rlimits, private-tmp."


class Sandbox:
    """One child in its own box: the launcher, which execs bubblewrap (or the Python child)
    under the same pid, in a session of its own."""

    def __init__(self, plan: Plan, files: dict[str, str], stdin: str, limits: dict, script: str,
                 args: list[str], pass_fds: tuple[int, ...] = ()):
        self.plan, self.limits, self.pass_fds = plan, limits, pass_fds
        self.box = _setup.make_box(files, stdin, plan)
        self.script, self.args = script, args
        self.proc: subprocess.Popen | None = None
        self.out = self.err = ""
        self.timed_out = self.stopped = False
        self.started_at = time.monotonic()

    @property
    def work(self) -> str:
        return os.path.join(self.box, "work")

    def start(self) -> bool:
        plan, box = self.plan, self.box
        mounts, bwrap = _setup.binds(plan, box)
        executable, bind_env = plan.executable, {}
        if plan.bind_prefix and not plan.bwrap:
            executable = os.path.join(box, "python") + plan.executable[len(plan.prefix):]
            # An absolute RUNPATH (pyenv builds) would point libpython back at the unreadable prefix.
            bind_env = {"LD_LIBRARY_PATH": os.path.join(box, "python", "lib")}
        args = [arg.replace("@work", self.work) for arg in self.args]  # "@status": the launcher's fd
        child = [executable, "-I", "-S", "-B", "-X", "utf8", os.path.join(box, self.script), *args]
        config = {
            "launch": os.path.join(box, "launch"), "status": os.path.join(box, "status"), "box": box,
            "uid": plan.uid, "gid": plan.gid, "executable": plan.executable, "binds": mounts,
            "bind_env": bind_env, "bwrap": _setup.bwrap_argv(plan, box, bwrap) if bwrap else None,
            "child": child, "limits": self.limits, "keep_fds": list(self.pass_fds),
        }
        argv = [plan.executable, "-I", "-S", "-B", os.path.join(box, "launcher.py"), json.dumps(config)]
        # No preexec_fn: it is unsafe in a multi-threaded parent (torch's thread pools), so all
        # setup happens in the launcher, a fresh single-threaded process.
        try:
            with open(os.path.join(box, "stdin"), "rb") as stdin:
                self.proc = subprocess.Popen(
                    argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.work,
                    env=_setup.environment(self.work), close_fds=True, start_new_session=True,
                    pass_fds=self.pass_fds,
                )
        except OSError as exc:
            warn_once(f"sandbox: could not start the interpreter: {exc}")
            return False
        return True

    def collect(self, deadline: float, cap: int, stop: threading.Event | None = None) -> None:
        """Read stdout/stderr until both close or the deadline passes (or `stop` is set), keeping
        `cap` bytes of each. Reading both pipes as data arrives keeps a chatty child from blocking
        on a full pipe; the cap keeps an endless printer from filling our memory (the excess is
        counted, dropped). Everything the child started is dead afterwards."""
        proc = self.proc
        kept = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
        dropped = dict.fromkeys(kept, 0)
        selector = selectors.DefaultSelector()
        for fd in kept:
            selector.register(fd, selectors.EVENT_READ)
        exited_at = None
        while selector.get_map():
            now = time.monotonic()
            if exited_at is None and self.exited():
                exited_at = now
                self.kill_all()  # leftover processes may hold the pipes open forever
            if exited_at is None and stop is not None and stop.is_set() and now < deadline:
                self.stopped, exited_at = True, now  # its partner is done: a short grace, then the end
            stop_at = deadline if exited_at is None else min(deadline, exited_at + EXIT_GRACE_S)
            if now >= stop_at:
                self.timed_out = exited_at is None
                break
            for key, _ in selector.select(timeout=min(stop_at - now, 0.1)):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                room = max(cap - len(kept[key.fd]), 0)
                kept[key.fd] += chunk[:room]
                dropped[key.fd] += len(chunk) - len(chunk[:room])
        selector.close()
        if not self.timed_out and not self.stopped:  # output closed (stdout may be closed early)
            self.timed_out = not self.exits_by(deadline)
        self.kill_all()
        proc.stdout.close()
        proc.stderr.close()
        self.out, self.err = (_decode(kept[fd], dropped[fd]) for fd in kept)

    def finish(self, timeout_s: float) -> SandboxResult:
        """Reap, classify, delete the box."""
        try:
            returncode, cpu_used = self.reap()
            launch, events = self.launch_info(), _read_lines(os.path.join(self.box, "status"))
        finally:
            _setup.remove(self.box)
        if self.plan.bwrap and returncode is not None and returncode > 128 and not launch.get("fatal"):
            returncode = 128 - returncode  # bubblewrap reports death by signal N as status 128+N
        for message in launch.get("warning", []):
            warn_once(message)
        err = self.err
        if "MemoryError" in err[-4000:] and not events.get("reason"):  # died before the harness ran
            events.setdefault("event", []).append("memory")
        reason, note = classify(returncode, self.timed_out, cpu_used, launch, events, self.limits, timeout_s)
        if note is not None:
            err = (err.rstrip("\n") + "\n" if err.strip() else "") + f"[sandbox] {note}\n"
        isolation = tuple(launch["isolation"][0].split(",")) if launch.get("isolation") else ()
        return SandboxResult(reason is None, returncode, self.out, err, reason,
                             time.monotonic() - self.started_at, isolation)

    def discard(self) -> None:
        """Give up on a child that never started (or must not go on): kill it, delete the box."""
        if self.proc is not None:
            self.kill_all()
            self.proc.stdout.close()
            self.proc.stderr.close()
            self.reap()
        _setup.remove(self.box)

    # ------------------------------------------------------------------------- processes

    def exits_by(self, deadline: float) -> bool:
        while not self.exited():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def exited(self) -> bool:
        """Exit check that leaves the zombie in place, so its pid (= the process group id) cannot
        be reused before we have killed the group."""
        if not hasattr(os, "waitid"):  # macOS: poll() reaps; a pid-reuse race we accept there
            return self.proc.poll() is not None
        try:
            return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def kill_all(self) -> None:
        """SIGKILL the process group (with bubblewrap, its death takes the whole pid namespace
        along: --die-with-parent), and, where the launcher made a network namespace, every
        process in it: that also catches children that left the group with setsid()."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in self.stragglers():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def stragglers(self) -> list[int]:
        """Live processes in the sandbox's network namespace owned by the sandbox user. Both
        checks, and never our own namespace, so a bad namespace id cannot point us at others."""
        netns = (self.launch_info().get("netns") or [None])[0]
        if netns is None or netns == _own_netns():
            return []
        uid = self.plan.uid if self.plan.uid is not None else os.getuid()
        found = []
        for name in os.listdir("/proc"):
            try:
                if (name.isdigit() and os.stat(f"/proc/{name}").st_uid == uid
                        and os.readlink(f"/proc/{name}/ns/net") == netns):
                    found.append(int(name))
            except OSError:
                pass  # gone meanwhile, or a zombie (no namespaces left)
        return found

    def reap(self) -> tuple[int, float]:
        """Collect the exit status and the CPU seconds used; wait (briefly) until every process of
        the run is gone, so none outlives the call or still counts against the next run's limits."""
        try:
            _, status, usage = os.wait4(self.proc.pid, 0)
            self.proc.returncode = os.waitstatus_to_exitcode(status)
            cpu_used = usage.ru_utime + usage.ru_stime
        except ChildProcessError:
            self.proc.wait()
            cpu_used = 0.0
        deadline = time.monotonic() + REAP_WAIT_S
        while self._group_alive() or self.stragglers():
            if time.monotonic() >= deadline:
                warn_once("sandbox: processes of a finished run are still alive (not yet reaped)")
                break
            self.kill_all()
            time.sleep(0.01)
        return self.proc.returncode, cpu_used

    def _group_alive(self) -> bool:
        """Killed orphans stay in the group as zombies until init reaps them."""
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def launch_info(self) -> dict[str, list[str]]:
        """The launcher's own report (isolation, warnings, netns). Written before the child ran,
        in a file only we (not the sandbox user) can write to."""
        return _read_lines(os.path.join(self.box, "launch"))


@lru_cache(maxsize=1)
def _own_netns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return None


def _decode(data: bytearray, dropped: int) -> str:
    text = data.decode("utf-8", errors="replace")
    if dropped:
        text += f"\n[sandbox] output truncated: {dropped} more bytes dropped\n"
    return text


def _read_lines(path: str) -> dict[str, list[str]]:
    """A `kind<TAB>value` report file, grouped by kind (values in order)."""
    report: dict[str, list[str]] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read(1 << 16).splitlines()
    except OSError:
        return report
    for line in lines:
        kind, _, value = line.partition("\t")
        report.setdefault(kind, []).append(value)
    return report


def classify(returncode: int, timed_out: bool, cpu_used: float, launch: dict, events: dict,
             limits: dict, timeout_s: float) -> tuple[str | None, str | None]:
    """(reason, note for stderr). The harness tags the uncaught exception; signals and our own
    timeout cover the rest."""
    if launch.get("fatal"):
        return "error", f"sandbox setup failed: {launch['fatal'][0]}"
    if timed_out:
        return "timeout", f"killed after the {timeout_s:g} s wall-clock timeout"
    if returncode == 0:
        return None, None
    if returncode == -signal.SIGXCPU or (returncode == -signal.SIGKILL and cpu_used >= limits["cpu"]):
        return "cpu-time", f"killed after using its {limits['cpu']} s of CPU time"
    # The uncaught exception's tag, else the first guard that fired (the program may have caught
    # the PermissionError / BlockingIOError and then exited non-zero on its own).
    cause = events["reason"][-1] if events.get("reason") else (events.get("event") or [None])[0]
    if cause == "network":
        return "network", "network access is disabled in the sandbox"
    if cause == "processes":
        return "processes", f"process limit reached (max_procs={limits['procs']})"
    if cause == "memory" or returncode == -signal.SIGKILL:  # a SIGKILL we did not send: OOM killer
        return "memory", f"memory limit reached ({limits['memory'] >> 20} MB)"
    if returncode == -signal.SIGXFSZ:
        return "error", f"file size limit exceeded ({limits['fsize'] >> 20} MB)"
    if returncode < 0:
        try:
            return "error", f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return "error", f"killed by signal {-returncode}"
    if not events.get("reason"):  # exited non-zero on purpose, e.g. sys.exit(3): say so
        return "error", f"exited with status {returncode}"
    return "error", None  # an uncaught exception: its traceback already ends stderr
