"""S²-Attn against full (per-sample, `packed`) attention: time and peak memory of one forward +
backward, of the attention alone and of one decoder layer of the embedded model (SmolLM2-135M:
9 query heads, 3 key/value heads, head dim 64), at growing row lengths N.

    python benchmarks/long_context/s2_vs_full.py --sizes 1024 2048 4096 8192 --out s2_vs_full.json

Rows hold `--docs` documents of equal length (1: one long document, the LongLoRA case; more: a
packed row, where S²-Attn needs its block masks). The group is `--group` tokens (0: N/4, as
LongLoRA trains), so S²-Attn's cost is O(N·G): a quarter of full causal attention's at G = N/4,
linear in N at a fixed G. Peak memory is the CUDA allocator's peak above the inputs on a GPU;
on a CPU each measurement runs in a fresh process and reports its peak RSS above the loaded
state (so allocator caching and the model weights are not counted). Time is the median of
`--repeats` runs after one warm-up.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _batch(n: int, docs: int, device):
    import torch

    lengths = [n // docs] * docs
    lengths[-1] += n - sum(lengths)
    seg = torch.cat([torch.full((m,), i + 1) for i, m in enumerate(lengths)])[None].to(device)
    pos = torch.cat([torch.arange(m) for m in lengths])[None].to(device)
    ids = torch.randint(5, 1000, (1, n), generator=torch.Generator().manual_seed(0)).to(device)
    return {"input_ids": ids, "position_ids": pos, "segment_ids": seg, "weights": torch.ones(1, n, device=device)}


def _attention_step(impl: str, n: int, group: int, docs: int, device):
    """A closure running one forward + backward of the attention function alone."""
    import torch

    from tunesmith.models.attention import packed_attention, segments_from_ids
    from tunesmith.models.s2attn import s2_rows, s2_attention

    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(1, h, n, 64, generator=g, device=device, dtype=dtype, requires_grad=True) for h in (9, 3, 3))
    seg = _batch(n, docs, device)["segment_ids"]
    fn, info = (s2_attention, s2_rows(seg, group)) if impl == "s2" else (packed_attention, segments_from_ids(seg))
    module = torch.nn.Module()

    def step():
        out, _ = fn(module, q, k, v, None, tunesmith_segments=info)
        out.float().sum().backward()
    return step


def _layer_step(impl: str, n: int, group: int, docs: int, device):
    """A closure running one forward + backward of the embedded model cut to its first decoder layer."""
    from tunesmith.models.attention import use_packed_attention
    from tunesmith.models.load import load_model
    from tunesmith.models.s2attn import use_s2_attention
    from tunesmith.objectives.sft import forward_hidden

    model, _ = load_model("smollm2-135m-instruct", "bf16" if device.type == "cuda" else "fp32")
    model.model.layers = model.model.layers[:1]
    model.to(device).train()
    use_s2_attention(model, group) if impl == "s2" else use_packed_attention(model)
    batch = _batch(n, docs, device)

    def step():
        forward_hidden(model, batch).float().sum().backward()
    return step


def measure(scope: str, impl: str, n: int, group: int, docs: int, repeats: int) -> dict:
    """One row: median seconds of a forward + backward and the peak memory above the loaded state."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step = (_attention_step if scope == "attention" else _layer_step)(impl, n, group, docs, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()  # warm-up; on a CPU this is also the step whose peak is reported
    sync()
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"scope": scope, "impl": impl, "n": n, "group": group or n // 4, "docs": docs,
            "ms": 1000 * statistics.median(times), "peak_mb": peak / 2**20}


def _in_child(args: list[str]) -> dict:
    """Run one measurement in a fresh process (peak RSS is per process)."""
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"measurement {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    """Markdown: per scope and N, time and peak memory of each implementation and their ratio."""
    lines = ["| scope | N | G | full ms | s2 ms | speed-up | full MiB | s2 MiB | memory ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    keyed = {(r["scope"], r["n"], r["impl"]): r for r in rows}
    for scope, n in sorted({(r["scope"], r["n"]) for r in rows}):
        full, s2 = keyed.get((scope, n, "full")), keyed.get((scope, n, "s2"))
        if full is None or s2 is None:
            continue
        lines.append(f"| {scope} | {n} | {s2['group']} | {full['ms']:.1f} | {s2['ms']:.1f} | "
                     f"{full['ms'] / s2['ms']:.2f}× | {full['peak_mb']:.0f} | {s2['peak_mb']:.0f} | "
                     f"{full['peak_mb'] / max(s2['peak_mb'], 1e-9):.2f}× |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--group", type=int, default=0, help="S²-Attn group in tokens (0: N/4)")
    p.add_argument("--docs", type=int, default=1, help="documents per row (>1: a packed row)")
    p.add_argument("--scopes", nargs="+", default=["attention", "layer"], choices=["attention", "layer"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="s2_vs_full.json")
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        scope, impl, n, group, docs, repeats = args.child
        print(json.dumps(measure(scope, impl, int(n), int(group), int(docs), int(repeats))))
        return
    import torch

    rows = []
    for scope in args.scopes:
        for n in args.sizes:
            for impl in ("full", "s2"):
                spec = [scope, impl, str(n), str(args.group), str(args.docs), str(args.repeats)]
                row = (measure(scope, impl, n, args.group, args.docs, args.repeats) if torch.cuda.is_available()
                       else _in_child(spec))
                rows.append(row)
                print(f"{scope:9} {impl:4} N={n:6} {row['ms']:9.1f} ms {row['peak_mb']:9.1f} MiB", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "docs": args.docs, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(table(rows))


if __name__ == "__main__":
    main()
