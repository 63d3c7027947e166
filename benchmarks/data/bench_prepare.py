"""Throughput, memory and near-duplicate recall of `tunesmith data prepare` on synthetic records.

    python benchmarks/data/bench_prepare.py            # all of it: prepare.json here (report.py turns it into the tables of prepare.md)
    python benchmarks/data/bench_prepare.py --sizes 100000 --near-sizes 100000   # a quick look

Every measured run is its own process (`run` below), so its peak RSS (VmHWM) is its own. The records
are synthetic chats (Zipf-distributed pseudo-words: a question of 8-20 words, an answer of 20-80) with
planted exact duplicates (3%: case and punctuation changed), near-duplicates (3%: one word of the
answer replaced), symbol junk (1%) and repeated-phrase spam (1%), written once to a JSONL per size.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
VOCAB_SIZE = 20_000


def vocabulary(rng: np.random.Generator) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return np.array(["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(VOCAB_SIZE)])


def generate(n: int, path: Path, seed: int = 0) -> dict:
    """n chat records with planted duplicates and junk; returns how many of each were planted."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary(rng)
    weights = 1.0 / np.arange(1, VOCAB_SIZE + 1) ** 1.05
    weights /= weights.sum()
    def word_stream():  # Zipf-drawn words, a block at a time (the memory of one block, whatever n)
        while True:
            yield from vocab[rng.choice(VOCAB_SIZE, size=100_000, p=weights)].tolist()

    words = word_stream()
    kinds = rng.random(n)
    planted = {"exact": 0, "near": 0, "symbols": 0, "spam": 0}
    made: list[tuple[str, str]] = []
    with open(path, "w") as f:
        for i in range(n):
            kind = kinds[i]
            if made and kind < 0.03:
                q, a = made[int(rng.integers(len(made)))]
                q, a = q.upper(), a.replace(".", "!")
                planted["exact"] += 1
            elif made and kind < 0.06:
                q, a = made[int(rng.integers(len(made)))]
                answer = a.split()
                answer[int(rng.integers(len(answer)))] = "replaced"
                a = " ".join(answer)
                planted["near"] += 1
            else:
                q = " ".join(next(words) for _ in range(int(rng.integers(8, 21)))).capitalize() + "?"
                a = " ".join(next(words) for _ in range(int(rng.integers(20, 81)))).capitalize() + "."
                if kind < 0.07:
                    a = "".join(rng.choice(list("#$%&*{}[]<>|~^"), len(a)))
                    planted["symbols"] += 1
                elif kind < 0.08:
                    a = " ".join(["click here to win"] * 20)
                    planted["spam"] += 1
                elif len(made) < 200_000:
                    made.append((q, a))
            row = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            f.write(json.dumps(row) + "\n")
    return planted


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def run_one(args) -> None:
    """One prepare run in this process; prints a JSON line of its report and resources."""
    from tunesmith.config import DataConfig
    from tunesmith.data.pipeline import PrepareConfig, prepare

    tokenizer = None
    if args.tokenize:
        from tunesmith.models.load import load_tokenizer

        tokenizer = load_tokenizer("smollm2-135m-instruct")
    base_rss = rss_mb()  # after the imports (and the tokenizer): what the pipeline adds is above this
    cfg = PrepareConfig(inputs=[args.input], output=args.output, tokenize=args.tokenize, workers=args.workers,
                        near_dedup={"enabled": args.near}, pii={"enabled": args.pii},
                        filters={"languages": ["en"]} if args.langid else {})
    cpu0 = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    t0 = time.perf_counter()
    result = prepare(cfg, DataConfig(limit=args.limit), tokenizer)
    wall = time.perf_counter() - t0
    cpu = sum(b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime
              for a, b in zip(cpu0, [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]))
    print(json.dumps({"report": result.report, "wall_s": wall, "cpu_s": cpu, "base_rss_mb": base_rss}))


