"""tunesmith against HF Trainer + PEFT: the same model, data and steps, training throughput and memory.

    python benchmarks/vs_hf/run.py                                   # 12 timed steps, 2 repeats (long on 2 cores)
    python benchmarks/vs_hf/run.py --steps 2 --warmup 1 --repeats 1 --out-dir /tmp/vs_hf_smoke   # a smoke run
    python benchmarks/vs_hf/run.py --setups lora --systems hf-best,tunesmith

Two setups — LoRA (r=16, alpha 32, dropout 0, every linear layer of the decoder) and full fine-tuning —
each trained by three systems on the embedded SmolLM2-135M-Instruct and the same plain English text
(Python's bundled documentation topics, cut to 512 tokens a sample, every token trained):

  hf-default  HF Trainer + PEFT as it runs by default: fp32, 8 samples a step padded to the longest,
              glibc malloc (LD_PRELOAD unset).
  hf-best     HF Trainer + PEFT at its best on a CPU: bf16=True, padding-free batches
              (DataCollatorWithFlattening) holding exactly the samples of tunesmith's packed rows
              (about 4096 tokens a step), jemalloc preloaded when installed.
  tunesmith   `tunesmith bench` on recipes/lora-sft.yaml or full-sft.yaml with the same data: text
              format, packed rows of 4096 tokens, bf16, max_length 512 (it preloads jemalloc itself).

Every run is its own process, started in turn (repeat 1: every setup × system, then repeat 2, ...):
`--warmup` untimed optimizer steps, then `--steps` timed ones. Reported per run: trained tokens per
second and seconds per step over the timed steps, the process's peak RSS (from `wait4`, the same for
all three), and the whole process's wall time. The tables give medians over the repeats.
Raw runs go to OUT_DIR/results.json, the tables to OUT_DIR/results.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
SYSTEMS = ("hf-default", "hf-best", "tunesmith")
SETUPS = ("lora", "full")
# The shipped recipes; their learning rates are used on the HF side too.
RECIPES = {"lora": (ROOT / "recipes/lora-sft.yaml", 2e-4), "full": (ROOT / "recipes/full-sft.yaml", 2e-5)}
MODEL = "smollm2-135m-instruct"


def general_text():
    """`general_text` of benchmarks/methods/run.py (loaded by path: this file is also called run.py)."""
    spec = importlib.util.spec_from_file_location("methods_run", HERE.parent / "methods" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.general_text


def prepare_data(args, work: Path) -> dict:
    """Write the text JSONL (every documentation topic, cycled as often as the steps need) and the
    packed plan of it that tunesmith will follow; the hf-best run gets the same plan."""
    from transformers import AutoTokenizer

    from hf_train import tokenize
    from tunesmith.data.batching import plan_batches
    from tunesmith.models.load import resolve

    model_dir = str(resolve(MODEL))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    docs_file = general_text()(data_dir / "docs.jsonl", 10**6)  # all of them (~80)
    docs = [line for line in docs_file.read_text().splitlines() if line.strip()]
    lengths_once = [len(s["input_ids"]) for s in tokenize(str(docs_file), tokenizer, args.max_length)]
    total = args.warmup + args.steps
    # Enough cycles that neither plan runs out inside the run; the last packed rows (partly filled)
    # stay beyond it.
    for cycles in range(1, 1000):
        lengths = lengths_once * cycles
        packed = plan_batches(lengths, packing=True, batch_tokens=args.batch_tokens, batch_size=8, seed=0, epoch=0,
                              shuffle=False)
        if len(packed) >= total + 4 and len(lengths) >= total * 8:
            break
    text_file = data_dir / "text.jsonl"
    text_file.write_text("\n".join(docs * cycles) + "\n")
    plan_file = data_dir / "packed_batches.json"
    plan_file.write_text(json.dumps(packed))
    units = [n - 1 for n in lengths]  # every token after a sample's first trains
    expected = sum(units[j] for row in packed[args.warmup:total] for j in row)
    print(f"[vs_hf] data: {len(docs)} documents × {cycles} = {len(lengths)} samples, {sum(lengths):,} tokens "
          f"(≤{args.max_length} each); {len(packed)} packed rows of ≤{args.batch_tokens} tokens", flush=True)
    return {"model_dir": model_dir, "text": str(text_file), "plan": str(plan_file), "documents": len(docs),
            "cycles": cycles, "samples": len(lengths), "tokens": sum(lengths),
            "mean_sample_tokens": sum(lengths) / len(lengths), "packed_rows": len(packed),
            "tunesmith_expected_trained_tokens": expected}


def child_env(system: str, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TUNESMITH_ALLOCATOR")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if system == "hf-best" and Path(JEMALLOC).is_file():
        env["LD_PRELOAD"] = JEMALLOC
    # hf-default: glibc malloc (no LD_PRELOAD). tunesmith: re-executes itself with jemalloc when installed.
    return env


def command(system: str, setup: str, args, data: dict, out_json: Path) -> list[str]:
    recipe, lr = RECIPES[setup]
    if system == "tunesmith":
        exe = Path(sys.executable).with_name("tunesmith")
        head = [str(exe)] if exe.is_file() else [sys.executable, "-m", "tunesmith"]
        # the options last: argparse takes no more positional overrides after them
        return [*head, "bench", str(recipe), f"steps={args.steps}", f"warmup={args.warmup}",
                f"data.train={data['text']}", "data.format=text", "data.validation=null", "data.val_fraction=0",
                f"data.max_length={args.max_length}", "data.overflow=truncate", "data.packing=true",
                "data.shuffle=false", f"train.batch_tokens={args.batch_tokens}", "train.grad_accum=1",
                "train.precision=bf16", f"train.threads={args.threads}", "train.max_grad_norm=1.0",
                f"train.lr={lr}", "train.eval_every=0", "train.save_every=0", "train.seed=0",
                "--no-breakdown", "--json", str(out_json)]
    mode = system.removeprefix("hf-")
    cmd = [sys.executable, str(HERE / "hf_train.py"), "--model", data["model_dir"], "--data", data["text"],
           "--setup", setup, "--mode", mode, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--lr", str(lr), "--max-length", str(args.max_length), "--batch-size", "8",
           "--threads", str(args.threads), "--out", str(out_json)]
    if mode == "best":
        cmd += ["--batches", data["plan"]]
    return cmd


def run_one(system: str, setup: str, repeat: int, args, data: dict, work: Path) -> dict:
    tag = f"{setup}-{system}-r{repeat}"
    out_json, log = work / f"{tag}.json", work / f"{tag}.log"
    out_json.unlink(missing_ok=True)
    cmd = command(system, setup, args, data, out_json)
    row = {"setup": setup, "system": system, "repeat": repeat, "command": shlex.join(cmd), "log": str(log)}
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(system, args.threads),
                                cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (and its waited-for children's)
        proc.returncode = os.waitstatus_to_exitcode(status)
    row["wall_s"] = time.perf_counter() - t0
    row["peak_rss_gb"] = usage.ru_maxrss * 1024 / 1e9  # KiB on Linux; survives tunesmith's exec
    row["rc"] = proc.returncode
    if proc.returncode != 0 or not out_json.is_file():
        row["error"] = log.read_text()[-3000:]
        return row
    r = json.loads(out_json.read_text())
    if system == "tunesmith":
        units = r["trained_tokens_per_s"] * r["s_per_step"] * r["steps"]
        row.update(trained_tokens_per_s=r["trained_tokens_per_s"], s_per_step=r["s_per_step"],
                   tokens_per_s=r["tokens_per_s"], trained_tokens_per_step=units / r["steps"],
                   positions_per_step=r["tokens_per_s"] * r["s_per_step"], peak_rss_gb_self=r["peak_mem_gb"],
                   allocator=r["info"]["allocator"], trainable=r["info"]["trainable"], step_s=r["info"]["step_s"],
                   precision=r["info"]["precision"])
    else:
        row.update(trained_tokens_per_s=r["trained_tokens_per_s"], s_per_step=r["s_per_step"],
                   tokens_per_s=r["positions_per_s"], trained_tokens_per_step=r["trained_tokens_per_step"],
                   positions_per_step=r["positions_per_step"], peak_rss_gb_self=r["peak_rss_gb_inside"],
                   allocator=r["allocator"], trainable=r["trainable"], step_s=r["step_s"], precision=r["precision"])
    return row


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
    for pkg in ("torch", "transformers", "peft", "tunesmith"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags, "threads": args.threads,
            "jemalloc": JEMALLOC if Path(JEMALLOC).is_file() else None, "python": platform.python_version(),
            "versions": versions}


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(results: dict) -> dict:
    """Medians per (setup, system) over the successful repeats."""
    out = {}
    for setup in results["config"]["setups"]:
        for system in results["config"]["systems"]:
            rows = [r for r in results["runs"] if r["setup"] == setup and r["system"] == system]
            ok = [r for r in rows if r.get("rc") == 0 and "trained_tokens_per_s" in r]
            out[(setup, system)] = {
                "runs": len(rows), "ok": len(ok),
                **{k: median(ok, k) for k in ("trained_tokens_per_s", "s_per_step", "peak_rss_gb", "wall_s",
                                              "trained_tokens_per_step", "positions_per_step")},
                "allocator": "/".join(sorted({r["allocator"] for r in ok})) if ok else "—",
                "trainable": ok[0]["trainable"] if ok else None,
            }
    return out


def fmt(x, spec: str, missing: str = "—") -> str:
    return missing if x is None else format(x, spec)


def ratio(a, b) -> str:
    return "—" if a is None or not b else f"{a / b:.2f}×"


DESCRIPTION = {
    "hf-default": "fp32, 8 padded samples/step",
    "hf-best": "bf16, padding-free (flattened), tunesmith's rows",
    "tunesmith": "bf16, packed rows",
}


def write_markdown(results: dict, path: Path) -> str:
    cfg, m, data = results["config"], results["machine"], results["data"]
    s = summarize(results)
    v = m["versions"]
    lines = [
        f"# tunesmith vs HF Trainer + PEFT: {cfg['steps']} timed steps after {cfg['warmup']} warm-up, "
        f"median of {cfg['repeats']}",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['physical_cores']} physical cores), "
        f"avx512_bf16 {'yes' if m['avx512_bf16'] else 'no'}, AMX {'yes' if m['amx_bf16'] else 'no'}; "
        f"{m['threads']} torch threads for every run. torch {v['torch']}, transformers {v['transformers']}, "
        f"peft {v['peft']}, python {m['python']}. "
        f"jemalloc: {m['jemalloc'] or 'not installed (hf-best and tunesmith ran on glibc malloc)'}.",
        "",
        f"Model: SmolLM2-135M-Instruct (`{data['model_dir']}`). Data: {data['documents']} Python documentation "
        f"topics cycled {data['cycles']}× = {data['samples']} samples of ≤{cfg['max_length']} tokens "
        f"(mean {data['mean_sample_tokens']:.0f}), every token trained, in file order.",
        "",
        "trained tokens/s and s/step: over the timed steps (trained = label positions the loss uses, padding "
        "excluded). peak RSS: the run's process, from `wait4` (model load included). wall: the whole process.",
    ]
    for setup in cfg["setups"]:
        title = {"lora": "LoRA r=16, alpha 32, dropout 0, all linear layers", "full": "Full fine-tuning"}[setup]
        lines += ["", f"## {title}", "",
                  "| system | how | trained tokens/s | s/step | trained tokens/step | peak RSS GB | wall s | allocator | "
                  "trainable | runs |",
                  "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
        for system in cfg["systems"]:
            r = s[(setup, system)]
            lines.append(
                f"| {system} | {DESCRIPTION[system]} | {fmt(r['trained_tokens_per_s'], ',.0f')} | "
                f"{fmt(r['s_per_step'], '.2f')} | {fmt(r['trained_tokens_per_step'], ',.0f')} | "
                f"{fmt(r['peak_rss_gb'], '.2f')} | {fmt(r['wall_s'], '.0f')} | {r['allocator']} | "
                f"{fmt(r['trainable'], ',')} | {r['ok']}/{r['runs']} |")
        if "tunesmith" in cfg["systems"]:
            t = s[(setup, "tunesmith")]
            others = [x for x in ("hf-default", "hf-best") if x in cfg["systems"]]
            if others:
                lines += ["", "| tunesmith ÷ | trained tokens/s | peak RSS |", "|---|---:|---:|"]
                for other in others:
                    o = s[(setup, other)]
                    lines.append(f"| {other} | {ratio(t['trained_tokens_per_s'], o['trained_tokens_per_s'])} | "
                                 f"{ratio(t['peak_rss_gb'], o['peak_rss_gb'])} |")
    failed = [r for r in results["runs"] if r.get("rc") != 0]
    if failed:
        lines += ["", "Failed runs: " + ", ".join(f"{r['setup']}/{r['system']} r{r['repeat']} (rc {r['rc']}, "
                                                  f"log {r['log']})" for r in failed)]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every setup × system")
    p.add_argument("--setups", default="lora,full", help="comma-separated: lora, full")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated: " + ", ".join(SYSTEMS))
    p.add_argument("--out-dir", default=str(HERE), help="where results.json and results.md go")
    p.add_argument("--work-dir", default=None, help="data, per-run logs and JSON (default: runs/vs_hf, or OUT_DIR/work for another OUT_DIR)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every run")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per packed step (hf-best, tunesmith)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per sample at most")
    p.add_argument("--table-only", action="store_true", help="rewrite results.md from OUT_DIR/results.json")
    args = p.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        print(write_markdown(json.loads((out_dir / "results.json").read_text()), out_dir / "results.md"))
        return 0
    setups = [x for x in args.setups.split(",") if x]
    systems = [x for x in args.systems.split(",") if x]
    if bad := [x for x in setups if x not in SETUPS]:
        p.error(f"unknown setup(s) {bad}; choose from {', '.join(SETUPS)}")
    if bad := [x for x in systems if x not in SYSTEMS]:
        p.error(f"unknown system(s) {bad}; choose from {', '.join(SYSTEMS)}")
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--steps ≥ 1, --warmup ≥ 0, --repeats ≥ 1")
    if args.work_dir:
        work = Path(args.work_dir)
    else:  # scratch stays out of the repository (runs/ is ignored)
        work = ROOT / "runs" / "vs_hf" if out_dir.resolve() == HERE else out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)

    script = Path(__file__).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    results = {
        "command": shlex.join(["python", str(shown), *sys.argv[1:]]),
        "config": {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "setups": setups,
                   "systems": systems, "threads": args.threads, "batch_tokens": args.batch_tokens,
                   "max_length": args.max_length, "hf_default_batch_size": 8},
        "machine": machine(args),
        "runs": [],
    }
    print(f"[vs_hf] jemalloc {'found: ' + JEMALLOC if Path(JEMALLOC).is_file() else 'not installed'} "
          f"(hf-best preloads it; tunesmith preloads it itself; hf-default runs on glibc malloc)", flush=True)
    results["data"] = prepare_data(args, work)
    out_json, out_md = out_dir / "results.json", out_dir / "results.md"
    for repeat in range(args.repeats):
        for setup in setups:
            for system in systems:
                print(f"[vs_hf] repeat {repeat + 1}/{args.repeats} {setup} {system} ...", flush=True)
                row = run_one(system, setup, repeat, args, results["data"], work)
                results["runs"].append(row)
                out_json.write_text(json.dumps(results, indent=1))
                if row["rc"] != 0 or "trained_tokens_per_s" not in row:
                    print(f"[vs_hf]   failed (rc {row['rc']}), log {row['log']}:\n{row.get('error', '')[-1500:]}",
                          flush=True)
                    continue
                print(f"[vs_hf]   {row['trained_tokens_per_s']:,.0f} trained tokens/s, {row['s_per_step']:.2f} s/step, "
                      f"{row['trained_tokens_per_step']:,.0f} trained tokens/step, peak RSS {row['peak_rss_gb']:.2f} GB, "
                      f"wall {row['wall_s']:.0f} s, allocator {row['allocator']}", flush=True)
                if system == "tunesmith":
                    expected = results["data"]["tunesmith_expected_trained_tokens"] / args.steps
                    if abs(row["trained_tokens_per_step"] - expected) > 0.5:
                        print(f"[vs_hf]   note: tunesmith trained {row['trained_tokens_per_step']:.1f} tokens/step, "
                              f"the plan given to hf-best {expected:.1f}: the two did not see the same rows", flush=True)
    print(write_markdown(results, out_md))
    print(f"[vs_hf] wrote {out_json} and {out_md}", flush=True)
    return 0 if all(r["rc"] == 0 for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
