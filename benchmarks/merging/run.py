"""Many models into one (issue 19): a sql specialist and a json specialist, and every route that puts
both skills into one model, measured side by side. Run from the repository root:

    python benchmarks/merging/run.py data        # the mixed sql+json training file, the general text
    nice -n 5 bash benchmarks/merging/train.sh   # every trained / merged / grown row (skips finished ones)
    nice -n 5 python benchmarks/merging/run.py eval            # every row without a result yet
    nice -n 5 python benchmarks/merging/run.py eval sql,json   # ...or these rows (measured again)
    nice -n 5 python benchmarks/merging/run.py speed           # tokens/s, one row per architecture
    python benchmarks/merging/run.py table       # benchmarks/merging/results.json + the markdown table

Per row, in its own process: execution accuracy on the first `LIMIT` sql test questions and exact
match on the first `LIMIT` json test questions (greedy, at most `MAX_NEW` new tokens, the tasks' own
system prompts; an enforced-routing row answers each task through that task's expert); perplexity
on held-out general text (the module docstrings of the Python standard library: English prose about
software that no row trains on), against the base model's = forgetting; the answers' loss on
held-out sql+json validation records; parameters; training time from the runs' own reports. Then,
in one process and one sitting, tokens/s of a fixed-length greedy decode (no stop token ends it
early) for each architecture. Everything runs on 1 torch thread: the machine is 2 cores shared with
other jobs.
"""
from __future__ import annotations

import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = Path("runs/merging")  # relative to the repository root: result files carry no machine paths
OUT = Path("benchmarks/merging/results.json")
LIMIT, MAX_NEW, EVAL_BATCH, SPEED_BATCH, SPEED_TOKENS, THREADS = 40, 56, 20, 8, 32, 1
GENERAL_DOCS, GENERAL_CHARS, VAL_RECORDS = 20, 1200, 30

# row -> label, model (run folder with model/ or a model name; None = the embedded default),
# adapter (run folder), runs whose training time counts, how it is routed at inference
ROWS = {
    "base": dict(label="base SmolLM2-135M-Instruct", runs=[]),
    "sql": dict(label="sql specialist (LoRA, 30 steps)", adapter="sql", runs=["sql"]),
    "json": dict(label="json specialist (LoRA, 30 steps)", adapter="json", runs=["json"]),
    "multitask": dict(label="multi-task SFT (LoRA, sql+json mixed, 60 steps)", adapter="multitask", runs=["multitask"]),
    "merge-linear": dict(label="merge: linear (0.5/0.5)", adapter="merge-linear", runs=["sql", "json"], merge=True),
    "merge-task-arithmetic": dict(label="merge: task arithmetic (1.0/1.0)", adapter="merge-task-arithmetic",
                                  runs=["sql", "json"], merge=True),
    "merge-ties": dict(label="merge: TIES", adapter="merge-ties", runs=["sql", "json"], merge=True),
    "merge-dare": dict(label="merge: DARE+TIES", adapter="merge-dare", runs=["sql", "json"], merge=True),
    "merge-slerp": dict(label="merge: SLERP (t=0.5)", adapter="merge-slerp", runs=["sql", "json"], merge=True),
    "moe-learned": dict(label="MoE upcycling E=2, learned top-2 router (30 steps)", adapter="moe-learned", runs=["moe-learned"]),
    "moe-enforced": dict(label="MoE upcycling E=2, enforced routing by domain (30 steps)", adapter="moe-enforced",
                         runs=["moe-enforced"], domain=True),
    "moe-lora": dict(label="MoE-LoRA: 2 LoRA experts per MLP, learned top-2 router (30 steps)", adapter="moe-lora", runs=["moe-lora"]),
    "fusion": dict(label="knowledge fusion of the 2 specialists into a LoRA student (30 steps)", adapter="fusion",
                   runs=["sql", "json", "fusion"]),
    "grown": dict(label="depth up-scaling 30→36 layers (layers 12-17 repeated), untrained", model="grown",
                  runs=[], extra="grown"),
    "grow": dict(label="depth up-scaling 30→36 layers, then multi-task LoRA (30 steps)", model="grown", adapter="grow",
                 runs=["grow"], extra="grown"),
}
NOT_RUN: dict[str, str] = {}  # row -> why it has no result (when a route could not be run)
DOMAINS = ("sql", "json")


