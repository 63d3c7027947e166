"""Checkpoints: written to a temp folder and renamed, so a crash never leaves half a checkpoint.

A checkpoint holds the trainable parameters (safetensors: for LoRA only its delta), the optimizer
and scheduler state, the RNG states and the step. Optimizer/RNG state is saved with torch.save
and read back with `weights_only=True`, which refuses anything but tensors and plain containers.

Trust:
- a checkpoint is written only from finite weights;
- `manifest.json` (every file's size and SHA-256) is written last: a checkpoint without it, or whose
  files no longer match it (truncated, edited, half-copied), is incomplete. Resume verifies the
  newest checkpoint and falls back, with a one-line note, to the previous complete one;
- `state.json` records whether the run was healthy when it was written (no divergence warning in
  progress) and its validation loss; pruning to `keep_last` never deletes the newest healthy
  checkpoint, nor the best one by validation loss;
- a full disk ends in one line that names the intact previous checkpoint, with no temporary folder left.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..export.tuned import unique_tensors

PREFIX = "step-"
MANIFEST = "manifest.json"
DIVERGED = "diverged-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or resumed as asked; the message says how to go on."""


def _step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Every `step-N` folder that has been written (complete or not), oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=_step_of)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record every file of `folder` (sizes and hashes); written last, it marks the folder complete."""
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, folder / MANIFEST)


def verify(folder: Path) -> str | None:
    """None when `folder` is a complete checkpoint, else why not (one short phrase)."""
    try:
        listed = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return "incomplete (no manifest: it was never finished)"
    except (ValueError, KeyError, TypeError):
        return "incomplete (its manifest is unreadable)"
    for name, want in listed.items():
        path = folder / name
        if not path.is_file():
            return f"incomplete ({name} is missing)"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"corrupt ({name} has {size:,} of {want['bytes']:,} bytes)"
        if _sha256(path) != want["sha256"]:
            return f"corrupt ({name} does not match its manifest hash)"
    return None


def latest_checkpoint(run_dir: Path, *, verified: bool = False, note=print) -> Path | None:
    """The newest checkpoint; with `verified`, the newest complete one — each newer one that fails
    verification is named in one line through `note` and skipped."""
    found = list_checkpoints(run_dir)
    if not verified:
        return found[-1] if found else None
    for path in reversed(found):
        problem = verify(path)
        if problem is None:
            return path
        if note is not None:
            note(f"[tunesmith] checkpoint {path} is {problem}: falling back to the previous one")
    if found:
        raise CheckpointError(f"no complete checkpoint in {Path(run_dir) / 'checkpoints'} (newest: {found[-1].name}, "
                              f"{verify(found[-1])}): start a new run with name=<new name>")
    return None


def read_state(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def set_aside_from(run_dir: Path, step: int) -> list[Path]:
    """Move the checkpoints of step >= `step` to `checkpoints/diverged-step-N` (kept for a look,
    invisible to resume); returns their new paths."""
    moved = []
    for path in list_checkpoints(run_dir):
        if _step_of(path) >= step:
            dest = path.with_name(DIVERGED + path.name)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(path, dest)
            moved.append(dest)
    return moved


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints and also
    - the newest healthy one, and the newest *confirmed* healthy one (the next checkpoint was healthy
      too: a checkpoint's own loss is only seen at the step after it, so the newest healthy one may
      already hold the update that started a divergence);
    - the best one by validation loss."""
    found = list_checkpoints(run_dir)
    states = {p: read_state(p) for p in found}
    healthy = [p for p in found if states[p].get("healthy", True)]
    keep = set(found[-max(keep_last, 1):]) | set(healthy[-1:])
    confirmed = [p for p, nxt in zip(found, found[1:]) if p in healthy and nxt in healthy]
    keep |= set(confirmed[-1:])
    scored = [(states[p]["val_loss"], _step_of(p), p) for p in found if states[p].get("val_loss") is not None]
    if scored:
        keep.add(min(scored)[2])
    for old in found:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


def trainable_state(model, method) -> dict[str, torch.Tensor]:
    """The method's delta (trained parameters and any tensors it added, e.g. sparse indices)."""
    from ..methods import delta_state

    return {n: _full(t).contiguous() for n, t in delta_state(model, method).items()}


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
                    d=None, *, method) -> Path:
    """Write `checkpoints/step-N/` atomically, manifest last. Replicated runs (one process, DDP) save
    the trainable tensors once, as safetensors; FSDP saves its shards with torch.distributed.checkpoint.
    `info` goes to state.json (with `healthy` and `val_loss` when the loop knows them)."""
    folder = Path(run_dir) / "checkpoints"
    final = folder / f"{PREFIX}{step}"
    tmp = folder / f".tmp-{PREFIX}{step}"  # the same path on every rank
    main = d is None or d.main
    sharded = d is not None and d.active and d.strategy == "fsdp"
    rngs = _all_rng(d)
    tensors = None if sharded else unique_tensors(trainable_state(model, method))
    if tensors is not None and not all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point()):
        raise CheckpointError(f"refusing to write checkpoint {final}: its weights are not finite; "
                              f"last checkpoint: {latest_checkpoint(run_dir) or 'none'}")
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if d is not None:
            d.barrier()
        if sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(model, optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
        if main:
            if tensors is not None:
                save_file(tensors, tmp / "trainable.safetensors")
            torch.save({"optimizer": None if sharded else optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": rngs[0], "rng_ranks": rngs}, tmp / "train_state.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "sharded": sharded, **info}, indent=2))
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            prune(run_dir, keep_last)
    except BaseException as e:
        full = _disk_full(e, folder)  # before the partial files are removed
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise CheckpointError(f"no space left on the device while writing checkpoint {final}; nothing of it "
                                  f"was kept and the previous checkpoint ({latest_checkpoint(run_dir) or 'none'}) "
                                  "is intact: free some space, then continue with resume=true") from None
        raise
    if d is not None:
        d.barrier()
    return final


