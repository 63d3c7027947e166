"""Checkpoints: written to a temp folder and renamed, so a crash never leaves half a checkpoint.

A checkpoint holds the trainable parameters (safetensors: for LoRA only its delta), the optimizer
and scheduler state, the RNG states and the step. Optimizer/RNG state is saved with torch.save
and read back with `weights_only=True`, which refuses anything but tensors and plain containers.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's state as tensors and numbers, so it loads under weights_only=True
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, info: dict, keep_last: int) -> Path:
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{PREFIX}{step}-", dir=folder))
    try:
        tensors = trainable_state(model)
        # tied weights appear once under their first name
        seen, unique = {}, {}
        for n, t in tensors.items():
            key = (t.data_ptr(), t.shape)
            if key not in seen:
                seen[key] = n
                unique[n] = t
        save_file(unique, tmp / "trainable.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   tmp / "train_state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **info}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore parameters, optimizer, scheduler and RNG from `path`; return its state.json."""
    path = Path(path)
    tensors = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors
               and not any(params[m] is p for m in tensors if m in params)]
    unknown = [n for n in tensors if n not in params]
    if unknown or missing:
        raise ValueError(
            f"checkpoint {path} does not match this recipe's method "
            f"(unknown: {unknown[:3]}, missing: {missing[:3]}); resume with the recipe that wrote it"
        )
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    state = torch.load(path / "train_state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return json.loads((path / "state.json").read_text())
