"""Scoring model-written Python: pull the code out of the answer, run it with the tests in the
sandbox, and estimate pass@k."""
from __future__ import annotations

import re
import secrets

from tunesmith.eval.sandbox import run_python
from tunesmith.eval.task import Verdict

# An opening fence, its language tag, and the block up to the closing fence. A missing closing
# fence counts as "to the end": answers cut off by the token limit still have their code scored.
_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3"}
ERROR_CHARS = 300
"Verdict.error is cut to this length: one line a person can read in a table."


def extract_code(text: str, *, keep_indent: bool = False) -> str:
    """The code in a model's answer: the first ```python block, else the first ``` block of any
    language, else the whole text; stripped.

    keep_indent=True keeps the first line's indentation (trims only blank lines and trailing
    whitespace), for answers that continue a function body.
    """
    blocks = _FENCE.findall(text)
    python = [body for tag, body in blocks if tag.lower() in _PYTHON_TAGS]
    code = python[0] if python else blocks[0][1] if blocks else text
    if keep_indent:
        return "\n".join(line.rstrip() for line in code.strip("\n").splitlines()).strip("\n")
    return code.strip()


def score_python(
    prediction: str,
    tests: str,
    *,
    entry_point: str | None = None,
    prompt_prefix: str = "",
    timeout_s: float = 10,
) -> Verdict:
    """Run the code extracted from `prediction` against `tests` in the sandbox.

    The program is prompt_prefix + code + tests; when the tests define `check` (HumanEval style)
    and an entry point is given, `check(entry_point)` is called. Correct iff the program exits 0
    *and* reaches its end: a solution that calls `os._exit(0)` or `sys.exit(0)` before the tests
    run does not pass. On failure, `error` is the sandbox reason plus the last line of stderr.

    With a prompt_prefix the code keeps its first line's indentation, since it may continue a
    function body the prefix opened.
    """
    code = extract_code(prediction, keep_indent=bool(prompt_prefix))
    done = f"tunesmith-tests-finished-{secrets.token_hex(8)}"
    program = f"{prompt_prefix}{code}\n\n{tests}\n"
    if entry_point and re.search(r"^def check\s*\(", tests, re.MULTILINE):
        program += f"\ncheck({entry_point})\n"
    # Printed last, from a name the program cannot guess, to prove the tests ran to the end.
    program += f"\nprint({done!r}, flush=True)\n"
    result = run_python(program, timeout_s=timeout_s)
    finished = result.ok and done in result.stdout
    error = None if finished else _error_line(result.reason or "error", result.stderr, result.ok)
    return Verdict(correct=finished, score=float(finished), error=error, extracted=prompt_prefix + code)


def _error_line(reason: str, stderr: str, exited_ok: bool) -> str:
    if exited_ok:  # exit 0 without our end marker
        return "error: the program exited before its tests finished"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else "(no error output)"
    return f"{reason}: {last}"[:ERROR_CHARS]


