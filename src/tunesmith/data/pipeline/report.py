"""The prepare report: per step, the records that reached it, what it dropped (and the first one), its
time and throughput; PII replacements, near-duplicate pairs, samples and tokens written, peak memory.
Written as report.json, report.md, and into the shards' manifest."""
from __future__ import annotations

from .config import PrepareConfig
from .filters import build_filters


def step_names(cfg: PrepareConfig) -> list[str]:
    """The steps that ran, in order."""
    steps = ["read", "normalise"]
    if cfg.exact_dedup:
        steps.append("exact_dedup")
    steps += [name for name, _ in build_filters(cfg.filters)]
    if cfg.pii.enabled:
        steps.append("pii")
    if cfg.near_dedup.enabled:
        steps.append("near_dedup")
    if cfg.tokenize:
        steps.append("tokenize")
    return steps + ["write"]


def _peak_rss_mb() -> float | None:
    """This process's own high-water mark (VmHWM), in MB (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def build_report(cfg: PrepareConfig, sources, fmt, tally, out, exact, near, workers: int, wall: float) -> dict:
    steps, reaching = [], tally.read
    for name in step_names(cfg):
        if name == "tokenize":
            reasons = {k.split(":", 1)[1]: v for k, v in tally.dropped.items() if k.startswith("render:")}
            dropped = sum(reasons.values())
            first = next((tally.first[k] for k in tally.first if k.startswith("render:")), None)
        else:
            reasons, dropped, first = None, tally.dropped.get(name, 0), tally.first.get(name)
        seconds = tally.seconds.get(name, 0.0)
        row = {"step": name, "records_in": reaching, "dropped": dropped, "first_dropped": first,
               "seconds": round(seconds, 3), "records_per_s": round(reaching / seconds) if seconds > 0 else None}
        if reasons:
            row["reasons"] = reasons
        steps.append(row)
        reaching -= dropped
    return {
        "inputs": sources, "format": fmt, "workers": workers, "records_read": tally.read, "records_kept": tally.kept,
        "steps": steps, "pii_replaced": tally.pii,
        "near_duplicate_pairs": tally.dropped.get("near_dedup", 0),
        "samples": out.samples, "tokens": out.tokens, "trained_tokens": out.trained_tokens,
        "domains": out.domains,
        "exact_dedup_bytes": exact.nbytes if exact is not None else 0,
        "near_dedup_records_indexed": near.count if near is not None else 0,
        "wall_seconds": round(wall, 3), "records_per_s": round(tally.read / wall) if wall > 0 else None,
        "peak_rss_mb": _peak_rss_mb(),
    }


def drop_summary(report: dict) -> str:
    parts = [f"{s['step']} dropped {s['dropped']}" for s in report["steps"] if s["dropped"]]
    return f"{report['records_read']} read; " + (", ".join(parts) or "none dropped")


def format_report(report: dict) -> str:
    """A markdown table of the steps, then the totals."""
    lines = ["| step | records in | dropped | first dropped | seconds | records/s |", "|---|---:|---:|---|---:|---:|"]
    for s in report["steps"]:
        rate = f"{s['records_per_s']:,}" if s["records_per_s"] else "-"
        first = s["first_dropped"] or ""
        if s.get("reasons"):
            first += " (" + ", ".join(f"{k}: {v}" for k, v in s["reasons"].items()) + ")"
        lines.append(f"| {s['step']} | {s['records_in']:,} | {s['dropped']:,} | {first} | {s['seconds']:.2f} | {rate} |")
    lines.append("")
    lines.append(f"{report['records_read']:,} records read, {report['records_kept']:,} kept "
                 f"({report['near_duplicate_pairs']:,} near-duplicate pairs in near_duplicates.jsonl); "
                 f"{report['samples']:,} samples, {report['tokens']:,} tokens ({report['trained_tokens']:,} trained); "
                 f"{report['wall_seconds']:.1f} s, {report['workers']} worker(s), peak RSS "
                 f"{report['peak_rss_mb'] or 0:.0f} MB")
    if report["pii_replaced"]:
        lines.append("PII replaced: " + ", ".join(f"{k} {v:,}" for k, v in report["pii_replaced"].items()))
    return "\n".join(lines)
