"""Reliability cases, group "train": faults during a run and damaged checkpoints, replayed through
the real command line on a tiny model — divergence, kill -9, Ctrl-C, a full disk, truncated or
poisoned checkpoint files.

A checkpoint counts as poisoned when a `step-N` folder that resume would use holds non-finite
weights or fails its manifest, or when a healthy checkpoint was deleted.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

from common import ROOT, TUNESMITH, Case, Outcome, cli, expect_error, has_traceback, last_line, tiny_model

SFT = str(ROOT / "recipes" / "lora-sft.yaml")


def chats(tmp: Path, n: int = 48) -> Path:
    path = tmp / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i + 1}?"},
                          {"role": "assistant", "content": f"{i} plus {i + 1} is {2 * i + 1}."}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def args(tmp: Path, *overrides: str, out: Path | None = None) -> list[str]:
    return ["train", SFT, f"model.name={tiny_model()}", f"data.train={chats(tmp)}", "data.val_fraction=0",
            "train.precision=fp32", "train.batch_tokens=256", "train.steps=8", "train.save_every=2",
            f"output_dir={out or tmp / 'runs'}", "name=r", *overrides]


def run_dir(tmp: Path) -> Path:
    return tmp / "runs" / "r"


def checkpoints(tmp: Path) -> list[Path]:
    from tunesmith.train import checkpoint as ckpt

    return ckpt.list_checkpoints(run_dir(tmp))


def poisoned(tmp: Path) -> bool:
    """Any step-N folder (what resume can pick) non-finite or not matching its manifest."""
    import torch
    from safetensors.torch import load_file

    from tunesmith.train import checkpoint as ckpt

    for path in checkpoints(tmp):
        if ckpt.verify(path) is not None:
            return True
        if not all(bool(torch.isfinite(t).all()) for t in load_file(path / "trainable.safetensors").values()
                   if t.is_floating_point()):
            return True
    return False


def losses(tmp: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir(tmp) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def outcome(proc, ok: bool, got: str, tmp: Path, traceback: bool = False) -> Outcome:
    out = proc.stdout + proc.stderr
    traceback = traceback or has_traceback(out)
    return Outcome(got=got[:160], ok=ok and not traceback, traceback=traceback, poisoned=poisoned(tmp))


# ---- divergence


def diverge(lr: str, cause: str):
    def run(tmp: Path) -> Outcome:
        proc = cli(args(tmp, "method.name=full", f"train.lr={lr}", "train.warmup=0", "train.save_every=1",
                        "train.keep_last=1", "train.steps=20"), cwd=tmp)
        line = last_line(proc.stderr)
        ok = proc.returncode != 0 and cause in line
        return outcome(proc, ok, f"rc={proc.returncode}: {line}", tmp)
    return run


def _healthy_then_bad(tmp: Path) -> Outcome:
    """4 good steps (checkpoints 2, 4), then the same run resumed at lr=1e6 with keep_last=1."""
    good = cli(args(tmp, "train.steps=4", "train.lr=1e-3", "train.keep_last=1", "method.name=full"), cwd=tmp)
    if good.returncode != 0:
        return Outcome(got=f"healthy part failed: {last_line(good.stderr)}", ok=False, traceback=has_traceback(good.stderr))
    bad = cli(args(tmp, "train.steps=20", "train.lr=1e6", "train.keep_last=1", "train.save_every=1",
                   "method.name=full", "resume=true"), cwd=tmp)
    names = [p.name for p in checkpoints(tmp)]
    line = last_line(bad.stderr)
    ok = bad.returncode != 0 and "step-4" in line and names == ["step-4"]
    return outcome(bad, ok, f"rc={bad.returncode}, kept {names}: {line}", tmp)


# ---- interrupts


def _uninterrupted(tmp: Path) -> list[float]:
    ref = tmp / "ref"
    ref.mkdir()
    proc = cli(args(ref), cwd=ref)
    assert proc.returncode == 0, proc.stderr[-500:]
    return losses(ref)


def kill9_then_resume(tmp: Path) -> Outcome:
    """kill -9 the training process as soon as its first checkpoint exists; resume == uninterrupted."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    child = subprocess.Popen(TUNESMITH + args(tmp), cwd=tmp, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not checkpoints(tmp) and child.poll() is None:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = [p.name for p in checkpoints(tmp)]
    proc = cli(args(tmp, "resume=true"), cwd=tmp)
    same = losses(tmp) == _uninterrupted(tmp)
    ok = proc.returncode == 0 and bool(killed_at) and same
    return outcome(proc, ok, f"killed with {killed_at}; resumed rc={proc.returncode}, curve identical: {same}", tmp)


