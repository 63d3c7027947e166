"""Trusted test runner: runs the tests in its own process and sandbox, calls the program over a
channel, and writes the verdict where only it can.

    python -I -S -B -X utf8 runner.py VERDICT_FD REQUEST_FD REPLY_FD TESTS_PATH [ENTRY_POINT]

No code of the program ever runs in this process. The program's top-level names arrive as plain
data or as opaque `Remote` proxies; calling one sends a request and waits for plain data back.
So the tests' assertions, `check`, the builtins and this file are out of the program's reach, and
a return value cannot carry a forged `__eq__` (only exact builtin types are rebuilt here; a proxy
equals only itself). The verdict goes to VERDICT_FD, a pipe to the parent that nothing else holds.
"""
import builtins
import json
import os
import sys
import traceback


def _load_wire():
    """wire.py beside this file, by path: the sandbox user may not list our folder, and -I leaves
    it off sys.path anyway."""
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("wire", os.path.join(os.path.dirname(os.path.abspath(__file__)), "wire.py"))
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wire = _load_wire()

VERDICT_FD, REQUEST_FD, REPLY_FD = (int(a) for a in sys.argv[1:4])
TESTS = sys.argv[4]
ENTRY_POINT = sys.argv[5] if len(sys.argv) > 5 else None
PR_SET_DUMPABLE = 4
GONE = "the program exited before its tests finished"


class ProgramGone(BaseException):
    """The program died, closed its channel or broke the protocol: no test can pass after it.
    A BaseException, so a test's `except Exception:` cannot swallow it."""


class ProgramExit(BaseException):
    """The program raised SystemExit, KeyboardInterrupt or GeneratorExit from a call."""


class Channel:
    def __init__(self):
        self.next_id, self.broken, self.reasons = 0, None, []

    def request(self, op, ref, args=(), kwargs=None):
        if self.broken:
            raise ProgramGone(self.broken)
        self.next_id += 1
        message = {"id": self.next_id, "op": op, "ref": ref, "args": wire.encode(list(args), _plain_only)}
        if kwargs:
            message["kwargs"] = wire.encode(list(kwargs.items()), _plain_only)
        try:
            wire.send(REQUEST_FD, message)
            reply = wire.receive(REPLY_FD)
            if reply is None:
                raise EOFError(GONE)
            if type(reply) is not dict or reply.get("id") != self.next_id:
                raise wire.ProtocolError("a reply out of turn")
            if "ok" in reply:
                return wire.decode(reply["ok"], Remote)
            error = reply["err"]
        except (OSError, EOFError, ValueError, TypeError, KeyError, wire.ProtocolError) as exc:
            self.broken = GONE if isinstance(exc, (EOFError, BrokenPipeError)) else "protocol error: %s" % exc
            raise ProgramGone(self.broken) from None
        raise self.remote_error(error)

    def remote_error(self, error):
        """The program's exception, rebuilt as a class of our own with the same name and builtin
        base, so a test's `except ValueError` behaves as it would in one process."""
        if type(error) is not list or len(error) != 4 or not all(type(e) is str for e in error):
            self.broken = "protocol error: malformed exception"
            return ProgramGone(self.broken)
        name, base_name, message, reason = error
        if reason != "error":
            self.reasons.append(reason)
        base = getattr(builtins, base_name, None)
        if not (isinstance(base, type) and issubclass(base, BaseException)):
            base = Exception
        if not issubclass(base, Exception):
            self.broken = "the program raised %s" % name
            return ProgramExit("%s: %s" % (name, message))
        if not name.isidentifier():
            name = "ProgramError"
        return type(name, (base,), {"__module__": "builtins"})(message)


channel = Channel()


def _plain_only(obj):
    if type(obj) is Remote:
        return {"r": object.__getattribute__(obj, "_ref")}
    raise TypeError("the tests can pass only plain data to the program, not %s" % type(obj).__name__)


class Remote:
    """An object that lives in the program: it can be called, indexed, iterated and asked for
    attributes, each a request; it is equal only to itself."""

    __slots__ = ("_ref", "_label")

    def __init__(self, ref, label):
        object.__setattr__(self, "_ref", ref)
        object.__setattr__(self, "_label", label)

    def _ask(self, op, *args, **kwargs):
        return channel.request(op, object.__getattribute__(self, "_ref"), args, kwargs)

    def __call__(self, *args, **kwargs):
        return self._ask("call", *args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._ask("getattr", name)

    def __getitem__(self, key):
        return self._ask("getitem", key)

    def __contains__(self, item):
        return self._ask("contains", item) is True

    def __iter__(self):
        items = self._ask("list")
        if type(items) is not list:
            raise TypeError("the program's iterable did not give a list")
        return iter(items)

    def __len__(self):
        return self._ask("len")

    def __bool__(self):
        return self._ask("bool")

    def __str__(self):
        return str(self._ask("str"))

    def __repr__(self):
        return "<program object %s>" % object.__getattribute__(self, "_label")

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    __hash__ = object.__hash__


def not_dumpable():
    """No other process of our user may ptrace us or open /proc/<us>/fd or /mem."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (ImportError, OSError, AttributeError):
        pass


def program_names():
    try:
        message = wire.receive(REPLY_FD)
    except (OSError, EOFError, ValueError, wire.ProtocolError) as exc:
        channel.broken = GONE if isinstance(exc, EOFError) else "protocol error: %s" % exc
        raise ProgramGone(channel.broken) from None
    if type(message) is not dict or type(message.get("ready")) is not dict:
        channel.broken = GONE if message is None else "protocol error: no list of names"
        raise ProgramGone(channel.broken)
    names = {}
    for name, value in message["ready"].items():
        if type(value) is dict and set(value) == {"m"} and type(value["m"]) is str:
            try:
                names[name] = __import__(value["m"], fromlist=["_"])  # our own copy of the module
            except Exception:
                pass
        else:
            names[name] = wire.decode(value, Remote)
    return names


def run_tests():
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    namespace.update(program_names())
    with open(TESTS, encoding="utf-8") as f:
        exec(compile(f.read(), "tests.py", "exec"), namespace)
    if ENTRY_POINT:
        namespace["check"](namespace[ENTRY_POINT])
    channel.request("finish", None)


def main():
    not_dumpable()
    os.write(VERDICT_FD, b"R")  # the parent starts the program only after this
    verdict = {"passed": False, "error": None, "reason": None, "gone": False}
    try:
        run_tests()
        verdict["passed"] = channel.broken is None
    except BaseException as exc:
        lines = traceback.format_exception_only(type(exc), exc)
        verdict["error"] = (lines[-1].strip() if lines else type(exc).__name__)[:2000]
        if channel.reasons:
            verdict["reason"] = channel.reasons[0]
    if channel.broken:  # whatever the tests did after, the program's own end is the cause
        verdict.update(passed=False, gone=True, error=channel.broken)
    os.write(VERDICT_FD, json.dumps(verdict).encode("utf-8"))


main()
