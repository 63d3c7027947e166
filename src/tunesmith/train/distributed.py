"""Many processes, one recipe: `torchrun --nproc_per_node N -m tunesmith train RECIPE`, or
`tunesmith train RECIPE nproc=N`, which launches exactly that for one node.

- `ddp`: every rank holds the whole model; gradients are summed across ranks (gloo on CPU, nccl
  on CUDA) by torch's DistributedDataParallel.
- `fsdp`: FSDP2 (`fully_shard`): parameters, gradients and optimizer state are sharded; each
  decoder layer is its own group, gathered just in time.

Data: every rank walks the same deterministic stream of micro-batches and takes every world-th
one, so an epoch is covered exactly once across ranks, and the trained-token count of a whole
optimizer step (all ranks, all accumulation micro-batches) is known to every rank without talking.
"""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "none"  # none | ddp | fsdp

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, value: float) -> float:
        """Sum a number over ranks (for logging)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return float(t.item())


def under_launcher() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(strategy: str, device_name: str, timeout_s: int) -> tuple[Dist, torch.device]:
    """Join the process group torchrun prepared (a no-op for one process); pick this rank's device."""
    from ..runtime import pick_device

    if not under_launcher():
        return Dist(), pick_device(device_name)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if strategy == "auto":
        strategy = "fsdp" if device.type == "cuda" else "ddp"
    return Dist(rank, world, local_rank, strategy), device


def teardown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def window(first: int, grad_accum: int, d: Dist) -> list[int]:
    """The global micro-batches this rank computes in the optimizer step whose window starts at
    global micro-batch `first` (the window holds grad_accum × world of them): ranks interleave."""
    return [first + k * d.world + d.rank for k in range(grad_accum)]


def wrap(module: torch.nn.Module, d: Dist, device: torch.device, layers=()) -> torch.nn.Module:
    """Apply the strategy to the loss module (model code is never edited).

    With regional compile (`train.compile`) the decoder layers arrive compiled in place
    (`layer.compile()`, `train.prepare.training_mode`) and are sharded here: compile first, then
    `fully_shard`, the order torchtitan uses. FSDP2's all-gather/reshard hooks are excluded from
    Dynamo, so they run eagerly around each compiled layer, and the parameter names stay those of
    the uncompiled model (no `_orig_mod.` wrapper), which sharded checkpoints rely on."""
    if not d.active:
        return module
    if d.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(module, device_ids=ids, find_unused_parameters=False)
    if d.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
        for layer in layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(module, mp_policy=mp)
        return module
    raise ValueError(f"unknown strategy {d.strategy}")


def launch(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torchrun with `nproc` processes on this node; return its exit code.
    torchrun takes the whole job down when one rank fails and shows that rank's error."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tunesmith", *argv]
    print(f"[tunesmith] launching {nproc} processes: {' '.join(cmd[2:])}", flush=True)
    return subprocess.call(cmd)
