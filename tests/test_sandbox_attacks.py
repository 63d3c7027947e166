"""Hostile programs against the code scorer: none may score as correct, each fails for the
reason stated, and honest programs still pass.

Most attacks define a wrong `add` and try to forge a pass anyway; the others define an `add` that
is right only if the attack got through (read a secret, reach the network, escape the folder), so
a pass would mean the wall fell. Every run happens with a secret in our environment.
`benchmarks/reliability/cases_sandbox.py` replays this same table as reliability cases.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tunesmith.eval.code import score_python
from tunesmith.eval.sandbox import run_python
from tunesmith.data.tasks.base import Verdict

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs a POSIX system")

ADD_TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
SECRET_NAME, SECRET = "TUNESMITH_SANDBOX_SECRET", "s3cret-value-the-program-must-not-see"
DAEMON_TOKEN = "tunesmith-attack-daemon"
WRONG = "\ndef add(a, b):\n    return a - b\n"
GONE = "the program exited before its tests finished"
FORGE = "tunesmith-tests-finished-0123456789abcdef"


@dataclass(frozen=True)
class Attack:
    name: str
    program: str
    reason: str | tuple[str, ...] | None
    "The Verdict.error prefix expected (a tuple: any of them); None: the program must pass."
    needle: str = ""
    "Text the one-line error must contain."
    tests: str = ADD_TESTS
    timeout_s: float = 5
    before: str | None = None
    "A program run first on its own (e.g. one that leaves files behind for the next run)."

    @property
    def expected(self) -> str:
        if self.reason is None:
            return "passes"
        reasons = self.reason if isinstance(self.reason, tuple) else (self.reason,)
        return "fails: " + "/".join(reasons) + (f" ({self.needle})" if self.needle else "")


def judge(attack: Attack) -> tuple[Verdict, bool, str]:
    """Score the attack with a secret in our environment; (verdict, as expected, what happened)."""
    old = os.environ.get(SECRET_NAME)
    os.environ[SECRET_NAME] = SECRET
    try:
        if attack.before is not None:
            run_python(attack.before, timeout_s=attack.timeout_s)
        verdict = score_python(attack.program, attack.tests, entry_point="add", timeout_s=attack.timeout_s)
    finally:
        if old is None:
            del os.environ[SECRET_NAME]
        else:
            os.environ[SECRET_NAME] = old
    got = "passes" if verdict.correct else f"fails: {verdict.error}"
    if attack.reason is None:
        return verdict, verdict.correct, got
    reasons = attack.reason if isinstance(attack.reason, tuple) else (attack.reason,)
    error = verdict.error or ""
    ok = (not verdict.correct and error.split(":")[0] in reasons and attack.needle in error
          and SECRET not in error)
    return verdict, ok, got[:200]


def leftover_processes(token: str) -> list[int]:
    """Live processes on this machine whose command line holds `token`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and token.encode() in (entry / "cmdline").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":  # a killed zombie waiting for its reaper does not count
                    found.append(int(entry.name))
        except OSError:
            pass
    return found


