"""The sandbox for model-written code, and the code scorer built on it.

The hostile programs here (fork bomb, memory bomb) carry their own safety caps, so a sandbox that
fails to contain them fails the test instead of taking the machine down.
"""
import math
import os
import sys
import time
from pathlib import Path

import pytest

from tunesmith.eval.code import extract_code, score_python
from tunesmith.eval.metrics import pass_at_k
from tunesmith.eval.sandbox import run_python

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs a POSIX system")
REPO = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    """A process that still runs; a killed zombie waiting for init to reap it does not count."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _running_with(marker: str) -> list[int]:
    """Live processes (seen from here, outside any sandbox namespace) whose command line holds
    `marker`; pids printed inside a sandbox are its own pid namespace's and mean nothing here."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes() and _alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def _gone_soon(marker: str, wait_s: float = 3) -> bool:
    deadline = time.monotonic() + wait_s
    while _running_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _running_with(marker)


# ----------------------------------------------------------------------------- normal runs


def test_normal_program_prints_and_passes():
    result = run_python("import math\nprint('hello', math.factorial(5))")
    assert result.ok and result.reason is None and result.returncode == 0
    assert result.stdout == "hello 120\n"
    assert result.stderr == ""
    assert "socket-guard" in result.isolation


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.geteuid() == 0),
                    reason="needs root on Linux")
def test_root_on_linux_gets_full_isolation():
    isolation = set(run_python("pass").isolation)
    assert {"netns", "mountns", "no_new_privs", "rlimits", "socket-guard"} <= isolation
    assert any(label.startswith("uid=") and label != "uid=0" for label in isolation)


def test_exception_is_an_error_with_the_exception_last():
    result = run_python("def f(x):\n    return 1 / x\nf(0)")
    assert not result.ok and result.reason == "error" and result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "ZeroDivisionError: division by zero"


def test_nonzero_exit_is_reported():
    result = run_python("import sys\nsys.exit(3)")
    assert result.reason == "error" and result.returncode == 3
    assert "exited with status 3" in result.stderr.splitlines()[-1]


def test_files_stdin_and_dataclasses_work():
    program = (
        "import helper\n"
        "from dataclasses import dataclass\n"
        "@dataclass\n"
        "class P:\n"
        "    x: int\n"
        "print(helper.X + int(input()), P(1))\n"
    )
    result = run_python(program, files={"helper.py": "X = 40\n"}, stdin="2\n")
    assert result.ok, result.stderr
    assert result.stdout == "42 P(x=1)\n"


def test_file_names_may_not_escape():
    with pytest.raises(ValueError, match="relative"):
        run_python("pass", files={"../escape.py": ""})


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    monkeypatch.setenv("PYTHONPATH", str(REPO / "src"))
    result = run_python("import os, sys\nprint(sorted(os.environ))\n"
                        "print(sys.flags.isolated, sys.flags.no_site)")
    assert result.ok, result.stderr
    names, flags = result.stdout.splitlines()
    for leaked in ("HF_TOKEN", "HTTPS_PROXY", "PYTHONPATH"):
        assert leaked not in names
    assert "PYTHONDONTWRITEBYTECODE" in names
    assert flags == "1 1"


def test_temp_dir_is_removed():
    result = run_python("import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())")
    assert result.ok, result.stderr
    work = Path(result.stdout.strip())
    assert work.name == "work" and not work.exists() and not work.parent.exists()


def test_stdout_is_capped():
    result = run_python("import sys\nsys.stdout.write('x' * 5_000_000)\nprint('done', file=sys.stderr)",
                        max_output_bytes=1000)
    assert result.ok, result.stderr
    assert result.stdout.startswith("x" * 1000)
    assert len(result.stdout) < 1200 and "4999000 more bytes dropped" in result.stdout
    assert result.stderr == "done\n"


# ----------------------------------------------------------------------------- limits


def test_infinite_loop_is_stopped_by_the_wall_clock():
    start = time.monotonic()
    result = run_python("while True:\n    pass", timeout_s=2)
    assert time.monotonic() - start < 4
    assert not result.ok and result.reason in ("timeout", "cpu-time")
    assert result.stderr.strip().splitlines()[-1].startswith("[sandbox]")


def test_sleeping_program_times_out():
    start = time.monotonic()
    result = run_python("import time\ntime.sleep(60)", timeout_s=1)
    assert time.monotonic() - start < 3
    assert result.reason == "timeout" and "1 s wall-clock" in result.stderr


def test_cpu_limit():
    start = time.monotonic()
    result = run_python("while True:\n    pass", cpu_s=1, timeout_s=20)
    if "rlimits" not in result.isolation:
        pytest.skip(f"resource limits unavailable here: {result.isolation}")
    assert result.reason == "cpu-time"
    assert time.monotonic() - start < 5


