"""Several processes on CPU (gloo): the same global batch gives the single-process loss curve and
weights; rank shards cover the data exactly once; a 2-process run resumes; FSDP2 trains."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.recipe import load_recipe
from tunesmith.train.distributed import Dist, window
from tunesmith.train.loop import train
from tunesmith.train.metrics import read_metrics

ROOT = Path(__file__).parent.parent


def test_rank_shards_cover_every_micro_batch_once():
    world, accum, steps = 3, 2, 7
    per_step = world * accum
    seen = []
    for step in range(steps):
        for rank in range(world):
            seen += window(step * per_step, accum, Dist(rank, world, rank, "ddp"))
    assert sorted(seen) == list(range(steps * per_step))


def write_data(tmp_path, n=40):
    path = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i + 1}?"},
                          {"role": "assistant", "content": f"{i} plus {i + 1} is {2 * i + 1}."}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def overrides(tmp_path, model_dir, name, *extra):
    return [f"model.name={model_dir}", f"data.train={write_data(tmp_path)}", f"output_dir={tmp_path / 'runs'}",
            f"name={name}", "data.val_fraction=0", "train.batch_tokens=160", "train.steps=4", "train.precision=fp32",
            "train.lr=5e-3", "train.warmup=0", "train.save_every=2", "train.keep_last=5", "data.max_length=64",
            "method.lora.dropout=0", "train.threads=1", *extra]


def torchrun(args, nproc=2, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tunesmith", "train", str(ROOT / "recipes" / "lora-sft.yaml"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in {timeout} s (a hung collective?)\n{(e.stderr or '')[-3000:]}")
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stderr[-4000:]}"
    return r


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def final_weights(run_dir, step=4):
    return load_file(run_dir / "checkpoints" / f"step-{step}" / "trainable.safetensors")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_equal_one_with_same_global_batch(tmp_path, tiny_model_dir, method):
    extra = [f"method.name={method}"] + (["train.lr=1e-3"] if method == "full" else [])
    one = train(load_recipe(ROOT / "recipes" / "lora-sft.yaml", overrides(tmp_path, tiny_model_dir, "one", "train.grad_accum=2", *extra)))
    torchrun(overrides(tmp_path, tiny_model_dir, "two", "train.grad_accum=1", "train.strategy=ddp", *extra))
    two_dir = tmp_path / "runs" / "two"
    a, b = losses(one.run_dir), losses(two_dir)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-5, (a, b)
    wa, wb = final_weights(one.run_dir), final_weights(two_dir)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-5, rtol=1e-4)
    rows = read_metrics(two_dir / "metrics.jsonl")
    assert all(r["trained_tokens"] == s["trained_tokens"] for r, s in zip(rows, read_metrics(one.run_dir / "metrics.jsonl")))


def test_two_process_run_resumes_on_its_curve(tmp_path, tiny_model_dir):
    args = overrides(tmp_path, tiny_model_dir, "r", "train.strategy=ddp")
    torchrun(args)
    run = tmp_path / "runs" / "r"
    full = losses(run)
    # as if the job had died after step 2: the newest checkpoint is step-2
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-4")
    # `nproc=2` makes `tunesmith train` launch torchrun itself
    cmd = [sys.executable, "-m", "tunesmith", "train", str(ROOT / "recipes" / "lora-sft.yaml"), *args,
           "resume=true", "nproc=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    assert "launching 2 processes" in r.stdout
    assert losses(run) == pytest.approx(full, abs=1e-6)


def test_fsdp_two_processes_match_one(tmp_path, tiny_model_dir):
    extra = ["method.name=full", "train.lr=1e-3"]
    one = train(load_recipe(ROOT / "recipes" / "lora-sft.yaml", overrides(tmp_path, tiny_model_dir, "one", "train.grad_accum=2", *extra)))
    torchrun(overrides(tmp_path, tiny_model_dir, "fsdp", "train.grad_accum=1", "train.strategy=fsdp", *extra))
    run = tmp_path / "runs" / "fsdp"
    a, b = losses(one.run_dir), losses(run)
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-4, (a, b)
    assert (run / "checkpoints" / "step-4" / "dcp").is_dir()
    assert (run / "model" / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    # the weights gathered into rank 0's model (no second model built) are the one-process run's
    gathered = AutoModelForCausalLM.from_pretrained(run / "model").state_dict()
    single = AutoModelForCausalLM.from_pretrained(one.run_dir / "model").state_dict()
    assert gathered.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(gathered[name], single[name], atol=2e-4, rtol=1e-3, msg=name)


def test_fsdp_resume_from_sharded_checkpoint(tmp_path, tiny_model_dir):
    import shutil

    args = overrides(tmp_path, tiny_model_dir, "fr", "train.strategy=fsdp", "method.name=full", "train.lr=1e-3")
    torchrun(args)
    run = tmp_path / "runs" / "fr"
    full = losses(run)
    shutil.rmtree(run / "checkpoints" / "step-4")
    torchrun(args + ["resume=true"])
    assert losses(run) == pytest.approx(full, abs=1e-5)
    # an FSDP checkpoint cannot be resumed by a single unsharded process: a clear error says so
    from tunesmith.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="sharded"):
        train(load_recipe(ROOT / "recipes" / "lora-sft.yaml", args + ["resume=true", "train.steps=6"]))


def test_a_dying_rank_takes_the_job_down(tmp_path, tiny_model_dir):
    import signal
    import time

    args = overrides(tmp_path, tiny_model_dir, "die", "train.strategy=ddp", "train.steps=100000", "train.save_every=0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tunesmith", "train", str(ROOT / "recipes" / "lora-sft.yaml"), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "runs" / "die" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
        time.sleep(0.5)
    assert metrics.is_file(), "training never started"
    # the rank-1 worker: a child of torchrun whose environment says RANK=1
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    victim = next(int(p) for p in workers if "RANK=1\0" in Path(f"/proc/{p}/environ").read_text(errors="ignore"))
    os.kill(victim, signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job hung after a rank died")
    assert proc.returncode != 0
    assert "rank" in err.lower() and ("SIGKILL" in err or "-9" in err), err[-2000:]