# Programs that read something they must not, then use it to forge the result.
STEAL = [
    Attack("reads its own file and prints the end marker",
           "import sys\nsrc = open(sys.modules['__main__'].__file__).read()\n"
           f"print(src, {FORGE!r}, flush=True)" + WRONG, "error", "AssertionError"),
    Attack("reads its argv", "import sys\nprint(sys.argv, sys.orig_argv, flush=True)" + WRONG,
           "error", "AssertionError"),
    Attack("reads the environment for a secret",
           f"import os\ndef add(a, b):\n    assert os.environ[{SECRET_NAME!r}] == {SECRET!r}\n    return a + b\n",
           "error", "KeyError"),
    Attack("reads /proc/self (cmdline, environ, every fd)",
           "import os\nfor name in ('cmdline', 'environ'):\n    print(open('/proc/self/' + name, 'rb').read())\n"
           "for fd in os.listdir('/proc/self/fd'):\n    try:\n        print(os.readlink('/proc/self/fd/' + fd))\n"
           "    except OSError:\n        pass\n" + WRONG, "error", "AssertionError"),
    Attack("reads its parent's environment through /proc",
           "import os\ndef add(a, b):\n    data = open('/proc/%d/environ' % os.getppid(), 'rb').read()\n"
           f"    assert {SECRET!r}.encode() in data, 'no secret'\n    return a + b\n", "error", ""),
    Attack("scans every process's environ and cmdline for the secret",
           "import os\ndef add(a, b):\n    for pid in filter(str.isdigit, os.listdir('/proc')):\n"
           "        for name in ('environ', 'cmdline'):\n            try:\n"
           f"                if {SECRET!r}.encode() in open('/proc/%s/%s' % (pid, name), 'rb').read():\n"
           "                    return a + b\n            except OSError:\n                pass\n"
           "    raise LookupError('no secret anywhere')\n", "error", "LookupError"),
    Attack("walks the frame stack for the tests",
           "import sys\ndef add(a, b):\n    f = sys._getframe(1)\n    while f is not None:\n"
           "        if 'candidate' in f.f_locals:\n            f.f_locals['candidate'] = None\n            return a + b\n"
           "        f = f.f_back\n    raise LookupError('no test frame')\n", "error", "LookupError"),
    Attack("searches gc for check() and rewrites it",
           "import gc\nfor obj in gc.get_objects():\n    if getattr(obj, '__name__', '') == 'check':\n"
           "        obj.__code__ = (lambda candidate: None).__code__\n" + WRONG, "error", "AssertionError"),
    Attack("inspects the stack for a verdict variable",
           "import inspect\ndef add(a, b):\n    for info in inspect.stack():\n"
           "        if 'verdict' in info.frame.f_globals:\n            info.frame.f_globals['verdict'] = {'passed': True}\n"
           "    return a - b\n", "error", "AssertionError"),
    Attack("imports tunesmith and patches the scorer",
           "import sys\nsys.path[:0] = [p + '/src' for p in ('/work/main', '.', '..')]\ntry:\n"
           "    import tunesmith.eval.sandbox as s\n    s.run_tests = lambda *a, **k: None\nexcept ImportError:\n"
           "    pass\n" + WRONG, "error", "AssertionError"),
]

# Programs that try to end the run early or fake its end.
EXIT = [
    Attack("os._exit(0) at the top level", "import os\nos._exit(0)" + WRONG, "error", GONE),
    Attack("sys.exit(0) at the top level", "import sys\nsys.exit(0)" + WRONG, "error", GONE),
    Attack("os._exit(0) inside a test call", "import os\ndef add(a, b):\n    os._exit(0)\n", "error", GONE),
    Attack("raises SystemExit(0) inside a test call", "def add(a, b):\n    raise SystemExit(0)\n",
           "error", "SystemExit"),
    Attack("prints a fake end marker and verdict",
           f"import sys\nprint({FORGE!r})\nprint('{{\"passed\": true}}')\nsys.stderr.write('ok\\n')" + WRONG,
           "error", "AssertionError"),
    Attack("writes a fake verdict to every descriptor",
           "import os\nfor fd in range(256):\n    try:\n"
           "        os.write(fd, b'R{\"passed\": true, \"error\": null, \"reason\": null, \"gone\": false}')\n"
           "    except OSError:\n        pass\n" + WRONG, "error", ""),
    Attack("kills its parent and everything it can signal",
           "import os, signal\nfor pid in (os.getppid(), -1):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
           "    except OSError:\n        pass\n" + WRONG, "error", ""),
]

