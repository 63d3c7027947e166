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
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..export.tuned import unique_tensors

PREFIX = "step-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed as asked; the message says how to resume it."""


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
    """The method's delta (trained parameters and any tensors it added, e.g. sparse indices)."""
    from ..methods import delta_state

    return {n: _full(t).contiguous() for n, t in delta_state(model).items()}


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


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _all_rng(d) -> list[dict]:
    """Every rank's RNG state, gathered (dropout streams differ per rank)."""
    if d is None or not d.active:
        return [rng_state()]
    import torch.distributed as dist

    states = [None] * d.world
    dist.all_gather_object(states, rng_state())
    return states


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, info: dict, keep_last: int,
                    d=None) -> Path:
    """Write `checkpoints/step-N/` atomically. Replicated runs (one process, DDP) save the trainable
    tensors once, as safetensors; FSDP saves its shards with torch.distributed.checkpoint."""
    folder = Path(run_dir) / "checkpoints"
    final = folder / f"{PREFIX}{step}"
    tmp = folder / f".tmp-{PREFIX}{step}"  # the same path on every rank
    main = d is None or d.main
    sharded = d is not None and d.active and d.strategy == "fsdp"
    rngs = _all_rng(d)
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if d is not None:
        d.barrier()
    try:
        if sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(model, optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
        if main:
            if not sharded:
                save_file(unique_tensors(trainable_state(model)), tmp / "trainable.safetensors")
            torch.save({"optimizer": None if sharded else optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": rngs[0], "rng_ranks": rngs}, tmp / "train_state.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "sharded": sharded, **info}, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if d is not None:
        d.barrier()
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, d=None) -> dict:
    """Restore parameters, optimizer, scheduler and RNG from `path`; return its state.json."""
    path = Path(path)
    info = json.loads((path / "state.json").read_text())
    sharded_now = d is not None and d.active and d.strategy == "fsdp"
    if info.get("sharded") != sharded_now:
        raise CheckpointError(f"checkpoint {path} was written {'sharded (fsdp)' if info.get('sharded') else 'unsharded'};"
                         + (" resume it with train.strategy=fsdp and nproc >= 2 (the process count may change)"
                            if info.get("sharded") else " resume it without fsdp (one process or ddp)"))
    state = torch.load(path / "train_state.pt", weights_only=True)
    if sharded_now:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    else:
        _load_trainable(path, model)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rank, world = (d.rank, d.world) if d is not None else (0, 1)
    ranks = state.get("rng_ranks") or [state["rng"]]
    if len(ranks) == world:
        set_rng_state(ranks[rank])
    elif rank == 0:
        print(f"[tunesmith] note: {path} was written by {len(ranks)} processes, resuming with {world}: "
              "data order and weights carry over, dropout streams start afresh", flush=True)
    return info


def _load_trainable(path: Path, model) -> None:
    from ..export.atomic import ExportError
    from ..export.tuned import load_delta

    try:
        load_delta(model, load_file(path / "trainable.safetensors"), where=str(path))
    except ExportError as e:
        raise CheckpointError(f"{e}; resume with the recipe that wrote it") from None


def gathered_model(model, recipe, d):
    """Under FSDP: gather the full weights (every rank takes part) into a plain, unsharded copy of
    the model on rank 0 (None elsewhere), ready to save."""
    full = {n: _full(t).detach().cpu() for n, t in model.state_dict().items()}
    if not d.main:
        return None
    from .loop import prepare_model

    plain, _, _ = prepare_model(recipe)
    plain.load_state_dict(full, strict=True)
    return plain