def _disk_full(e: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space (torch.save reports it as a RuntimeError of its zip
    writer, so the free space itself is asked as well)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "no space left" in str(e).lower() or "disk quota" in str(e).lower():
        return True
    if not isinstance(e, (OSError, RuntimeError)):
        return False
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def load_checkpoint(path: Path, model, optimizer, scheduler, d=None, *, method) -> dict:
    """Restore parameters, optimizer, scheduler and RNG from `path`; return its state.json."""
    path = Path(path)
    try:
        info = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'state.json'} cannot be read ({type(e).__name__}); "
                              "the checkpoint is damaged: remove it to resume from the previous one") from None
    sharded_now = d is not None and d.active and d.strategy == "fsdp"
    if info.get("sharded") != sharded_now:
        raise CheckpointError(f"checkpoint {path} was written {'sharded (fsdp)' if info.get('sharded') else 'unsharded'};"
                         + (" resume it with train.strategy=fsdp and nproc >= 2 (the process count may change)"
                            if info.get("sharded") else " resume it without fsdp (one process or ddp)"))
    state = read_train_state(path / "train_state.pt")
    if sharded_now:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    else:
        _load_trainable(path, model, method)
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{path / 'train_state.pt'}: its optimizer state does not fit this run "
                                  f"({str(e).splitlines()[0][:120]}); resume with the recipe that wrote it") from None
    wanted = list(scheduler.base_lrs)  # this recipe's learning rates, before the checkpoint's replace them
    scheduler.load_state_dict(state["scheduler"])
    _keep_new_lr(optimizer, scheduler, wanted, path)
    rank, world = (d.rank, d.world) if d is not None else (0, 1)
    ranks = state.get("rng_ranks") or [state["rng"]]
    if len(ranks) == world:
        set_rng_state(ranks[rank])
    elif rank == 0:
        print(f"[tunesmith] note: {path} was written by {len(ranks)} processes, resuming with {world}: "
              "data order and weights carry over, dropout streams start afresh", flush=True)
    return info


def _keep_new_lr(optimizer, scheduler, wanted: list[float], path: Path) -> None:
    """A resumed run follows its recipe's train.lr (lowering it is how a diverged run is resumed),
    at the schedule position it reached: the checkpoint only decides where in the schedule it is."""
    saved = list(scheduler.base_lrs)
    if saved == wanted:
        return
    scheduler.base_lrs = wanted
    for group, base, factor in zip(optimizer.param_groups, wanted, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = base, base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    print(f"[tunesmith] learning rate changed since {path.name}: {saved[0]:.3g} → {wanted[0]:.3g} "
          "(the schedule continues from where it was)", flush=True)


def read_train_state(path: Path) -> dict:
    """The optimizer/scheduler/RNG state, loaded with weights_only=True (tensors and plain containers
    only); anything else — a pickle that would run code, a truncated or foreign file — is one line."""
    try:
        state = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, ImportError,
            IndexError, KeyError, TypeError, UnicodeDecodeError) as e:
        why = "it holds more than tensors and plain values, which could run code" \
            if isinstance(e, pickle.UnpicklingError) else "damaged"
        raise CheckpointError(f"{path} is not a readable tunesmith train state (refused: {why}); remove that "
                              "checkpoint folder to resume from the previous one") from None
    if not isinstance(state, dict) or not {"scheduler", "rng"} <= set(state):
        raise CheckpointError(f"{path} is not a tunesmith train state (no scheduler/rng entries)")
    return state


def _load_trainable(path: Path, model, method) -> None:
    from ..export.atomic import ExportError
    from ..export.tuned import load_delta

    try:
        load_delta(model, load_file(path / "trainable.safetensors"), where=str(path), method=method)
    except ExportError as e:
        raise CheckpointError(f"{e}; resume with the recipe that wrote it") from None


def unshard_in_place(model, d) -> None:
    """Under FSDP, before saving: gather the full weights (every rank takes part; only rank 0 keeps
    them, on the CPU: `get_model_state_dict` with full_state_dict and cpu_offload) and put them in place
    of rank 0's shards, so the trained model saves as it is — no second model is built or loaded.
    Weights tied to each other stay tied."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.main:
        return
    replaced: dict[int, torch.nn.Parameter] = {}
    for name, tensor in full.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        old = getattr(module, attr)
        if isinstance(old, torch.nn.Parameter):
            if id(old) not in replaced:
                replaced[id(old)] = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
            setattr(module, attr, replaced[id(old)])
        else:
            module.register_buffer(attr, tensor, persistent=attr not in module._non_persistent_buffers_set)
