"""tunesmith against HF Trainer + PEFT and TRL's SFTTrainer: the same model, data and steps, training
throughput and memory.

    python benchmarks/vs_hf/run.py                                   # 12 timed steps, 2 repeats (long on 2 cores)
    python benchmarks/vs_hf/run.py --steps 2 --warmup 1 --repeats 1 --out-dir /tmp/vs_hf_smoke   # a smoke run
    python benchmarks/vs_hf/run.py --rows short --systems trl-bf16,trl-fp32,tunesmith

Three data rows (vshf_rows.py): (a) `chat`, the chat recipe's examples/chat.jsonl, (b) `short`,
~50-token chats, (c) `prose`, Python's documentation topics cut to 2048 tokens; chats train only the
assistant answers, prose every token, on every side. Setups: LoRA (r=16, alpha 32, dropout 0, every
linear layer; the default) and full fine-tuning (`--setups lora,full`). Systems, on the embedded
SmolLM2-135M-Instruct:

  hf-default     HF Trainer + PEFT as it runs by default: fp32, 8 samples a step padded to the
                 longest, glibc malloc (LD_PRELOAD unset).
  hf-best-bf16   HF Trainer + PEFT at its best on a CPU: padding-free batches (DataCollatorWithFlattening)
  hf-best-fp32   holding exactly the samples of tunesmith's packed rows (≤4096 tokens a step), jemalloc,
                 in bf16 autocast or fp32; "hf-best" in the ratios is the faster of the two per row.
  trl-bf16       TRL's SFTTrainer + PEFT: packing (bfd) with padding-free rows of ≤4096 tokens, one a
  trl-fp32       step, no gradient checkpointing, jemalloc, bf16 autocast or fp32 ("trl-best": the
                 faster). Optional `trl-default`: TRL's defaults (bf16, gradient checkpointing, glibc).
  tunesmith      `tunesmith bench` on recipes/lora-sft.yaml (or full-sft.yaml) with the row's data and
                 the repo's default speed settings (nothing forced but the data, rows of 4096 tokens, one
                 micro-batch a step, threads, clipping, lr; `--tunesmith-overrides` adds more).

Every run is its own process, started in turn (repeat 1: every row × setup × system, then repeat
2, ...): `--warmup` untimed optimizer steps, then `--steps` timed ones. Reported per run: trained
tokens per second and seconds per step over the timed steps, the process's peak RSS (from `wait4`,
the same for all), the whole process's wall time, and for tunesmith its MFU. The tables (vshf_table.py)
give medians over the repeats and the ratios tunesmith ÷ hf-default, ÷ hf-best, ÷ trl-best.
Raw runs go to OUT_DIR/results.json, the tables to OUT_DIR/results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

from vshf_rows import ROWS, data_overrides, prepare_row  # noqa: E402
from vshf_table import estimate_minutes, write_markdown  # noqa: E402

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
SYSTEMS = ("hf-default", "hf-best-bf16", "hf-best-fp32", "trl-bf16", "trl-fp32", "tunesmith")
OPTIONAL = ("trl-default",)
SETUPS = ("lora", "full")
# The shipped recipes; their learning rates are used on the HF and TRL sides too.
RECIPES = {"lora": (ROOT / "recipes/lora-sft.yaml", 2e-4), "full": (ROOT / "recipes/full-sft.yaml", 2e-5)}
MODEL = "smollm2-135m-instruct"


def child_env(system: str, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TUNESMITH_ALLOCATOR")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    if system.startswith(("hf-best", "trl-bf16", "trl-fp32")) and Path(JEMALLOC).is_file():
        env["LD_PRELOAD"] = JEMALLOC
    # hf-default, trl-default: glibc malloc. tunesmith: re-executes itself with jemalloc when installed.
    return env


def command(system: str, setup: str, row: str, args, data: dict, out_json: Path) -> list[str]:
    recipe, lr = RECIPES[setup]
    d = data[row]
    if system == "tunesmith":
        exe = Path(sys.executable).with_name("tunesmith")
        head = [str(exe)] if exe.is_file() else [sys.executable, "-m", "tunesmith"]
        # the options last: argparse takes no more positional overrides after them
        return [*head, "bench", str(recipe), f"steps={args.steps}", f"warmup={args.warmup}",
                *data_overrides(row, Path(d["source"]), d["max_length"]),
                f"train.batch_tokens={args.batch_tokens}", "train.grad_accum=1", f"train.threads={args.threads}",
                "train.max_grad_norm=1.0", f"train.lr={lr}", "train.eval_every=0", "train.save_every=0",
                "train.seed=0", *args.tunesmith_overrides, "--no-breakdown", "--json", str(out_json)]
    common = ["--model", data["model_dir"], "--data", d["samples_file"], "--setup", setup,
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--lr", str(lr),
              "--threads", str(args.threads), "--out", str(out_json)]
    if system.startswith("trl"):
        precision = "bf16" if system == "trl-default" else system.removeprefix("trl-")
        cmd = [sys.executable, str(HERE / "trl_train.py"), *common, "--precision", precision,
               "--max-length", str(args.batch_tokens), "--sample-length", str(d["max_length"])]
        return cmd + (["--gradient-checkpointing"] if system == "trl-default" else [])
    cmd = [sys.executable, str(HERE / "hf_train.py"), *common, "--max-length", str(d["max_length"]),
           "--batch-size", "8"]
    if system == "hf-default":
        return cmd + ["--mode", "default"]
    return cmd + ["--mode", "best", "--precision", system.removeprefix("hf-best-"), "--batches", d["plan"]]


def parse_child(system: str, r: dict) -> dict:
    """The figures of a child's JSON, under the same names for every system."""
    if system == "tunesmith":
        units = r["trained_tokens_per_s"] * r["s_per_step"] * r["steps"]
        info = r["info"]
        return dict(trained_tokens_per_s=r["trained_tokens_per_s"], s_per_step=r["s_per_step"],
                    tokens_per_s=r["tokens_per_s"], trained_tokens_per_step=units / r["steps"],
                    positions_per_step=r["tokens_per_s"] * r["s_per_step"], peak_rss_gb_self=r["peak_mem_gb"],
                    allocator=info["allocator"], trainable=info["trainable"], step_s=info["step_s"],
                    precision=info["precision"], mfu=r["mfu"], peak_tflops=r["peak_tflops"],
                    achieved_tflops=info.get("achieved_tflops"), flops_per_token=r["flops_per_token"],
                    settings={k: v for k, v in info.items() if k not in ("step_s",)})
    return dict(trained_tokens_per_s=r["trained_tokens_per_s"], s_per_step=r["s_per_step"],
                tokens_per_s=r["positions_per_s"], trained_tokens_per_step=r["trained_tokens_per_step"],
                positions_per_step=r["positions_per_step"], peak_rss_gb_self=r["peak_rss_gb_inside"],
                allocator=r["allocator"], trainable=r["trainable"], step_s=r["step_s"], precision=r["precision"],
                settings={k: r[k] for k in ("optim", "packed_rows", "padding_free", "gradient_checkpointing")
                          if k in r})


