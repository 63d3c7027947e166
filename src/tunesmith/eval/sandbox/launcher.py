"""Sandbox launcher: the first process of every sandbox, started by the parent as
`python -I -S -B launcher.py CONFIG_JSON` in a fresh session.

It isolates itself, drops privileges, sets the resource limits, then execs either bubblewrap
(which builds the real sandbox: fresh user, pid, network, ipc and mount namespaces and a file
system made only of what the parent listed) or, where bubblewrap cannot run, the Python child
directly, in the namespaces this file could make on its own. Standard library only: this runs
before anything of tunesmith is importable, and the child it starts never sees tunesmith at all.
"""
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
PRIVATE_TMP_BYTES = 64 << 20

config = json.loads(sys.argv[1])
# Our report goes to a file the program cannot reach (closed on exec, root-only when we drop to
# nobody); the harness's events go to `status`, whose descriptor the child inherits.
launch = os.open(config["launch"], os.O_WRONLY | os.O_APPEND)
status = os.open(config["status"], os.O_WRONLY | os.O_APPEND)
os.set_inheritable(status, True)
for kept in config["keep_fds"]:
    os.set_inheritable(kept, True)
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


def mount(source, target, fstype, flags, data=None):
    encode = lambda s: None if s is None else s.encode()  # noqa: E731
    libc_call("mount", encode(source), encode(target), encode(fstype), flags, encode(data))


def enter_namespaces():
    """A private mount namespace when we are root (plus our own network namespace when bubblewrap
    will not make one)."""
    if not linux or config["uid"] is None:
        return False
    flags = CLONE_NEWNS if config["bwrap"] else CLONE_NEWNS | CLONE_NEWNET
    try:
        libc_call("unshare", flags)
        mount("none", "/", None, MS_REC | MS_PRIVATE)  # our mounts stay ours
    except OSError as exc:
        report("warning", "sandbox: no private mount namespace as root (%s)" % exc)
        return False
    if not config["bwrap"]:
        achieved.extend(["netns", "mountns"])
    return True


def bind_readonly(mounted):
    """Make what the sandbox user could not read (e.g. an interpreter under /root) visible
    read-only at a path it can reach. True when every bind worked."""
    if not config["binds"]:
        return True
    if not mounted:
        return False
    for source, target in config["binds"]:
        try:
            mount(source, target, None, MS_BIND | MS_REC)
        except OSError as exc:
            report("warning", "sandbox: cannot bind-mount %s (%s)" % (source, exc))
            return False
        try:
            mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        except OSError:
            pass  # still root-owned and not writable by the sandbox user
    return True


def private_tmp(mounted):
    """Without bubblewrap: fresh tmpfs on /tmp and /dev/shm, so runs cannot leave files for each
    other. The sandbox folder lives in /tmp, so it is bound back in at the same path first."""
    if not (mounted and linux):
        report("warning", "sandbox: /tmp and /dev/shm are shared with other runs (no mount namespace)")
        return
    box = config["box"]
    held = os.open(box, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for target in ("/tmp", "/dev/shm"):
            if os.path.isdir(target):
                options = "size=%d,mode=1777" % PRIVATE_TMP_BYTES
                mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, options)
        os.makedirs(box, 0o711)
        mount("/proc/self/fd/%d" % held, box, None, MS_BIND | MS_REC)
        achieved.append("private-tmp")
    except OSError as exc:
        report("fatal", "cannot give the program a private /tmp (%s)" % exc)
        raise SystemExit(126)
    finally:
        os.close(held)


def drop_privileges():
    os.setgroups([])
    os.setgid(config["gid"])
    os.setuid(config["uid"])
    achieved.append("uid=%d" % config["uid"])


def user_network_namespace():
    """Unprivileged fallback: a user namespace makes creating the network namespace allowed."""
    error = None
    for flags, label in ((CLONE_NEWNET, "netns"), (CLONE_NEWUSER | CLONE_NEWNET, "userns+netns")):
        try:
            libc_call("unshare", flags)
            achieved.append(label)
            return
        except OSError as exc:
            error = exc
    report("warning", "sandbox: no network namespace (%s); only the socket guard blocks the network" % error)


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
    if linux and os.getuid() != 0:
        # RLIMIT_NPROC counts every task of the user: the other sandbox of a test run (the runner and
        # the program run as the same user) and a finished run's processes still being reaped count
        # too, so the budget is on top of what the user already has
        procs += own_tasks()
    wanted = [("RLIMIT_CORE", 0, 0), ("RLIMIT_CPU", limits["cpu"], limits["cpu"] + 1),
              ("RLIMIT_FSIZE", limits["fsize"], limits["fsize"]), ("RLIMIT_NPROC", procs, procs),
              ("RLIMIT_AS", limits["memory"], limits["memory"]),
              ("RLIMIT_NOFILE", limits["files"], limits["files"])]
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
    binds_ok = bind_readonly(mounted)
    if config["bwrap"] and not binds_ok:
        report("fatal", "bubblewrap cannot reach the interpreter as uid %s" % config["uid"])
        raise SystemExit(126)
    if not config["bwrap"]:
        private_tmp(mounted)
    env, dropped = dict(os.environ), False
    if config["uid"] is not None:
        if binds_ok:
            env.update(config["bind_env"])
            drop_privileges()
            dropped = True
        else:
            report("warning", "sandbox: still running as root: uid %d cannot read the interpreter"
                   % config["uid"])
    if config["bwrap"]:
        achieved.extend(["bwrap", "userns", "pidns", "netns", "mountns", "private-tmp"])
    elif "netns" not in achieved:
        user_network_namespace()
    if any(label.endswith("netns") for label in achieved) and not config["bwrap"]:
        report("netns", os.readlink("/proc/self/ns/net"))  # lets the parent find every process in it
    no_new_privs()
    set_limits(dropped)
    achieved.append("socket-guard")
    report("isolation", ",".join(achieved))
    child = [str(status) if arg == "@status" else arg for arg in config["child"]]
    if not binds_ok and config["uid"] is not None:
        child[0] = config["executable"]  # still root: the interpreter where it really is
    argv = (config["bwrap"] or []) + child
    os.execve(argv[0], argv, env)


try:
    main()
except SystemExit:
    raise
except BaseException as exc:
    report("fatal", "%s: %s" % (type(exc).__name__, exc))
    sys.exit(126)