def _task(name):
    from tunesmith.data.tasks import get_task

    return get_task(name, seed=0)


def write_data() -> None:
    """runs/merging/multitask.jsonl (+ -val): both tasks' chat records, shuffled, each with its `domain`;
    runs/merging/general.jsonl: the general text."""
    from tunesmith.data.tasks import task_records

    WORK.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "multitask.jsonl"), ("validation", "multitask-val.jsonl")):
        rows = [{**r, "domain": d} for d in DOMAINS for r in task_records(_task(d), split)]
        random.Random(0).shuffle(rows)
        (WORK / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (WORK / "general.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in general_texts()))


def general_texts() -> list[str]:
    """Every other standard-library module docstring of 600+ characters (sorted by module name), cut
    at GENERAL_CHARS: plain English about software, seen by no row's training data."""
    import importlib
    import warnings

    warnings.filterwarnings("ignore")
    docs = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in ("antigravity", "this", "idlelib", "turtledemo", "tkinter", "test"):
            continue
        try:
            doc = (importlib.import_module(name).__doc__ or "").strip()
        except Exception:  # a module this build lacks (e.g. a platform-specific one)
            continue
        if len(doc) >= 600:
            docs.append(doc[:GENERAL_CHARS])
    return docs[::2][:GENERAL_DOCS]


def load_row(row: str):
    from tunesmith.infer.generate import load_for_inference

    spec = ROWS[row]
    model = str(WORK / spec["model"]) if spec.get("model") else None
    adapter = str(WORK / spec["adapter"]) if spec.get("adapter") else None
    if adapter and (Path(adapter) / "config.json").is_file():  # a merge written as a full model folder
        model, adapter = adapter, None
    return load_for_inference(model, adapter=adapter)


def routed(model, row: str, domain: str | None):
    """A context in which every token runs through `domain`'s expert (rows with enforced routing: the
    domain names saved with the adapter give the expert's number), else no change."""
    import contextlib

    if domain is None or not ROWS[row].get("domain"):
        return contextlib.nullcontext()
    from tunesmith.infer.domains import domain_route

    return domain_route(model, domain, adapter=str(WORK / ROWS[row]["adapter"]))


def speed(model, tok, row: str, repeats: int = 2) -> float:
    """Tokens/s of a greedy decode of exactly SPEED_TOKENS new tokens for SPEED_BATCH sql prompts (best of
    `repeats`)."""
    import torch

    from tunesmith.eval.runner import build_prompt
    from tunesmith.infer.generate import _encode, left_pad, stop_ids

    task = _task("sql")
    rows = [_encode(tok, build_prompt(task, ex, []), None) for ex in task.examples("test")[:SPEED_BATCH]]
    pad = stop_ids(model, tok)[0]
    ids, mask = left_pad(rows, pad)
    best = float("inf")
    with torch.inference_mode(), routed(model, row, "sql"):
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=SPEED_TOKENS,
                                 min_new_tokens=SPEED_TOKENS, do_sample=False, pad_token_id=pad,
                                 temperature=None, top_p=None, top_k=None)
            best = min(best, time.perf_counter() - t0)
    assert out.shape[1] == ids.shape[1] + SPEED_TOKENS
    return SPEED_BATCH * SPEED_TOKENS / best


def router_use(model, tok) -> dict:
    """Learned routers: per task, the mean router probability of expert 0 and the mean entropy of a
    token's router distribution (ln 2 = 0.69: undecided), over the tokens of 8 test questions with
    their gold answers and over every routed layer. Shows whether the router tells the tasks apart."""
    import torch

    from tunesmith.data.tasks import task_records
    from tunesmith.models.moe import moe_modules

    out = {}
    if not any(getattr(m, "router", None) is not None for m in moe_modules(model)):
        return out
    for name in DOMAINS:
        texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in task_records(_task(name), "test")[:8]]
        p0, ent = [], []
        for text in texts:
            with torch.inference_mode():
                model(**tok(text, return_tensors="pt"))
            for m in moe_modules(model):
                if getattr(m.router, "last", None) is not None:
                    logp = torch.log_softmax(m.router.last[0].float(), dim=-1)
                    p0.append(logp[:, 0].exp().mean())
                    ent.append(-(logp.exp() * logp).sum(-1).mean())
        if p0:
            out[name] = {"p_expert0": float(torch.stack(p0).mean()), "router_entropy": float(torch.stack(ent).mean())}
    return out


