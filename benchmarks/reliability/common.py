"""What every reliability case shares: the Case/Outcome records, a CLI runner and the checks
for a traceback, a forged pass, a poisoned checkpoint and a silently dropped record.

A case module (`cases_*.py` beside this file) exposes `CASES: list[Case]`; `run.py` collects them.
A case's `run(tmp)` gets a fresh temporary folder and returns an Outcome; an exception escaping
`run` is itself reported as a traceback.
"""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
TUNESMITH = [sys.executable, "-m", "tunesmith.cli"]


@dataclass
class Outcome:
    got: str
    "What happened, in a few words (the one-line error, the verdict, ...)."
    ok: bool
    "True when `got` is what the case expects."
    traceback: bool = False
    "A Python traceback reached the user."
    forged: bool = False
    "Code under test scored as passing when it should not have."
    poisoned: bool = False
    "A checkpoint (or the newest 'healthy' one) holds non-finite weights or cannot be resumed."
    silent_drop: bool = False
    "Input was dropped without being counted or reported."


@dataclass
class Case:
    name: str
    group: str
    expected: str
    run: Callable[[Path], Outcome]


def cli(args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None,
        input: str | None = None) -> subprocess.CompletedProcess:
    """`tunesmith ARGS` in a child process (no stdin unless given); output captured as text."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    return subprocess.run(TUNESMITH + [str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL)


def has_traceback(text: str) -> bool:
    return "Traceback (most recent call last)" in text


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def expect_error(proc: subprocess.CompletedProcess, *needles: str) -> Outcome:
    """A command that must fail with a one-line error containing every needle (case-insensitive)."""
    out = proc.stdout + proc.stderr
    line = last_line(proc.stderr) or last_line(proc.stdout)
    ok = proc.returncode != 0 and not has_traceback(out) and all(n.lower() in line.lower() for n in needles)
    return Outcome(got=f"rc={proc.returncode}: {line}"[:160], ok=ok, traceback=has_traceback(out))


_TINY: dict[int, Path] = {}


def tiny_model(layers: int = 2) -> Path:
    """A tiny random Llama with the embedded model's tokenizer, saved once per run of the cases."""
    if layers not in _TINY:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from tunesmith.models.load import load_tokenizer

        tok = load_tokenizer("smollm2-135m-instruct")
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        folder = Path(tempfile.mkdtemp(prefix="tunesmith-rel-tiny-"))
        atexit.register(shutil.rmtree, folder, True)
        LlamaForCausalLM(config).save_pretrained(folder)
        tok.save_pretrained(folder)
        _TINY[layers] = folder
    return _TINY[layers]
