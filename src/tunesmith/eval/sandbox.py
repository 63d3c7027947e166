"""Run untrusted, model-written Python in a locked-down child process.

Every program runs in a fresh temporary directory (deleted afterwards) under a scrubbed environment,
in an isolated interpreter (`python -I -S -B`: no site-packages, no user paths, no PYTHON* variables),
with these walls, strongest first:

- **Network.** On Linux the child gets its own network namespace (no interfaces but a downed
  loopback), so nothing is reachable even through raw syscalls. In every case a guard installed
  before the program runs makes socket connect/bind/sendto and name lookups raise PermissionError.
- **User.** When we run as root, the child drops to `nobody` (with `no_new_privs`), so it can only
  touch what the world may touch and RLIMIT_NPROC binds (it does not bind root). The interpreter
  often lives somewhere `nobody` cannot read (e.g. /root/.pyenv), so it is bind-mounted read-only
  into the sandbox inside a private mount namespace.
- **Limits.** RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_NPROC (fork bombs), RLIMIT_FSIZE and
  RLIMIT_CORE=0, set in the child before the program's interpreter starts; a wall-clock timeout
  then kills the child's whole process group, grandchildren included.

Whatever isolation was achieved is recorded in `SandboxResult.isolation`; anything that could not
be set up is reported once with a warning, never silently. Off Linux only the limits the platform
offers, the socket guard and the timeout apply.
"""
from __future__ import annotations

import json
import math
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache

REASONS = (None, "timeout", "cpu-time", "memory", "network", "processes", "error")
FILE_SIZE_MB = 64
"Largest file the program may write (RLIMIT_FSIZE)."
MAX_OUTPUT_BYTES = 1 << 20
"Default cap on captured stdout and on captured stderr, each."
EXIT_GRACE_S = 1.0
"How long to keep reading output after the program exits, in case stray processes still hold it."
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
    "What the sandbox achieved, e.g. netns, mountns, uid=65534, no_new_privs, rlimits, socket-guard."


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
    if os.name != "posix":
        raise RuntimeError("the tunesmith sandbox needs a POSIX system (Linux for full isolation)")
    plan = _plan()
    limits = _limits(timeout_s, cpu_s, memory_mb, max_procs)
    start = time.monotonic()
    box = _make_box(code, files or {}, stdin or "", plan)
    try:
        child = _Child.start(box, plan, limits)
        if child is None:
            return SandboxResult(False, None, "", "[sandbox] could not start the interpreter\n", "error",
                                 time.monotonic() - start)
        out, err, timed_out = child.collect(start + timeout_s, max_output_bytes)
        returncode, cpu_used = child.reap()
        launch, events = child.launch_info(), _read_lines(os.path.join(box, "status"))
    finally:
        _remove(box)
    for message in launch.get("warning", []):
        _warn_once(message)
    if "MemoryError" in err[-4000:] and not events.get("reason"):  # died before the harness ran
        events.setdefault("event", []).append("memory")
    reason, note = _classify(returncode, timed_out, cpu_used, launch, events, limits, timeout_s)
    if note is not None:
        err = (err.rstrip("\n") + "\n" if err.strip() else "") + f"[sandbox] {note}\n"
    isolation = tuple(launch["isolation"][0].split(",")) if launch.get("isolation") else ()
    return SandboxResult(reason is None, returncode, out, err, reason, time.monotonic() - start, isolation)


# ----------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class _Plan:
    executable: str
    "The real interpreter binary (a venv's python is a symlink to it; -I -S ignores the venv anyway)."
    prefix: str
    uid: int | None
    "Who the program runs as, when we can change it (we are root); None keeps our own user."
    gid: int | None
    bind_prefix: bool
    "The sandbox user cannot read the interpreter where it is, so it is bind-mounted in (needs root)."


@lru_cache(maxsize=1)
def _plan() -> _Plan:
    executable = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    linux = sys.platform.startswith("linux")
    if not linux:
        _warn_once(f"sandbox: {sys.platform} has no namespaces; only resource limits, "
                   "the socket guard and the timeout isolate model-written code")
    if not (linux and os.geteuid() == 0):
        return _Plan(executable, prefix, None, None, False)
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
    except KeyError:
        uid, gid = 65534, 65534
    bind = executable.startswith(prefix + os.sep) and not _world_readable(prefix)
    return _Plan(executable, prefix, uid, gid, bind)


