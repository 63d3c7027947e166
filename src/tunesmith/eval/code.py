"""Scoring model-written Python: pull the code out of the answer, run it with the tests in the
sandbox, and estimate pass@k."""
from __future__ import annotations

import re

from tunesmith.eval.sandbox import run_tests
from tunesmith.data.tasks.base import Verdict

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

    The program is prompt_prefix + code; the tests run in a separate trusted process that calls
    the program's functions over a pipe (see tunesmith.eval.sandbox), so nothing the program does
    (exit early, print, patch builtins or `check`, forge `__eq__`) can make it pass. When the
    tests define `check` (HumanEval style) and an entry point is given, `check(entry_point)` is
    called after them. On failure, `error` is the reason plus one line saying why.

    With a prompt_prefix the code keeps its first line's indentation, since it may continue a
    function body the prefix opened.
    """
    code = extract_code(prediction, keep_indent=bool(prompt_prefix))
    program = f"{prompt_prefix}{code}\n"
    check = entry_point if entry_point and re.search(r"^def check\s*\(", tests, re.MULTILINE) else None
    run = run_tests(program, tests, check=check, timeout_s=timeout_s)
    error = None if run.passed else f"{run.reason or 'error'}: {run.error}"[:ERROR_CHARS]
    return Verdict(correct=run.passed, score=float(run.passed), error=error, extracted=prompt_prefix + code)