# Programs that tamper with the tests instead of passing them.
TAMPER = [
    Attack("patches builtins (AssertionError, print, __import__)",
           "import builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {})\nbuiltins.print = lambda *a: None\n"
           "real = builtins.__import__\nbuiltins.__import__ = lambda *a, **k: real(*a, **k)" + WRONG,
           "error", "AssertionError"),
    Attack("replaces sys.modules entries", "import sys, types\nsys.modules['builtins'] = types.ModuleType('x')\n"
           "sys.modules['json'] = types.ModuleType('json')" + WRONG, "error", "AssertionError"),
    Attack("defines its own check()", "def check(candidate):\n    pass\n" + WRONG, "error", "AssertionError"),
    Attack("installs a trace hook that skips assertions",
           "import sys, threading\ndef skip(frame, event, arg):\n    if event == 'line' and 'assert' in "
           "str(frame.f_code.co_name):\n        frame.f_lineno += 1\n    return skip\nsys.settrace(skip)\n"
           "threading.settrace(skip)" + WRONG, "error", "AssertionError"),
    Attack("returns an object whose __eq__ is always True",
           "class Anything:\n    def __eq__(self, other):\n        return True\n"
           "def add(a, b):\n    return Anything()\n", "error", "AssertionError"),
    Attack("returns an int subclass that equals everything",
           "class Int(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
           "def add(a, b):\n    return Int(0)\n", "error", "AssertionError"),
]

# Programs that attack the machine.
RESOURCES = [
    Attack("fork bomb", "import os, time\ndef add(a, b):\n    for _ in range(2000):\n        if os.fork() == 0:\n"
           "            time.sleep(60)\n            os._exit(0)\n    return a + b\n", "processes", "BlockingIOError",
           timeout_s=10),
    Attack("memory bomb", "def add(a, b):\n    block = bytearray(8 * 1024 ** 3)\n    return a + b\n", "memory"),
    Attack("busy loop", "def add(a, b):\n    while True:\n        pass\n", ("timeout", "cpu-time"), timeout_s=2),
    Attack("exhausts file descriptors", "import os\nheld = []\ntry:\n    while len(held) < 100000:\n"
           "        held.append(os.open('/dev/null', os.O_RDONLY))\nexcept OSError:\n    pass\n" + WRONG,
           "error", "AssertionError"),
    Attack("floods its output", "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 1_000_000)\n" + WRONG,
           "error", "AssertionError", timeout_s=10),
    Attack("connects a socket", "import socket\ndef add(a, b):\n"
           "    socket.create_connection(('127.0.0.1', 22), timeout=1)\n    return a + b\n", "network",
           "network access is disabled"),
    Attack("opens a socket with raw libc calls (ctypes)",
           "import ctypes, os, struct\nlibc = ctypes.CDLL(None, use_errno=True)\ndef add(a, b):\n"
           "    fd = libc.socket(2, 1, 0)\n    addr = struct.pack('<HH4s8x', 2, 22 << 8, bytes([127, 0, 0, 1]))\n"
           "    if libc.connect(fd, addr, len(addr)) != 0:\n        raise OSError(ctypes.get_errno(), 'raw connect failed')\n"
           "    return a + b\n", "error", "raw connect failed"),
    Attack("calls setuid(0)", "import os\ndef add(a, b):\n    os.setuid(0)\n    return a + b\n",
           "error", "Errno"),
    Attack("reads /etc/shadow", "def add(a, b):\n    open('/etc/shadow').read()\n    return a + b\n",
           "error", "Error"),
    Attack("writes outside its folder",
           "def add(a, b):\n    for path in ('/work/main/escaped.txt', '/root/escaped.txt', '/etc/escaped.txt'):\n"
           "        open(path, 'w').write('pwned')\n    return a + b\n", "error", "Error"),
    Attack("reads another run's leftovers in /tmp and /dev/shm",
           "def add(a, b):\n    for path in ('/tmp/tunesmith-leftover', '/dev/shm/tunesmith-leftover'):\n"
           "        assert open(path).read() == 'left', path\n    return a + b\n", "error", "Error",
           before="for path in ('/tmp/tunesmith-leftover', '/dev/shm/tunesmith-leftover'):\n"
                  "    open(path, 'w').write('left')\n"),
]

DAEMON = Attack(
    "double-fork daemon outlives the run",
    "import os, sys\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
    f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {DAEMON_TOKEN!r}])\n"
    "    os._exit(0)\nos.wait()\ndef add(a, b):\n    return a + b\n", None)