def _world_readable(path: str) -> bool:
    """Whether an arbitrary user can traverse to `path` and read it (mode bits only, no ACLs)."""
    parts = os.path.abspath(path).split(os.sep)
    for depth in range(1, len(parts) + 1):
        mode = os.stat(os.sep.join(parts[:depth]) or os.sep).st_mode
        if not mode & stat.S_IXOTH or (depth == len(parts) and not mode & stat.S_IROTH):
            return False
    return True


def _make_box(code: str, files: dict[str, str], stdin: str, plan: _Plan) -> str:
    """Lay out a fresh sandbox directory:

    box/ (0711, ours)  launcher.py harness.py launch status stdin python/ (bind-mount point)
    box/work/ (0700, the sandbox user's)  main.py + `files`: the program's cwd, HOME and TMPDIR
    """
    box = tempfile.mkdtemp(prefix="tunesmith-sandbox-")
    try:
        os.chmod(box, 0o711)  # the sandbox user may pass through to work/ but not list our files
        for name, text in (("launcher.py", _LAUNCHER), ("harness.py", _HARNESS)):
            _write(os.path.join(box, name), text, 0o644)
        for name, text in (("launch", ""), ("status", ""), ("stdin", stdin)):
            _write(os.path.join(box, name), text, 0o600)
        os.mkdir(os.path.join(box, "python"), 0o755)
        _make_work(os.path.join(box, "work"), {**files, "main.py": code}, plan)
    except BaseException:
        _remove(box)
        raise
    return box