def measured(input_path: Path, out: Path, *flags: str, limit: int | None = None) -> dict:
    """`run` in a fresh process (its own VmHWM)."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "run", "--input", str(input_path), "--output", str(out), *flags]
    if limit:
        cmd += ["--limit", str(limit)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# near-duplicate recall


def shingle_set(text: str, n: int = 3) -> set:
    from tunesmith.data.pipeline.dedup import shingles

    return set(shingles(text, n))


def plant_near_duplicates(path: Path, n_base: int, n_planted: int, seed: int = 1) -> list[dict]:
    """n_base distinct chats and n_planted edited copies (1-4 word substitutions, deletions or
    insertions; case and punctuation changes); returns, per planted copy, its line, its original's
    line and their true Jaccard of word 3-shingles (what the threshold is about)."""
    rng = random.Random(seed)
    vocab = vocabulary(np.random.default_rng(seed))
    rows, planted = [], []
    for _ in range(n_base):
        rows.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(40, 120))))
    for _ in range(n_planted):
        k = rng.randrange(n_base)
        words = rows[k].split()
        for _ in range(rng.randint(1, 4)):
            op, at = rng.choice(("sub", "del", "ins")), rng.randrange(len(words))
            if op == "sub":
                words[at] = rng.choice(vocab)
            elif op == "del" and len(words) > 10:
                del words[at]
            else:
                words.insert(at, rng.choice(vocab))
        text = " ".join(words)
        text = text.upper() if rng.random() < 0.2 else text.replace(" ", ", ", 1) if rng.random() < 0.3 else text
        jaccard = len(shingle_set(rows[k]) & shingle_set(text)) / len(shingle_set(rows[k]) | shingle_set(text))
        planted.append({"line": len(rows) + 1, "original": k + 1, "jaccard": jaccard})
        rows.append(text)
    with open(path, "w") as f:
        for text in rows:
            f.write(json.dumps({"text": text}) + "\n")
    return planted


def recall(work: Path, n_base: int = 20_000, n_planted: int = 2_000) -> dict:
    """Recall of the planted near-duplicates at the default threshold, by true Jaccard; and the removed
    records that were not planted (false positives)."""
    from tunesmith.config import DataConfig
    from tunesmith.data.pipeline import PrepareConfig, prepare

    path = work / "planted.jsonl"
    planted = plant_near_duplicates(path, n_base, n_planted)
    off = {k: None for k in ("max_symbol_ratio", "max_dup_line_ratio", "max_top_ngram_ratio", "max_dup_ngram_ratio")}
    result = prepare(PrepareConfig(inputs=[str(path)], output=str(work / "planted-out"), tokenize=False,
                                   exact_dedup=False, filters=off), DataConfig())
    pairs = [json.loads(line) for line in (work / "planted-out" / "near_duplicates.jsonl").read_text().splitlines()]
    removed = {int(p["removed"].rsplit(":", 1)[1]) for p in pairs}
    buckets = {}
    for name, low, high in (("J >= 0.8", 0.8, 1.01), ("0.7 <= J < 0.8", 0.7, 0.8), ("J < 0.7", 0.0, 0.7)):
        group = [p for p in planted if low <= p["jaccard"] < high]
        found = sum(p["line"] in removed for p in group)
        buckets[name] = {"planted": len(group), "removed": found, "recall": found / len(group) if group else None}
    planted_lines = {p["line"] for p in planted}
    return {"base": n_base, "planted": n_planted, "by_jaccard": buckets,
            "false_positives": len(removed - planted_lines), "threshold": 0.8,
            "near_dedup_records_per_s": next(s["records_per_s"] for s in result.report["steps"]
                                             if s["step"] == "near_dedup")}


# --------------------------------------------------------------------------------------------------
# the whole benchmark


def steps_table(report: dict) -> list[str]:
    lines = ["| step | records in | dropped | seconds | records/s |", "|---|---:|---:|---:|---:|"]
    for s in report["steps"]:
        rate = f"{s['records_per_s']:,}" if s["records_per_s"] else "-"
        lines.append(f"| {s['step']} | {s['records_in']:,} | {s['dropped']:,} | {s['seconds']:.1f} | {rate} |")
    return lines


def summary_row(label: str, n: int, r: dict) -> str:
    rep = r["report"]
    return (f"| {label} | {n:,} | {rep['records_kept']:,} | {r['wall_s']:.1f} | {n / r['wall_s']:,.0f} | "
            f"{r['cpu_s']:.1f} | {n / r['cpu_s']:,.0f} | {rep['peak_rss_mb']:.0f} | "
            f"{rep['peak_rss_mb'] - r['base_rss_mb']:.0f} |")


def main(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    biggest = max(args.sizes + args.near_sizes)
    data = work / f"records-{biggest}.jsonl"
    t = time.perf_counter()
    planted = generate(biggest, data)
    print(f"generated {biggest:,} records in {time.perf_counter() - t:.0f} s: planted {planted}", flush=True)
    runs: dict[str, dict] = {}
    for n in args.sizes:
        runs[f"clean-{n}"] = measured(data, work / "out", limit=n)
        print(f"clean {n:,}: {runs[f'clean-{n}']['wall_s']:.1f} s", flush=True)
    mid = sorted(args.sizes)[len(args.sizes) // 2]
    runs[f"clean-w2-{mid}"] = measured(data, work / "out", "--workers", "2", limit=mid)
    small = min(args.near_sizes)
    runs[f"near-w2-{small}"] = measured(data, work / "out", "--near", "--workers", "2", limit=small)
    for n in args.near_sizes:
        runs[f"near-{n}"] = measured(data, work / "out", "--near", limit=n)
        print(f"near {n:,}: {runs[f'near-{n}']['wall_s']:.1f} s", flush=True)
    runs[f"pii-{small}"] = measured(data, work / "out", "--pii", limit=small)
    runs["pii-langid"] = measured(data, work / "out", "--pii", "--langid", limit=args.tokenize_records)
    runs["tokenize"] = measured(data, work / "out", "--near", "--tokenize", limit=args.tokenize_records)
    found = recall(work)
    results = {"machine": machine(), "planted": planted, "runs": runs, "recall": found}
    (HERE / "prepare.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(found, indent=1))


def machine() -> dict:
    load = os.getloadavg()[0]
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "load_average_1min_at_end": round(load, 1), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="one measured prepare run (used by the benchmark itself)")
    r.add_argument("--input", required=True)
    r.add_argument("--output", required=True)
    r.add_argument("--limit", type=int, default=None)
    r.add_argument("--workers", type=int, default=1)
    for flag in ("--near", "--pii", "--langid", "--tokenize"):
        r.add_argument(flag, action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000],
                        help="records for the exact-dedup + filters runs")
    parser.add_argument("--near-sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000],
                        help="records for the runs with near-dedup")
    parser.add_argument("--tokenize-records", type=int, default=20_000, help="records for the tokenize and pii runs")
    parser.add_argument("--work", default="/tmp/tunesmith-bench-data", help="where the synthetic files go")
    args = parser.parse_args()
    run_one(args) if args.cmd == "run" else main(args)
