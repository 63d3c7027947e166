"""`tunesmith bench`: figures from a real (tiny) training step, the FLOP count by hand, the cached peak."""
import json

import pytest
import torch

from tests.conftest import make_tiny_model
from tests.conftest import tiny_recipe
from tunesmith.bench import throughput as tp


def test_bench_reports_consistent_figures(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tp, "matmul_peak", lambda *a, **k: 1.0)  # 1 TFLOP/s: MFU = achieved TFLOP/s
    r = tp.bench(tiny_recipe(tmp_path, tiny_model_dir, "train.batch_tokens=256"), steps=3, warmup=1)
    assert r.steps == 3 and len(r.info["step_s"]) == 3
    assert r.s_per_step == pytest.approx(sum(r.info["step_s"]) / 3)
    assert 0 < r.trained_tokens_per_s < r.tokens_per_s
    assert r.mfu == pytest.approx(r.flops_per_token * r.tokens_per_s / 1e12)
    assert r.peak_mem_gb > 0
    shares = r.breakdown
    assert set(shares) == {"embedding", "attention", "mlp", "norms", "optimizer", "lm_head + loss + rest"}
    assert all(v >= 0 for v in shares.values()) and sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
    assert shares["attention"] > 0 and shares["mlp"] > 0  # forward and backward both timed


def test_flops_per_token_by_hand(tokenizer):
    model = make_tiny_model(tokenizer)  # hidden 64, ffn 128, 2 layers, 4 heads / 2 kv heads, tied head
    d, f, layers, kv = 64, 128, 2, 32
    body = layers * (d * d + 2 * d * kv + d * d + 3 * d * f)
    head = d * len(tokenizer)
    ctx = 10.0
    attention = 4 * layers * d * ctx
    model.requires_grad_(True)
    full = tp.flops_per_token(model, ctx)
    assert full == pytest.approx(6 * body + 3 * attention + 6 * head)
    model.requires_grad_(False)
    frozen = tp.flops_per_token(model, ctx, head_fraction=0.5)
    assert frozen == pytest.approx(4 * body + 3 * attention + 0.5 * 4 * head)


def test_matmul_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    first = tp.matmul_peak(torch.device("cpu"), "fp32", threads=1, size=128, seconds=0.1)
    assert first > 0
    cached = json.loads((tmp_path / "bench" / "matmul_peak.json").read_text())
    assert list(cached.values()) == [first]
    monkeypatch.setattr(torch, "randn", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-measured")))
    assert tp.matmul_peak(torch.device("cpu"), "fp32", threads=1, size=128, seconds=0.1) == first


def test_allocator_env_preloads_jemalloc_once(tmp_path):
    from tunesmith.runtime import allocator_env

    lib = tmp_path / "libjemalloc.so.2"
    assert allocator_env({}, candidates=[str(lib)]) is None  # not installed: nothing to do
    lib.write_bytes(b"")
    env = allocator_env({"LD_PRELOAD": "other.so"}, candidates=[str(lib)])
    assert env["LD_PRELOAD"] == f"{lib} other.so"
    assert allocator_env(env, candidates=[str(lib)]) is None  # already preloaded
    assert allocator_env({"TUNESMITH_ALLOCATOR": "system"}, candidates=[str(lib)]) is None


def test_command_line_runs_on_jemalloc_when_installed(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tunesmith.runtime import JEMALLOC

    if not any(Path(c).is_file() for c in JEMALLOC):
        pytest.skip("jemalloc is not installed on this machine")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TUNESMITH_ALLOCATOR")}
    env["TUNESMITH_CACHE"] = str(tmp_path)
    run = lambda extra: subprocess.run([sys.executable, "-m", "tunesmith", "bench", "--peak"], capture_output=True,
                                       text=True, timeout=300, env={**env, **extra})
    on = run({})
    assert on.returncode == 0, on.stderr
    assert "allocator jemalloc" in on.stdout
    off = run({"TUNESMITH_ALLOCATOR": "system"})
    assert off.returncode == 0 and "allocator system" in off.stdout


def test_peak_memory_is_the_process_own_not_its_parents():
    """A run started from a large process (a notebook, this test runner) reports its own peak: through
    vfork + exec, `ru_maxrss` starts at the parent's peak (here 1.5 GB more than the child ever holds)."""
    import subprocess
    import sys

    held = bytearray(1536 * 1024 * 1024)
    for i in range(0, len(held), 4096):
        held[i] = 1
    code = "import torch; from tunesmith.runtime import peak_memory_gb; print(peak_memory_gb(torch.device('cpu')))"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.05 < child < 1.2, child
    del held