def sigint_then_resume(sig: signal.Signals):
    def run(tmp: Path) -> Outcome:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        child = subprocess.Popen(TUNESMITH + args(tmp, "train.save_every=0"), cwd=tmp, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        metrics = run_dir(tmp) / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and child.poll() is None and not (metrics.exists() and metrics.read_text()):
            time.sleep(0.05)
        child.send_signal(sig)
        out, err = child.communicate(timeout=300)
        saved = [p.name for p in checkpoints(tmp)]
        proc = cli(args(tmp, "resume=true"), cwd=tmp)
        same = losses(tmp) == _uninterrupted(tmp)
        ok = child.returncode == 130 and bool(saved) and proc.returncode == 0 and same and not has_traceback(err)
        return outcome(proc, ok, f"{sig.name}: rc={child.returncode}, saved {saved}; resume rc={proc.returncode}, "
                                 f"curve identical: {same}", tmp, traceback=has_traceback(err))
    return run


# ---- the disk


def disk_full(tmp: Path) -> Outcome:
    """The run folder on a tmpfs with room for the first checkpoint, not the next (needs root)."""
    probe = tmp / "probe"
    probe.mkdir()
    first = cli(args(probe, "train.steps=2", "method.name=full"), cwd=probe)
    size = sum(p.stat().st_size for p in (run_dir(probe) / "checkpoints").rglob("*") if p.is_file())
    mount = tmp / "small"
    mount.mkdir()
    room = int(size * 1.6) + (256 << 10)  # one checkpoint, the logs, not a second checkpoint
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        return Outcome(got="cannot mount a small tmpfs here (needs root)", ok=False)
    try:
        proc = cli(args(tmp, "method.name=full", out=mount), cwd=tmp)
        folder = mount / "r" / "checkpoints"
        names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        from tunesmith.train import checkpoint as ckpt

        intact = bool(names) and all(ckpt.verify(folder / n) is None for n in names)
        line = last_line(proc.stderr)
        ok = (first.returncode == 0 and proc.returncode != 0 and "no space left" in line and "resume=true" in line
              and intact and not any(n.startswith(".tmp") for n in names))
        out = proc.stdout + proc.stderr
        return Outcome(got=f"rc={proc.returncode}, left {names}: {line}"[:160], ok=ok and not has_traceback(out),
                       traceback=has_traceback(out), poisoned=not intact)
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


# ---- damaged checkpoints


def damaged(how: str, needle: str):
    def run(tmp: Path) -> Outcome:
        cli(args(tmp, "train.steps=4"), cwd=tmp)
        newest = checkpoints(tmp)[-1]
        target = newest / ("trainable.safetensors" if how in ("truncate", "flip") else "manifest.json")
        if how == "truncate":
            target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        elif how == "flip":
            data = bytearray(target.read_bytes())
            data[len(data) // 2] ^= 0x01
            target.write_bytes(bytes(data))
        else:
            target.unlink()
        proc = cli(args(tmp, "train.steps=6", "resume=true"), cwd=tmp)
        out = proc.stdout + proc.stderr
        ok = proc.returncode == 0 and needle in out and "falling back to the previous one" in out \
            and "step-2 (step 2)" in out
        note = next((line for line in out.splitlines() if "falling back" in line), last_line(out))
        return Outcome(got=f"rc={proc.returncode}: {note.split('/checkpoints/')[-1]}"[:160], ok=ok and not has_traceback(out),
                       traceback=has_traceback(out))
    return run


def all_damaged(tmp: Path) -> Outcome:
    cli(args(tmp, "train.steps=4"), cwd=tmp)
    for path in checkpoints(tmp):
        (path / "manifest.json").unlink()
    return expect_error(cli(args(tmp, "train.steps=6", "resume=true"), cwd=tmp), "no complete checkpoint")


def malicious_state(tmp: Path) -> Outcome:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'owned'}",))

    cli(args(tmp, "train.steps=2"), cwd=tmp)
    newest = checkpoints(tmp)[-1]
    (newest / "train_state.pt").write_bytes(pickle.dumps({"scheduler": Evil(), "rng": None}, protocol=2))
    from tunesmith.train import checkpoint as ckpt

    ckpt.write_manifest(newest)  # the attacker rewrote the manifest too
    result = expect_error(cli(args(tmp, "train.steps=4", "resume=true"), cwd=tmp), "train_state.pt", "refused")
    ran = (tmp / "owned").exists()
    result.ok = result.ok and not ran and "weights_only" not in result.got
    result.forged = ran
    return result


def garbage_state_json(tmp: Path) -> Outcome:
    cli(args(tmp, "train.steps=2"), cwd=tmp)
    newest = checkpoints(tmp)[-1]
    (newest / "state.json").write_text("{ not json")
    from tunesmith.train import checkpoint as ckpt

    ckpt.write_manifest(newest)
    return expect_error(cli(args(tmp, "train.steps=4", "resume=true"), cwd=tmp), "state.json", "cannot be read")


def other_method(tmp: Path) -> Outcome:
    cli(args(tmp, "train.steps=2"), cwd=tmp)
    return expect_error(cli(args(tmp, "train.steps=4", "resume=true", "method.name=ia3"), cwd=tmp),
                        "resume with the recipe that wrote it")


# ---- the run folder


def fails_before_first_step(tmp: Path) -> Outcome:
    proc = cli(args(tmp, "model.name=/nonexistent/model"), cwd=tmp)
    left = run_dir(tmp).exists()
    out = proc.stdout + proc.stderr
    return Outcome(got=f"rc={proc.returncode}, run folder left: {left}: {last_line(proc.stderr)}"[:160],
                   ok=proc.returncode != 0 and not left and not has_traceback(out), traceback=has_traceback(out))


def would_overwrite(tmp: Path) -> Outcome:
    cli(args(tmp, "train.steps=2"), cwd=tmp)
    return expect_error(cli(args(tmp, "train.steps=2"), cwd=tmp), "already holds checkpoints", "resume=true")


def resume_nothing(tmp: Path) -> Outcome:
    proc = cli(args(tmp, "train.steps=2", "resume=true"), cwd=tmp)
    out = proc.stdout + proc.stderr
    ok = proc.returncode == 0 and "has no checkpoint yet: starting fresh" in out
    return outcome(proc, ok, f"rc={proc.returncode}: starts fresh with a note", tmp)


def _case(name: str, expected: str, run) -> Case:
    return Case(name=name, group="train", expected=expected, run=run)


CASES = [
    _case("lr=1e6: loss at ln(vocab), gradient 0", "stops naming the collapse; no checkpoint poisoned",
          diverge("1e6", "gradient norm has been 0")),
    _case("lr=1: loss explodes", "stops naming the divergence; no checkpoint poisoned",
          diverge("1", "far above its running minimum")),
    _case("healthy run resumed at lr=1e6, keep_last=1", "stops; the healthy step-4 is kept and named",
          _healthy_then_bad),
    _case("kill -9 after the first checkpoint", "resume completes; curve == uninterrupted", kill9_then_resume),
    _case("Ctrl-C (SIGINT) mid-run", "exit 130 with a checkpoint; resume == uninterrupted",
          sigint_then_resume(signal.SIGINT)),
    _case("SIGTERM mid-run", "exit 130 with a checkpoint; resume == uninterrupted", sigint_then_resume(signal.SIGTERM)),
    _case("disk full while saving", "one line with the resume hint; previous checkpoint intact, no temp folder",
          disk_full),
    _case("newest checkpoint truncated", "resume names it and falls back to step-2",
          damaged("truncate", "bytes")),
    _case("newest checkpoint has a flipped byte", "resume names it and falls back to step-2",
          damaged("flip", "does not match its manifest hash")),
    _case("newest checkpoint without manifest", "resume names it and falls back to step-2",
          damaged("no-manifest", "no manifest")),
    _case("every checkpoint incomplete", "one-line error", all_damaged),
    _case("train_state.pt is a malicious pickle", "one-line error naming the file; nothing runs", malicious_state),
    _case("state.json is not JSON", "one-line error naming the file", garbage_state_json),
    _case("resume with another method", "one-line error", other_method),
    _case("model missing: fails before the first step", "one-line error; no run folder left", fails_before_first_step),
    _case("same run name again without resume", "one-line error with the resume hint", would_overwrite),
    _case("resume=true with no checkpoint", "starts fresh with a note", resume_nothing),
]