def _make_work(work: str, files: dict[str, str], plan: _Plan) -> None:
    os.mkdir(work, 0o700)
    for name, text in files.items():
        path = os.path.normpath(os.path.join(work, name))
        if os.path.isabs(name) or not path.startswith(work + os.sep):
            raise ValueError(f"sandbox file names must be relative and stay inside: {name!r}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write(path, text, 0o644)
    if plan.uid is not None:
        for root, dirs, names in os.walk(work):
            for entry in [root] + [os.path.join(root, n) for n in dirs + names]:
                os.chown(entry, plan.uid, plan.gid)


def _write(path: str, text: str, mode: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)


def _limits(timeout_s: float, cpu_s: float | None, memory_mb: int, max_procs: int) -> dict:
    cpu = math.ceil(cpu_s if cpu_s is not None else timeout_s + 1)
    return {"cpu": max(cpu, 1), "memory": memory_mb << 20, "procs": max_procs, "fsize": FILE_SIZE_MB << 20}


def _environment(work: str) -> dict[str, str]:
    """An allowlist, not a filtered copy of ours: no tokens, proxies, PYTHONPATH or HOME secrets."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": work,
        "TMPDIR": work,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
    }


# ----------------------------------------------------------------------------- running


class _Child:
    """The sandboxed process: the launcher, which execs the harness under the same pid."""

    def __init__(self, proc: subprocess.Popen, box: str, plan: _Plan):
        self.proc, self.box, self.plan = proc, box, plan

    @classmethod
    def start(cls, box: str, plan: _Plan, limits: dict) -> _Child | None:
        work = os.path.join(box, "work")
        config = {
            "launch": os.path.join(box, "launch"),
            "status": os.path.join(box, "status"),
            "uid": plan.uid,
            "gid": plan.gid,
            "executable": plan.executable,
            "prefix": plan.prefix if plan.bind_prefix else None,
            "mount_point": os.path.join(box, "python"),
            "harness": os.path.join(box, "harness.py"),
            "script": os.path.join(work, "main.py"),
            "limits": limits,
        }
        argv = [plan.executable, "-I", "-S", "-B", os.path.join(box, "launcher.py"), json.dumps(config)]
        # No preexec_fn: it is unsafe in a multi-threaded parent (torch's thread pools), so all
        # setup happens in the launcher, a fresh single-threaded process.
        try:
            with open(os.path.join(box, "stdin"), "rb") as stdin:
                proc = subprocess.Popen(
                    argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=work,
                    env=_environment(work), close_fds=True, start_new_session=True,
                )
        except OSError as exc:
            _warn_once(f"sandbox: could not start the interpreter: {exc}")
            return None
        return cls(proc, box, plan)

    def collect(self, deadline: float, cap: int) -> tuple[str, str, bool]:
        """Read stdout/stderr until both close or the deadline passes, keeping `cap` bytes of each.

        Reading both pipes as data arrives keeps a chatty program from blocking on a full pipe;
        the cap keeps an endless printer from filling our memory (the excess is counted, dropped).
        Returns (stdout, stderr, timed_out); everything the program started is dead afterwards.
        """
        proc = self.proc
        kept = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
        dropped = dict.fromkeys(kept, 0)
        selector = selectors.DefaultSelector()
        for fd in kept:
            selector.register(fd, selectors.EVENT_READ)
        timed_out, exited_at = False, None
        while selector.get_map():
            now = time.monotonic()
            if exited_at is None and self.exited():
                exited_at = now
                self.kill_all()  # leftover processes may hold the pipes open forever
            stop = deadline if exited_at is None else min(deadline, exited_at + EXIT_GRACE_S)
            if now >= stop:
                timed_out = exited_at is None
                break
            for key, _ in selector.select(timeout=min(stop - now, 0.25)):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                room = max(cap - len(kept[key.fd]), 0)
                kept[key.fd] += chunk[:room]
                dropped[key.fd] += len(chunk) - len(chunk[:room])
        selector.close()
        if not timed_out:  # output closed (the program may have closed stdout): still on the clock
            timed_out = not self.exits_by(deadline)
        self.kill_all()
        proc.stdout.close()
        proc.stderr.close()
        out, err = (_decode(kept[fd], dropped[fd]) for fd in kept)
        return out, err, timed_out

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
        """SIGKILL the process group, and, where the sandbox has its own network namespace, every
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
                _warn_once("sandbox: processes of a finished run are still alive (not yet reaped)")
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
        """The launcher's own report (isolation, warnings, netns). Written before the program ran,
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


def _classify(returncode: int, timed_out: bool, cpu_used: float, launch: dict, events: dict,
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
        return "error", f"killed by {signal.Signals(-returncode).name}"
    if not events.get("reason"):  # exited non-zero on purpose, e.g. sys.exit(3): say so
        return "error", f"exited with status {returncode}"
    return "error", None  # an uncaught exception: its traceback already ends stderr


# ----------------------------------------------------------------------------- cleanup


def _remove(box: str) -> None:
    """Delete the sandbox directory, even if the program chmod-ed things unreadable."""
    def make_writable_and_retry(func, path, _exc):
        for p in (os.path.dirname(path), path):
            try:
                os.chmod(p, 0o700)
            except OSError:
                pass
        func(path)

    try:
        shutil.rmtree(box, onerror=make_writable_and_retry)
    except OSError as exc:
        _warn_once(f"sandbox: could not remove {box}: {exc}")


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------- child-side code
# Both run in `python -I -S -B`: standard library only, and no access to this package.

_LAUNCHER = r'''
"""Sandbox launcher: isolate this process, drop privileges, set limits, then exec the harness."""
import json
import os
import sys

# Import what we need while we can still read the interpreter's library (before the uid drop).
try:
    import ctypes
except ImportError:
    ctypes = None
try:
    import resource
except ImportError:
    resource = None

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38

config = json.loads(sys.argv[1])
# Our report goes to a file the program cannot reach (closed on exec, root-only when we drop to
# nobody); the harness's events go to `status`, whose descriptor the program inherits.
launch = os.open(config["launch"], os.O_WRONLY | os.O_APPEND)
status = os.open(config["status"], os.O_WRONLY | os.O_APPEND)
os.set_inheritable(status, True)
achieved, linux = [], sys.platform.startswith("linux")


def report(kind, value):
    os.write(launch, ("%s\t%s\n" % (kind, str(value).replace("\n", " "))).encode())


def libc_call(name, *args):
    if ctypes is None:
        raise OSError(0, "ctypes unavailable")
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, "%s: %s" % (name, os.strerror(errno)))


def enter_namespaces():
    """Own network namespace (no route anywhere); a private mount namespace when we are root."""
    if not linux:
        return False
    if config["uid"] is not None:
        try:
            libc_call("unshare", CLONE_NEWNET | CLONE_NEWNS)
            libc_call("mount", b"none", b"/", None, MS_REC | MS_PRIVATE, None)  # mounts stay ours
            achieved.extend(["netns", "mountns"])
            return True
        except OSError as exc:
            report("warning", "sandbox: no network/mount namespace as root (%s)" % exc)
    return False


def user_network_namespace():
    """Unprivileged fallback: a user namespace makes creating the network namespace allowed."""
    for flags, label in ((CLONE_NEWNET, "netns"), (CLONE_NEWUSER | CLONE_NEWNET, "userns+netns")):
        try:
            libc_call("unshare", flags)
            achieved.append(label)
            return
        except OSError as exc:
            error = exc
    report("warning", "sandbox: no network namespace (%s); only the socket guard blocks the network" % error)


def interpreter(mounted):
    """The interpreter to exec: bind-mounted read-only into the sandbox if the sandbox user could
    not otherwise read it. Returns (path, extra environment) or None if unusable after the drop."""
    prefix = config["prefix"]
    if prefix is None:
        return config["executable"], {}
    if not mounted:
        return None
    target = config["mount_point"]
    try:
        libc_call("mount", prefix.encode(), target.encode(), None, MS_BIND | MS_REC, None)
    except OSError as exc:
        report("warning", "sandbox: cannot bind-mount the interpreter (%s)" % exc)
        return None
    try:
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
        libc_call("mount", None, target.encode(), None, flags, None)
    except OSError:
        pass  # still root-owned and not writable by the sandbox user
    executable = target + config["executable"][len(prefix):]
    # An absolute RUNPATH (pyenv builds) would point libpython back at the unreadable prefix.
    return executable, {"LD_LIBRARY_PATH": os.path.join(target, "lib")}


def drop_privileges():
    os.setgroups([])
    os.setgid(config["gid"])
    os.setuid(config["uid"])
    achieved.append("uid=%d" % config["uid"])


def no_new_privs():
    if linux:
        try:
            libc_call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # setuid binaries stay unprivileged
            achieved.append("no_new_privs")
        except OSError as exc:
            report("warning", "sandbox: no_new_privs unavailable (%s)" % exc)


def own_tasks():
    """Processes and threads our user already has: RLIMIT_NPROC counts them all, per user."""
    uid, count = os.getuid(), 0
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat("/proc/" + pid).st_uid == uid:
                count += len(os.listdir("/proc/%s/task" % pid))
        except OSError:
            pass
    return count


def set_limits(dropped):
    if resource is None:
        report("warning", "sandbox: no resource limits on this platform")
        return
    limits = config["limits"]
    procs = limits["procs"]
    if not dropped and linux and os.getuid() != 0:
        procs += own_tasks()  # we share the count with everything else the user runs
    wanted = [("RLIMIT_CORE", 0, 0), ("RLIMIT_CPU", limits["cpu"], limits["cpu"] + 1),
              ("RLIMIT_FSIZE", limits["fsize"], limits["fsize"]), ("RLIMIT_NPROC", procs, procs),
              ("RLIMIT_AS", limits["memory"], limits["memory"])]
    missing = []
    for name, soft, hard in wanted:
        try:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        except (AttributeError, ValueError, OSError):
            missing.append(name)
    if missing:
        report("warning", "sandbox: could not set " + ", ".join(missing))
    achieved.append("rlimits" if not missing else "rlimits-partial")


def main():
    mounted = enter_namespaces()
    env = dict(os.environ)
    dropped = False
    if config["uid"] is not None:
        chosen = interpreter(mounted)
        if chosen is None:
            report("warning", "sandbox: still running as root: uid %d cannot read the interpreter"
                   % config["uid"])
            executable = config["executable"]
        else:
            executable, extra = chosen
            env.update(extra)
            drop_privileges()
            dropped = True
    else:
        executable = config["executable"]
    if "netns" not in achieved:
        user_network_namespace()
    if any(label.endswith("netns") for label in achieved):
        report("netns", os.readlink("/proc/self/ns/net"))  # lets the parent find every process in it
    no_new_privs()
    set_limits(dropped)
    achieved.append("socket-guard")
    report("isolation", ",".join(achieved))
    argv = [executable, "-I", "-S", "-B", "-X", "utf8", config["harness"], str(status), config["script"]]
    os.execve(executable, argv, env)


try:
    main()
except BaseException as exc:
    report("fatal", "%s: %s" % (type(exc).__name__, exc))
    sys.exit(126)
'''

_HARNESS = r'''
"""Sandbox harness: installs the guards, then runs the untrusted program as __main__."""
import errno
import os
import sys

STATUS_FD = int(sys.argv[1])
SCRIPT = sys.argv[2]


def report(kind, value):
    try:
        os.write(STATUS_FD, ("%s\t%s\n" % (kind, value)).encode())
    except OSError:
        pass


def mark(exc, reason):
    """Tag an exception with the sandbox reason it stands for, for the top-level handler."""
    try:
        exc._sandbox_reason = reason
    except AttributeError:
        pass
    return exc


def guard_network():
    """Make every way out raise PermissionError. The network namespace is the real wall; this
    turns an attempt into a clear message instead of an obscure 'network unreachable'."""
    import _socket
    import socket

    def deny(what):
        def blocked(*args, **kwargs):
            target = [a for a in args if not isinstance(a, _socket.socket)][:1]
            report("event", "network")
            detail = "%s %r" % (what, target[0]) if target else what
            raise mark(PermissionError("network access is disabled in the sandbox (%s)" % detail), "network")
        return blocked

    for name in ("connect", "connect_ex", "bind", "sendto"):
        setattr(socket.socket, name, deny(name))
    for module in (socket, _socket):
        for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
            if hasattr(module, name):
                setattr(module, name, deny(name))


def watch_processes():
    """Tag failures to start a process or thread, so a fork bomb reads 'processes', not 'error'.
    Patched before subprocess/threading are imported, so they pick up the wrappers."""
    import _thread

    def watch(function):
        def watched(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    report("event", "processes")
                    mark(exc, "processes")
                elif exc.errno == errno.ENOMEM:
                    mark(exc, "memory")
                raise
            except RuntimeError as exc:  # "can't start new thread"
                report("event", "processes")
                raise mark(exc, "processes")
        return watched

    targets = [(os, n) for n in ("fork", "forkpty", "posix_spawn", "posix_spawnp")]
    targets += [(_thread, n) for n in ("start_new_thread", "start_new", "start_joinable_thread")]
    try:
        import _posixsubprocess
        targets.append((_posixsubprocess, "fork_exec"))
    except ImportError:
        pass
    for module, name in targets:
        if hasattr(module, name):
            setattr(module, name, watch(getattr(module, name)))


def reason_of(exc):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "_sandbox_reason", None):
            return exc._sandbox_reason
        if isinstance(exc, MemoryError):
            return "memory"
        exc = exc.__cause__ or exc.__context__
    return "error"


def main():
    guard_network()
    watch_processes()
    import types

    # A real module as __main__, so pickle, dataclasses and `if __name__ == "__main__"` behave.
    module = types.ModuleType("__main__")
    module.__file__ = SCRIPT
    sys.modules["_sandbox_harness"] = sys.modules["__main__"]
    sys.modules["__main__"] = module
    sys.argv = [SCRIPT]
    sys.path.insert(0, os.path.dirname(SCRIPT))  # -I leaves it out; `files` should be importable
    with open(SCRIPT, "rb") as f:
        source = f.read()
    try:
        exec(compile(source, SCRIPT, "exec"), module.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:
        report("reason", reason_of(exc))
        try:
            import traceback
            traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        except BaseException:
            sys.stderr.write("%s: %s\n" % (type(exc).__name__, exc))
        sys.exit(1)


main()
'''
