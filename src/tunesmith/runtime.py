"""Where and how the run executes: device, threads, precision, memory readings."""
from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path

import torch

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device: `{name}` asked for, but this torch sees no CUDA device")
    return torch.device(name)


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads share a core's matmul units)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("0", str(cpu)))
    return max(1, len(cores))


def set_threads(n: int) -> int:
    n = n or physical_cores()
    torch.set_num_threads(n)
    return n


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast on CPU and CUDA; fp32 runs without it. Master weights stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def peak_memory_gb(device: torch.device) -> float:
    """Peak RSS of this process on CPU; peak allocated tensor memory on CUDA.

    On Linux this is the address space's own high-water mark (VmHWM). `ru_maxrss` is not: exec keeps
    the maximum of the process it replaced, so a run started from a large process (a notebook, a test
    runner, through vfork) would report its parent's peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


# Where distributions put jemalloc. Freeing and re-mapping large tensors every step costs page
# faults with glibc malloc; jemalloc keeps freed memory for reuse (measured here: the same speed,
# 0.84× the peak RSS for LoRA on the embedded model).
JEMALLOC = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
            "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")
HEAVY_VERBS = ("train", "bench", "quickstart", "eval")


def allocator_env(environ=None, candidates=JEMALLOC) -> dict | None:
    """The environment to re-run tunesmith with jemalloc preloaded, or None when it is already
    loaded, switched off (`TUNESMITH_ALLOCATOR=system`) or not installed."""
    environ = dict(os.environ if environ is None else environ)
    if environ.get("TUNESMITH_ALLOCATOR", "auto") == "system" or "jemalloc" in environ.get("LD_PRELOAD", ""):
        return None
    lib = next((c for c in candidates if Path(c).is_file()), None)
    if lib is None:
        return None
    environ["LD_PRELOAD"] = " ".join(x for x in (lib, environ.get("LD_PRELOAD", "")) if x)
    return environ


def reexec_with_allocator(argv: list[str]) -> None:
    """Replace this process by the same tunesmith command with jemalloc preloaded, when it helps
    (a training or measuring verb) and is possible; otherwise return and carry on."""
    import sys

    if not argv or argv[0] not in HEAVY_VERBS:
        return
    env = allocator_env()
    if env is None:
        return
    env["TUNESMITH_ALLOCATOR"] = "system"  # never twice, even if the preload fails to take
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "tunesmith", *argv], env)


def allocator_in_use() -> str:
    """`jemalloc` when it is mapped into this process, else `system`."""
    try:
        return "jemalloc" if "jemalloc" in Path("/proc/self/maps").read_text() else "system"
    except OSError:
        return "system"