def eval_row(row: str) -> dict:
    import torch

    from tunesmith.eval.runner import evaluate, save_result
    from tunesmith.objectives.sft import perplexity

    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    model, tok = load_row(row)
    domain = ROWS[row].get("domain")
    out = {"row": row, "parameters": sum(p.numel() for p in model.parameters()), "tasks": {}}
    for name in DOMAINS:
        path = WORK / "eval" / f"{row}-{name}.json"
        if path.is_file():  # measured by an earlier, interrupted call
            summary = json.loads(path.read_text())["summary"]
        else:
            with routed(model, row, name):
                r = evaluate(model, tok, _task(name), split="test", limit=LIMIT, max_new_tokens=MAX_NEW,
                             batch_size=EVAL_BATCH, progress=False)
            save_result(r, path)
            summary = r.summary
        out["tasks"][name] = {k: summary[k] for k in ("accuracy", "mean_score", "generation_s")}
        print(f"{row} {name}: {100 * summary['accuracy']:.1f}%", flush=True)
    # general text has no domain: an enforced-routing row is measured through each expert in turn
    for name in DOMAINS if domain else [None]:
        with routed(model, row, name):
            ppl = perplexity(model, tok, str(WORK / "general.jsonl"), max_length=512, batch_tokens=2048)
        out["general" if name is None else f"general via {name}"] = ppl
    # the answers' loss on held-out sql+json records (validation split; enforced rows route by record)
    out["task_val"] = perplexity(model, tok, str(WORK / "multitask-val.jsonl"), limit=VAL_RECORDS, max_length=512,
                                 batch_tokens=2048)
    out["router"] = router_use(model, tok)
    out["train_s"] = train_seconds(row)
    return out


def train_seconds(row: str) -> dict:
    """Wall time of each training run a row depends on, from its report (plus a timed extra step)."""
    times = {}
    for run in ROWS[row]["runs"]:
        report = WORK / run / "report.md"
        m = re.search(r"wall time \(this session\) \| ([\d.]+) s", report.read_text()) if report.is_file() else None
        times[run] = float(m.group(1)) if m else None
    for step in filter(None, [ROWS[row].get("extra"), row if ROWS[row].get("merge") else None]):
        f = WORK / "times" / f"{step}.s"
        times[step] = float(f.read_text()) if f.is_file() else None
    return times


# one row per architecture: every LoRA, merge and fusion row merges into the dense base's weights, the
# grown model's LoRA into the grown model's
SPEED_ROWS = ("base", "moe-learned", "moe-enforced", "moe-lora", "grown")


def speed_pass(rows: list[str], rounds: int = 3) -> None:
    """Tokens/s of each architecture in one process and one sitting, rounds interleaved (a busy moment of
    the shared machine hits every row alike), best round kept: runs/merging/speed.json."""
    import torch

    torch.set_num_threads(THREADS)
    models = {row: load_row(row) for row in rows if available(row)}
    best = {row: 0.0 for row in models}
    for _ in range(rounds):
        for row, (model, tok) in models.items():
            best[row] = max(best[row], speed(model, tok, row, repeats=1))
            print(f"{row}: {best[row]:.1f} tokens/s", flush=True)
    (WORK / "speed.json").write_text(json.dumps(best, indent=1) + "\n")


def available(row: str) -> bool:
    spec = ROWS[row]
    if spec.get("model") and not (WORK / spec["model"] / "config.json").is_file():
        return False
    return not spec.get("adapter") or (WORK / spec["adapter"] / "adapter").is_dir() or \
        (WORK / spec["adapter"] / "tunesmith_method.json").is_file() or (WORK / spec["adapter"] / "config.json").is_file()