FORK_BOMB = """
import os, time
print(os.getcwd(), flush=True)
children = []
try:
    for _ in range(2000):  # safety cap: a sandbox without limits stops here
        pid = os.fork()
        if pid == 0:
            time.sleep(60)  # hold the process slot, as a real bomb would
            os._exit(0)
        children.append(pid)
except OSError:
    print("forked", len(children), flush=True)
    raise  # the children stay: cleaning them up is the sandbox's job
for pid in children:
    os.kill(pid, 9)
print("limits failed", len(children))
"""


def test_fork_bomb_is_contained_and_cleaned_up():
    result = run_python(FORK_BOMB, timeout_s=10, max_procs=32)
    assert "limits failed" not in result.stdout
    assert result.reason == "processes", result.stderr
    assert "max_procs=32" in result.stderr
    work, forked = result.stdout.split("\n")[:2]
    assert 0 < int(forked.split()[1]) < 32  # the program itself counts against max_procs
    assert _gone_soon(work)  # every fork ran main.py from this run's folder: none is left
    after = run_python("import os\nif os.fork() == 0:\n    os._exit(0)\nos.wait()\nprint('fine')")
    assert after.stdout == "fine\n"  # the sandbox user's process count is back to normal


def test_background_processes_do_not_outlive_the_run():
    program = (
        "import os, subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', os.getcwd()])\n"
        "print(os.getcwd(), flush=True)\n"
    )
    start = time.monotonic()
    result = run_python(program, timeout_s=10)
    assert result.ok, result.stderr
    assert time.monotonic() - start < 8  # did not wait for the sleeper to finish
    assert _gone_soon(result.stdout.strip())


def test_processes_that_leave_the_group_are_killed_too():
    program = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"  # a new session: the process-group kill no longer reaches it
        "    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', os.getcwd()])\n"
        "time.sleep(0.5)\n"
        "print(os.getcwd(), flush=True)\n"
    )
    result = run_python(program, timeout_s=10)
    if not any(label.endswith("netns") for label in result.isolation):
        pytest.skip(f"escaped processes are only tracked through a network namespace: {result.isolation}")
    assert result.ok, result.stderr
    assert _gone_soon(result.stdout.strip())


@pytest.mark.parametrize("program", [
    "big = bytearray(4 * 1024 ** 3)\nprint('limits failed')",
    "chunks = []\nfor _ in range(400):  # safety cap: 4 GB\n    chunks.append(bytearray(10 ** 7))\n"
    "print('limits failed')",
])
def test_memory_bomb(program):
    result = run_python(program, memory_mb=512)
    assert "limits failed" not in result.stdout
    assert result.reason == "memory", result.stderr
    assert "512 MB" in result.stderr


# ----------------------------------------------------------------------------- walls


@pytest.mark.parametrize("program", [
    "import socket\nsocket.create_connection(('127.0.0.1', 80), timeout=2)",
    "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 22))",
    "import socket\nsocket.getaddrinfo('example.com', 443)",
    "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)",
])
def test_network_is_blocked(program):
    result = run_python(program, timeout_s=10)
    assert result.reason == "network", result.stderr
    assert "network access is disabled in the sandbox" in result.stderr


def test_network_namespace_blocks_even_without_the_guard():
    program = (
        "import socket\n"
        "raw_connect = socket.socket.__mro__[1].connect  # the C method, under the guard\n"
        "s = socket.socket()\n"
        "try:\n"
        "    raw_connect(s, ('127.0.0.1', 22))\n"
        "    print('connected')\n"
        "except OSError as e:\n"
        "    print('blocked', e.errno)\n"
        "print(socket.if_nameindex())\n"
    )
    result = run_python(program)
    if not any(label.endswith("netns") for label in result.isolation):
        pytest.skip(f"no network namespace on this machine: {result.isolation}")
    assert result.ok, result.stderr
    assert result.stdout.startswith("blocked") and "[(1, 'lo')]" in result.stdout


def test_cannot_write_or_read_outside_the_sandbox():
    target = REPO / "sandbox-escape-test.txt"
    program = (
        f"for path in ({str(target)!r}, '/root/sandbox-escape-test.txt', {str(REPO / 'README.md')!r}):\n"
        "    try:\n"
        "        open(path, 'a').write('pwned')\n"
        "        print('wrote', path)\n"
        "    except OSError as e:\n"
        "        print('denied', type(e).__name__)\n"
        "try:\n"
        "    print('read', len(open('/root/.bash_history').read()))\n"
        "except OSError as e:\n"
        "    print('denied', type(e).__name__)\n"
    )
    result = run_python(program)
    if not any(label.startswith("uid=") for label in result.isolation):
        pytest.skip(f"the sandbox runs as our own user here (not root), files are ours: {result.isolation}")
    assert result.ok, result.stderr
    assert "wrote" not in result.stdout and "read" not in result.stdout
    assert result.stdout.count("denied") == 4
    assert not target.exists() and not Path("/root/sandbox-escape-test.txt").exists()


