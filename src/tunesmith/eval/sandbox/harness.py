"""Sandbox harness: installs the guards, then runs the untrusted program as `__main__`.

    python -I -S -B -X utf8 harness.py STATUS_FD SCRIPT [REQUEST_FD REPLY_FD]

With the two channel descriptors it then *serves* the program to the trusted test runner: it
sends the names the program defined, and answers calls on them, one request at a time, with
plain data (see wire.py). Nothing here decides a verdict: everything in this process, this file
included, is within the program's reach, so the runner treats every answer as untrusted data.
"""
import errno
import os
import sys


def _load_wire():
    """wire.py beside this file, by path: the sandbox user may not list our folder, and -I leaves
    it off sys.path anyway."""
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("wire", os.path.join(os.path.dirname(os.path.abspath(__file__)), "wire.py"))
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wire = _load_wire()

STATUS_FD = int(sys.argv[1])
SCRIPT = sys.argv[2]
CHANNEL = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else None


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


# ----------------------------------------------------------------------------- serving


class Server:
    """Answers the runner's requests on the program's objects. Objects that are not plain data
    stay here and cross as numbered references."""

    OPS = ("call", "getattr", "len", "bool", "contains", "getitem", "list", "str")

    def __init__(self, namespace, request_fd, reply_fd):
        self.namespace, self.request_fd, self.reply_fd = namespace, request_fd, reply_fd
        self.objects = []

    def ref(self, obj):
        self.objects.append(obj)
        label = getattr(obj, "__qualname__", None) or type(obj).__name__
        return {"r": len(self.objects) - 1, "n": str(label)[:80]}

    def value(self, obj):
        return wire.encode(obj, self.ref)

    def names(self):
        """The program's top-level names; modules by name, so the runner imports its own copy."""
        offered = {}
        for name, obj in list(self.namespace.items()):
            if name.startswith("__"):
                continue
            if type(obj) is type(sys):
                offered[name] = {"m": getattr(obj, "__name__", name)}
            else:
                offered[name] = self.value(obj)
        return offered

    def serve(self):
        wire.send(self.reply_fd, {"ready": self.names()})
        while True:
            request = wire.receive(self.request_fd)
            if request is None:
                return
            if request.get("op") == "finish":  # the tests are over; answering proves we are alive
                wire.send(self.reply_fd, {"id": request.get("id"), "ok": None})
                return
            try:
                reply = {"ok": self.value(self.perform(request))}
            except BaseException as exc:  # SystemExit too: the runner decides what it means
                reply = {"err": [type(exc).__name__, _builtin_base(type(exc)), str(exc)[:2000], reason_of(exc)]}
            reply["id"] = request.get("id")
            wire.send(self.reply_fd, reply)

    def perform(self, request):
        op = request["op"]
        if op not in self.OPS:
            raise ValueError("unknown request %r" % op)
        target = self.objects[request["ref"]]
        args = wire.decode(request.get("args", []), lambda ref, _label: self.objects[ref])
        if op == "call":
            return target(*args, **dict(wire.decode(request.get("kwargs", []), self._deref)))
        if op == "getattr":
            return getattr(target, args[0])
        if op == "list":
            return list(target)
        if op == "contains":
            return args[0] in target
        if op == "getitem":
            return target[args[0]]
        return {"len": len, "bool": bool, "str": str}[op](target)

    def _deref(self, ref, _label):
        return self.objects[ref]


def _builtin_base(kind):
    """The nearest builtin exception class in the MRO, so `except ValueError` still matches."""
    for base in kind.__mro__:
        if base.__module__ == "builtins":
            return base.__name__
    return "Exception"


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
        if CHANNEL is not None:
            Server(module.__dict__, *CHANNEL).serve()
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