def run_eval(rows: list[str], force: bool) -> None:
    (WORK / "results").mkdir(parents=True, exist_ok=True)
    for row in rows:
        path = WORK / "results" / f"{row}.json"
        if (path.is_file() and not force) or not available(row):
            print(f"skip {row}: {'done' if path.is_file() else 'not built'}", flush=True)
            continue
        try:  # two workers may share the queue: the first to take a row's lock measures it
            os.close(os.open(WORK / "results" / f"{row}.lock", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, __file__, "one", row], cwd=ROOT, env=env)
        print(f"{row}: exit {code} in {time.perf_counter() - t0:.0f} s", flush=True)
        (WORK / "results" / f"{row}.lock").unlink()


def tps(row: str, speeds: dict) -> str:
    """The figure of the row's architecture from the one-sitting speed pass (LoRA, merge and fusion rows
    run the dense base's weights; the grown model before and after its LoRA is one architecture)."""
    arch = row if row in SPEED_ROWS else "grown" if row == "grow" else "base"
    return f"{speeds[arch]:.0f}" if arch in speeds else "—"


def table() -> str:
    import torch

    results = {row: json.loads((WORK / "results" / f"{row}.json").read_text())
               for row in ROWS if (WORK / "results" / f"{row}.json").is_file()}
    base_ppl = results["base"]["general"]["perplexity"] if "base" in results else None
    speeds = json.loads((WORK / "speed.json").read_text()) if (WORK / "speed.json").is_file() else {}
    lines = ["| row | sql exec. acc. | json exact match (field score) | mean | general-text ppl (base → row) | sql+json val loss | "
             "parameters | tokens/s | training time |", "|---|---|---|---|---|---|---|---|---|"]
    for row, spec in ROWS.items():
        r = results.get(row)
        if r is None:
            lines.append(f"| {spec['label']} | {NOT_RUN.get(row, 'not run')} | | | | | | | |")
            continue
        acc = [r["tasks"][d]["accuracy"] for d in DOMAINS]
        if "general" in r:
            ppl = f"{r['general']['perplexity']:.2f}"
        else:
            ppl = " / ".join(f"{r[f'general via {d}']['perplexity']:.2f} ({d} expert)" for d in DOMAINS)
        forget = f"{base_ppl:.2f} → {ppl}" if base_ppl else ppl
        r["train_s"] = train_seconds(row)  # read again: a run's report may be newer than the row's result
        train = " + ".join(f"{k} {v:.0f}" for k, v in r["train_s"].items() if v is not None) + " s" if r["train_s"] else "—"
        field = r["tasks"]["json"]["mean_score"]
        lines.append(f"| {spec['label']} | {100 * acc[0]:.1f}% | {100 * acc[1]:.1f}% ({100 * field:.0f}%) | {50 * sum(acc):.1f}% | "
                     f"{forget} | {r['task_val']['loss']:.3f} | {r['parameters'] / 1e6:.1f}M | "
                     f"{tps(row, speeds)} | {train} |")
    OUT.write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores, {THREADS} torch thread",
                               "torch": torch.__version__, "settings": dict(limit=LIMIT, max_new_tokens=MAX_NEW,
                               speed_batch=SPEED_BATCH, speed_tokens=SPEED_TOKENS, general_docs=GENERAL_DOCS),
                               "speed": speeds, "rows": results}, indent=1) + "\n")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    os.chdir(ROOT)
    cmd = argv[0] if argv else "eval"
    if cmd == "data":
        write_data()
    elif cmd == "one":
        out = eval_row(argv[1])
        (WORK / "results" / f"{argv[1]}.json").write_text(json.dumps(out, indent=1) + "\n")
    elif cmd == "eval":
        run_eval(argv[1].split(",") if len(argv) > 1 else list(ROWS), force=len(argv) > 1)
    elif cmd == "speed":
        speed_pass(argv[1].split(",") if len(argv) > 1 else list(SPEED_ROWS))
    elif cmd == "table":
        print(table())
    else:
        raise SystemExit(f"unknown command {cmd}: data, eval [ROWS], speed [ROWS], table")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