# ----------------------------------------------------------------------------- code scoring


def test_extract_code():
    answer = "Here:\n```text\nnot code\n```\nand\n```python\ndef f():\n    return 1\n```\nDone."
    assert extract_code(answer) == "def f():\n    return 1"
    assert extract_code("```\nx = 1\n```") == "x = 1"
    assert extract_code("  x = 2  \n") == "x = 2"
    assert extract_code("```python\ndef g():\n    pass") == "def g():\n    pass"  # cut off by max tokens
    assert extract_code("```python\n\n    return 1\n```", keep_indent=True) == "    return 1"


ADD_TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def test_score_python_correct_and_incorrect():
    right = score_python("def add(a, b):\n    return a + b", ADD_TESTS, entry_point="add")
    assert right.correct and right.score == 1.0 and right.error is None
    wrong = score_python("def add(a, b):\n    return a - b", ADD_TESTS, entry_point="add")
    assert not wrong.correct and wrong.score == 0.0
    assert wrong.error.startswith("error: AssertionError")


def test_score_python_plain_asserts_and_prefix():
    verdict = score_python("    return a * b", "assert mul(3, 4) == 12", prompt_prefix="def mul(a, b):\n")
    assert verdict.correct, verdict.error
    assert verdict.extracted == "def mul(a, b):\n    return a * b"


def test_score_python_extracts_fenced_code():
    answer = "Sure! Here is the function:\n\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds."
    verdict = score_python(answer, ADD_TESTS, entry_point="add")
    assert verdict.correct, verdict.error
    assert verdict.extracted == "def add(a, b):\n    return a + b"


def test_score_python_hang_fails_with_reason():
    verdict = score_python("def add(a, b):\n    while True:\n        pass", ADD_TESTS, entry_point="add",
                           timeout_s=1)
    assert not verdict.correct
    assert verdict.error.split(":")[0] in ("timeout", "cpu-time")


@pytest.mark.parametrize("exit_call", ["import os; os._exit(0)", "import sys; sys.exit(0)"])
def test_score_python_early_exit_is_not_a_pass(exit_call):
    verdict = score_python(f"def add(a, b):\n    return 0\n{exit_call}", ADD_TESTS, entry_point="add")
    assert not verdict.correct


def test_pass_at_k_hand_cases():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(200, 13, 1) == pytest.approx(13 / 200)
    assert pass_at_k(5, 2, 4) == 1.0  # n - c = 3 < k: every 4 samples include a correct one
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # C(3,2)/C(4,2)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 6)


def test_pass_at_k_matches_closed_form():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12), (n, c, k)
    assert pass_at_k(200, 50, 100) == pytest.approx(1 - math.comb(150, 100) / math.comb(200, 100))


# ----------------------------------------------------------------------------- the channel


def test_wire_round_trips_plain_data_and_nothing_else():
    from tunesmith.eval.sandbox import wire

    value = [None, True, 3, -0.5, float("inf"), "s", b"\x00b", 1 + 2j, (1, [2]), {"k": {3}}, frozenset({4}), {(1, 2): None}]
    refs = []
    back = wire.decode(wire.encode(value, refs.append), lambda ref, label: ("ref", ref))
    assert back == value and refs == []
    assert [type(v) for v in back] == [type(v) for v in value]

    class Str(str):
        def __eq__(self, other):
            return True

    made = []
    encoded = wire.encode([Str("x"), 1], lambda obj: made.append(obj) or {"r": 7, "n": "Str"})
    assert made[0] == "x" and encoded == [{"r": 7, "n": "Str"}, 1]  # the subclass stays behind
    with pytest.raises(wire.ProtocolError):
        wire.decode({"x": []}, lambda ref, label: None)
    with pytest.raises(wire.ProtocolError):
        wire.decode(json_nested(wire.MAX_DEPTH + 5), lambda ref, label: None)


def json_nested(depth: int):
    value = 0
    for _ in range(depth):
        value = [value]
    return value


def test_missing_bubblewrap_falls_back_with_a_warning(monkeypatch):
    import tunesmith.eval.sandbox as sandbox
    from tunesmith.eval.sandbox import _setup

    monkeypatch.setattr(_setup, "find_bwrap", lambda: None)
    monkeypatch.setattr(_setup, "_warned", set())
    if not sys.platform.startswith("linux"):
        pytest.skip("bubblewrap is Linux only")
    with pytest.warns(RuntimeWarning, match="bubblewrap not found"):
        plan = sandbox._plan.__wrapped__()
    assert plan.bwrap is None


def test_a_program_whose_top_level_fails_reports_its_exception():
    verdict = score_python("import nonexistent_module\ndef add(a, b):\n    return a + b", ADD_TESTS, entry_point="add")
    assert not verdict.correct
    assert verdict.error == "error: ModuleNotFoundError: No module named 'nonexistent_module'"