def run_one(system: str, setup: str, row: str, repeat: int, args, data: dict, work: Path) -> dict:
    tag = f"{row}-{setup}-{system}-r{repeat}"
    out_json, log = work / f"{tag}.json", work / f"{tag}.log"
    out_json.unlink(missing_ok=True)
    cmd = command(system, setup, row, args, data, out_json)
    out = {"row": row, "setup": setup, "system": system, "repeat": repeat, "command": shlex.join(cmd),
           "log": log.name}
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(system, args.threads),
                                cwd=ROOT, start_new_session=True)
        fired = threading.Event()

        def kill():
            fired.set()
            os.killpg(proc.pid, signal.SIGKILL)

        # bf16 autocast without bf16 hardware can take many minutes a step: an optional limit per run
        timer = threading.Timer(args.run_timeout, kill) if args.run_timeout else None
        if timer is not None:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (and its waited-for children's)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if timer is not None:
            timer.cancel()
            out["timed_out"] = fired.is_set()
    out["wall_s"] = time.perf_counter() - t0
    out["peak_rss_gb"] = usage.ru_maxrss * 1024 / 1e9  # KiB on Linux; survives tunesmith's exec
    out["rc"] = proc.returncode
    if proc.returncode != 0 or not out_json.is_file():
        out["error"] = log.read_text()[-3000:]
        return out
    out.update(parse_child(system, json.loads(out_json.read_text())))
    return out


def machine(args) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = ""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    from tunesmith.runtime import physical_cores

    versions = {}
    for pkg in ("torch", "transformers", "peft", "trl", "datasets", "tunesmith"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags, "threads": args.threads,
            "jemalloc": JEMALLOC if Path(JEMALLOC).is_file() else None, "python": platform.python_version(),
            "versions": versions}


def measured_peaks(threads: int, refresh: bool) -> dict:
    """The bf16 and fp32 matmul peaks `tunesmith bench` divides by (and `train.speed=auto` reads), measured
    afresh at the start of a sitting unless `--cached-peaks`: a peak cached while the machine was busy
    would skew every MFU and what tunesmith picks."""
    import torch

    from tunesmith.bench.throughput import matmul_peak

    return {dtype: matmul_peak(torch.device("cpu"), dtype, threads, refresh=refresh) for dtype in ("bf16", "fp32")}


def add_mfu(results: dict) -> None:
    """tunesmith's achieved FLOP/s over the measured bf16 peak (the issue's goal names it) and over the
    machine's best measured peak (the higher of bf16 and fp32: without bf16 hardware the bf16 peak is
    tens of times below fp32, and a share of it means nothing)."""
    peaks = {k: v for k, v in (results.get("peaks") or {}).items() if v}
    best = max(peaks.items(), key=lambda kv: kv[1]) if peaks else None
    for r in results["runs"]:
        if r["system"] == "tunesmith" and r.get("achieved_tflops"):
            if peaks.get("bf16"):
                r["mfu_bf16"] = r["achieved_tflops"] / peaks["bf16"]
            if best:
                r["mfu_best"], r["best_peak"] = r["achieved_tflops"] / best[1], best[0]


def save(results: dict, path: Path, work: Path) -> None:
    """results.json without machine paths: the scratch folder, the output folder (outside the repository) and
    the repository's root are written as <work>, <out> and relative paths."""
    text = json.dumps(results, indent=1)
    text = text.replace(str(work), "<work>")
    if not path.parent.resolve().is_relative_to(ROOT):
        text = text.replace(str(path.parent.resolve()), "<out>")
    text = text.replace(str(ROOT) + "/", "")
    path.write_text(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every row × setup × system")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated: " + ", ".join(ROWS))
    p.add_argument("--setups", default="lora", help="comma-separated: lora, full")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated: " + ", ".join(SYSTEMS + OPTIONAL))
    p.add_argument("--out-dir", default=str(HERE), help="where results.json and results.md go")
    p.add_argument("--work-dir", default=None,
                   help="data, per-run logs and JSON (default: runs/vs_hf, or OUT_DIR/work for another OUT_DIR)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every run")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per packed step (hf-best, trl, tunesmith)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per sample at most (default: per row)")
    p.add_argument("--tunesmith-overrides", default="",
                   help="extra `key=value` overrides for tunesmith's side (space-separated), e.g. train.precision=fp32")
    p.add_argument("--run-timeout", type=float, default=None,
                   help="seconds a run may take before it is killed and recorded as timed out (default: no limit)")
    p.add_argument("--cached-peaks", action="store_true",
                   help="use the cached matmul peaks instead of measuring them at the start")
    p.add_argument("--table-only", action="store_true", help="rewrite results.md from OUT_DIR/results.json")
    args = p.parse_args(argv)
    args.tunesmith_overrides = shlex.split(args.tunesmith_overrides)
    args.row_list = [x for x in args.rows.split(",") if x]
    args.setup_list = [x for x in args.setups.split(",") if x]
    args.system_list = [x for x in args.systems.split(",") if x]
    for given, known, what in ((args.row_list, ROWS, "row"), (args.setup_list, SETUPS, "setup"),
                               (args.system_list, SYSTEMS + OPTIONAL, "system")):
        if bad := [x for x in given if x not in known]:
            p.error(f"unknown {what}(s) {bad}; choose from {', '.join(known)}")
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--steps ≥ 1, --warmup ≥ 0, --repeats ≥ 1")
    return args


def report_run(row: dict, results: dict, args) -> None:
    if row["rc"] != 0 or "trained_tokens_per_s" not in row:
        why = f"timed out after {row['wall_s']:.0f} s" if row.get("timed_out") else f"rc {row['rc']}"
        print(f"[vs_hf]   failed ({why}), log {row['log']}:\n{row.get('error', '')[-1500:]}", flush=True)
        return
    mfu = f", MFU {100 * row['mfu']:.1f}% ({row['precision']} peak)" if row.get("mfu") else ""
    print(f"[vs_hf]   {row['trained_tokens_per_s']:,.0f} trained tokens/s, {row['s_per_step']:.2f} s/step, "
          f"{row['trained_tokens_per_step']:,.0f} trained tokens/step, peak RSS {row['peak_rss_gb']:.2f} GB, "
          f"wall {row['wall_s']:.0f} s, {row['precision']}, allocator {row['allocator']}{mfu}", flush=True)
    if row["system"] == "tunesmith":
        expected = results["data"][row["row"]]["tunesmith_expected_trained_tokens"] / args.steps
        if abs(row["trained_tokens_per_step"] - expected) > 0.5:
            print(f"[vs_hf]   note: tunesmith trained {row['trained_tokens_per_step']:.1f} tokens/step, "
                  f"the plan given to hf-best {expected:.1f}: the two did not see the same rows", flush=True)


def main() -> int:
    args = parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        results = json.loads((out_dir / "results.json").read_text())
        add_mfu(results)
        print(write_markdown(results, out_dir / "results.md"))
        return 0
    if args.work_dir:
        work = Path(args.work_dir)
    else:  # scratch stays out of the repository (runs/ is ignored)
        work = ROOT / "runs" / "vs_hf" if out_dir.resolve() == HERE else out_dir / "work"
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    results = {
        "command": shlex.join(["python", str(shown), *sys.argv[1:]]),
        "config": {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "rows": args.row_list,
                   "setups": args.setup_list, "systems": args.system_list, "threads": args.threads,
                   "batch_tokens": args.batch_tokens, "max_length": args.max_length, "hf_default_batch_size": 8,
                   "tunesmith_overrides": args.tunesmith_overrides, "run_timeout": args.run_timeout},
        "machine": machine(args), "runs": [],
    }
    print(f"[vs_hf] jemalloc {'found: ' + JEMALLOC if Path(JEMALLOC).is_file() else 'not installed'} "
          f"(hf-best and trl-bf16/fp32 preload it; tunesmith preloads it itself; hf-default and trl-default run "
          f"on glibc malloc)", flush=True)
    from tunesmith.models.load import resolve

    results["data"] = {"model_dir": str(resolve(MODEL))}
    results["peaks"] = measured_peaks(args.threads, refresh=not args.cached_peaks)
    print("[vs_hf] matmul peaks: " + ", ".join(f"{k} {v:.4g} TFLOP/s" for k, v in results["peaks"].items()), flush=True)
    for row in args.row_list:
        results["data"][row] = prepare_row(row, args, RECIPES["lora"][0], work)
    out_json, out_md = out_dir / "results.json", out_dir / "results.md"
    for repeat in range(args.repeats):
        for row in args.row_list:
            for setup in args.setup_list:
                for system in args.system_list:
                    print(f"[vs_hf] repeat {repeat + 1}/{args.repeats} {row} {setup} {system} ...", flush=True)
                    run = run_one(system, setup, row, repeat, args, results["data"], work)
                    results["runs"].append(run)
                    save(results, out_json, work)
                    report_run(run, results, args)
    add_mfu(results)
    save(results, out_json, work)
    print(write_markdown(json.loads(out_json.read_text()), out_md))
    for steps, warmup, repeats in ((12, 2, 2), (4, 1, 1), (3, 1, 1), (2, 1, 1)):
        print(f"[vs_hf] these rows × setups × systems with --steps {steps} --warmup {warmup} --repeats {repeats}: "
              f"≈ {estimate_minutes(results, steps, warmup, repeats):.0f} min (from this run's walls and steps)")
    print(f"[vs_hf] wrote {out_json} and {out_md}", flush=True)
    return 0 if all(r["rc"] == 0 for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