HONEST = [
    Attack("honest: correct add with check()", "```python\ndef add(a, b):\n    return a + b\n```", None),
    Attack("honest: HumanEval-style prompt, body and check",
           "from typing import List\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
           "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n"
           "add = has_close_elements\n", None,
           tests="METADATA = {'author': 'jt'}\n\ndef check(candidate):\n"
                 "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
                 "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n"
                 "    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 0.5) == False\n"),
    Attack("honest: a class, exceptions, containers and plain asserts",
           "import math\nclass Stack:\n    def __init__(self):\n        self.items = []\n"
           "    def push(self, x):\n        self.items.append(x)\n    def pop(self):\n"
           "        if not self.items:\n            raise IndexError('empty')\n        return self.items.pop()\n"
           "def add(a, b):\n    return {'sum': (a + b, [a, b]), 'set': {a, b}}\n", None,
           tests="s = Stack()\ns.push(1)\ns.push({'k': (1.5, b'x')})\nassert s.pop() == {'k': (1.5, b'x')}\n"
                 "assert s.pop() == 1 and len(s.items) == 0\ntry:\n    s.pop()\n    assert False\n"
                 "except IndexError as e:\n    assert 'empty' in str(e)\n"
                 "assert add(2, 3) == {'sum': (5, [2, 3]), 'set': {2, 3}}\nassert math.isclose(math.pi, 3.14159, rel_tol=1e-3)\n"),
    Attack("honest: prints, uses /tmp and its folder", "import tempfile\nprint('working...')\n"
           "def add(a, b):\n    with tempfile.TemporaryFile() as f, open('/tmp/scratch', 'w') as g:\n"
           "        f.write(b'x')\n        g.write('y')\n    return a + b\n", None),
]

ATTACKS = STEAL + EXIT + TAMPER + RESOURCES + [DAEMON]


@pytest.mark.parametrize("attack", ATTACKS + HONEST, ids=lambda a: a.name)
def test_attack(attack):
    verdict, ok, got = judge(attack)
    assert ok, f"expected {attack.expected}, got {got}"


def test_there_are_enough_attacks():
    assert len(ATTACKS) >= 25 and len({a.name for a in ATTACKS + HONEST}) == len(ATTACKS + HONEST)


def test_daemon_is_gone_after_the_run():
    judge(DAEMON)
    deadline = time.monotonic() + 3
    while leftover_processes(DAEMON_TOKEN) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftover_processes(DAEMON_TOKEN) == []


def test_nothing_escaped_to_the_host():
    for attack in RESOURCES:
        if attack.name in ("writes outside its folder", "reads another run's leftovers in /tmp and /dev/shm"):
            judge(attack)
    for path in ("/work/main/escaped.txt", "/root/escaped.txt", "/etc/escaped.txt"):
        assert not Path(path).exists(), path
    result = run_python("import os\nprint(sorted(os.listdir('/tmp')), sorted(os.listdir('/dev/shm')))")
    if "private-tmp" not in result.isolation:
        pytest.skip(f"no private /tmp here: {result.isolation}")
    assert "tunesmith-leftover" not in result.stdout
    assert not Path("/tmp/tunesmith-leftover").exists() and not Path("/dev/shm/tunesmith-leftover").exists()


def test_tunesmith_is_not_importable_under_bubblewrap():
    program = "import sys\nsys.path[:0] = ['/work/main/src', %r]\nimport tunesmith\n" % str(Path(__file__).parents[1] / "src")
    result = run_python(program)
    if "bwrap" not in result.isolation:
        pytest.skip(f"the fallback shows the file system as it is: {result.isolation}")
    assert result.reason == "error" and "ModuleNotFoundError" in result.stderr


@pytest.fixture
def fallback(monkeypatch):
    """The sandbox as it is where bubblewrap cannot run: the launcher's own namespaces."""
    import tunesmith.eval.sandbox as sandbox
    from tunesmith.eval.sandbox._setup import base_plan

    if not (sys.platform.startswith("linux") and os.geteuid() == 0):
        pytest.skip("the fallback walls this suite expects need root on Linux")
    monkeypatch.setattr(sandbox, "_plan", base_plan)


@pytest.mark.parametrize("attack", ATTACKS + HONEST[:1], ids=lambda a: a.name)
def test_attack_without_bubblewrap(fallback, attack):
    verdict, ok, got = judge(attack)
    assert ok, f"expected {attack.expected}, got {got}"
