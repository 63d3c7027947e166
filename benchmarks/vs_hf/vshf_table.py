"""The tables of benchmarks/vs_hf (results.md) from results.json: medians per row × setup × system,
the baselines' best configurations (the faster precision of hf-best and of TRL, per row), the ratios
tunesmith ÷ each baseline against the issue's goals, tunesmith's MFU, and how long a run would take.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from vshf_rows import ROWS

DESCRIPTION = {
    "hf-default": "Trainer + PEFT defaults: fp32, 8 padded samples/step",
    "hf-best-bf16": "Trainer + PEFT, padding-free (flattened) tunesmith rows, bf16 autocast",
    "hf-best-fp32": "Trainer + PEFT, padding-free (flattened) tunesmith rows, fp32",
    "trl-bf16": "SFTTrainer, packing bfd + padding-free, 1 row of ≤{bt}/step, bf16 autocast",
    "trl-fp32": "SFTTrainer, packing bfd + padding-free, 1 row of ≤{bt}/step, fp32",
    "trl-default": "SFTTrainer as above with TRL's defaults: bf16, gradient checkpointing",
    "tunesmith": "`tunesmith bench` on the recipe, repo's default speed settings, packed rows of ≤{bt}",
}
# (baseline group, its systems, tokens/s goal, memory goal): the issue's goals for tunesmith ÷ baseline.
GROUPS = (("hf-default", ("hf-default",), 2.5, 0.5),
          ("hf-best", ("hf-best-bf16", "hf-best-fp32"), None, None),
          ("trl-best", ("trl-bf16", "trl-fp32"), 2.0, 0.5))
MFU_GOAL = {"chat": 0.55, "short": 0.50}  # of the measured bf16 matmul peak
SETUP_TITLE = {"lora": "LoRA r=16, alpha 32, dropout 0, all linear layers", "full": "full fine-tuning"}
KEYS = ("trained_tokens_per_s", "s_per_step", "peak_rss_gb", "wall_s", "trained_tokens_per_step", "mfu",
        "mfu_bf16", "mfu_best", "achieved_tflops", "peak_tflops")


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def upgrade(results: dict) -> dict:
    """Read a results.json of the earlier harness (one row of prose ≤512, systems hf-best) as this one's."""
    cfg = results["config"]
    if "rows" not in cfg:
        cfg["rows"] = ["prose"]
        for r in results["runs"]:
            r.setdefault("row", "prose")
            if r["system"] == "hf-best":
                r["system"] = "hf-best-bf16"
        cfg["systems"] = ["hf-best-bf16" if s == "hf-best" else s for s in cfg["systems"]]
        results["data"] = {"prose": results["data"]}
    return results


def summarize(results: dict) -> dict:
    """Medians per (row, setup, system) over the successful repeats."""
    cfg, out = results["config"], {}
    for row in cfg["rows"]:
        for setup in cfg["setups"]:
            for system in cfg["systems"]:
                rows = [r for r in results["runs"]
                        if r.get("row") == row and r["setup"] == setup and r["system"] == system]
                ok = [r for r in rows if r.get("rc") == 0 and "trained_tokens_per_s" in r]
                out[(row, setup, system)] = {
                    "runs": len(rows), "ok": len(ok), **{k: median(ok, k) for k in KEYS},
                    "allocator": "/".join(sorted({r["allocator"] for r in ok})) if ok else "—",
                    "precision": ok[0].get("precision") if ok else None,
                    "best_peak": ok[0].get("best_peak") if ok else None,
                    "trainable": ok[0]["trainable"] if ok else None,
                    "timed_out_s": max((r["wall_s"] for r in rows if r.get("timed_out")), default=None)}
    return out


def best_of(s: dict, row: str, setup: str, systems) -> tuple[str | None, dict | None]:
    """The faster (median trained tokens/s) of a baseline's configurations on this row."""
    done = [(x, s[(row, setup, x)]) for x in systems if (row, setup, x) in s and s[(row, setup, x)]["ok"]]
    if not done:
        return None, None
    return max(done, key=lambda kv: kv[1]["trained_tokens_per_s"])


def fmt(x, spec: str, missing: str = "—") -> str:
    return missing if x is None else format(x, spec)


def ratio(a, b) -> float | None:
    return None if a is None or not b else a / b


def goal_cell(value: float | None, goal: float | None, higher: bool) -> str:
    if value is None:
        return "—"
    if goal is None:
        return f"{value:.2f}×"
    met = value >= goal if higher else value <= goal
    return f"{value:.2f}× ({'meets' if met else 'misses'} {'≥' if higher else '≤'} {goal}×)"


def ratio_lines(s: dict, row: str, setup: str) -> list[str]:
    t = s.get((row, setup, "tunesmith"))
    if not t or not t["ok"]:
        return []
    lines = ["", "| tunesmith ÷ | configuration | trained tokens/s | peak RSS |", "|---|---|---:|---:|"]
    for group, systems, speed_goal, mem_goal in GROUPS:
        name, o = best_of(s, row, setup, systems)
        if o is None:
            continue
        lines.append(f"| {group} | {name} | "
                     f"{goal_cell(ratio(t['trained_tokens_per_s'], o['trained_tokens_per_s']), speed_goal, True)} | "
                     f"{goal_cell(ratio(t['peak_rss_gb'], o['peak_rss_gb']), mem_goal, False)} |")
    if t.get("mfu") is not None:
        lines += ["", mfu_line(t, MFU_GOAL.get(row))]
    return lines


def mfu_line(t: dict, goal: float | None) -> str:
    """tunesmith's MFU over the peak of the precision it ran (its own figure), the bf16 peak and the
    machine's best peak; the goal is judged on the best peak (on bf16 hardware that is the bf16 one)."""
    text = (f"tunesmith MFU: {t['mfu']:.1%} of the measured {t['precision']} matmul peak "
            f"({fmt(t['peak_tflops'], '.4g')} TFLOP/s; achieved {fmt(t['achieved_tflops'], '.4g')})")
    if t.get("mfu_bf16") is not None:
        text += f"; {t['mfu_bf16']:.1%} of the measured bf16 peak"
    if t.get("mfu_best") is not None:
        verdict = "" if goal is None else f" — goal ≥ {goal:.0%}: {'meets' if t['mfu_best'] >= goal else 'misses'}"
        text += f"; {t['mfu_best']:.1%} of the machine's best measured peak ({t['best_peak']}){verdict}"
    return text + "."


def header(results: dict) -> list[str]:
    cfg, m = results["config"], results["machine"]
    v = m["versions"]
    peaks = results.get("peaks") or {}
    lines = [f"# tunesmith vs HF Trainer + PEFT and TRL SFTTrainer: {cfg['steps']} timed steps after "
             f"{cfg['warmup']} warm-up, median of {cfg['repeats']}", "",
             f"Command: `{results['command']}`", "",
             f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['physical_cores']} physical cores), "
             f"avx512_bf16 {'yes' if m['avx512_bf16'] else 'no'}, AMX {'yes' if m['amx_bf16'] else 'no'}; "
             f"{m['threads']} torch threads for every run. "
             + ", ".join(f"{k} {x}" for k, x in v.items() if x) + f", python {m['python']}. "
             f"jemalloc: {m['jemalloc'] or 'not installed (every run on glibc malloc)'}."]
    if peaks:
        lines += ["", "Measured matmul peaks (`tunesmith bench`'s `matmul_peak`, measured at the start unless `--cached-peaks`): "
                  + ", ".join(f"{k} {x:.4g} TFLOP/s" for k, x in peaks.items() if x) + "."]
    if cfg.get("tunesmith_overrides"):
        lines += ["", f"tunesmith overrides: `{' '.join(cfg['tunesmith_overrides'])}`"]
    lines += ["", "trained tokens/s and s/step: over the timed steps (trained = label positions the loss uses; "
              "padding and masked prompts excluded, on every side). peak RSS: the run's process, from `wait4` "
              "(model load included). wall: the whole process. MFU: tunesmith's own (`tunesmith bench`)."]
    return lines


def row_lines(results: dict, s: dict, row: str, setup: str) -> list[str]:
    cfg, d = results["config"], results["data"][row]
    lines = ["", f"## {ROWS[row]['title']} — {SETUP_TITLE[setup]}", "",
             f"{d['samples']} samples (mean {d['mean_sample_tokens']:.0f} tokens, "
             f"{d.get('mean_trained_tokens', d['mean_sample_tokens']):.0f} trained; ≤{d.get('max_length', cfg.get('max_length'))}), "
             f"{d['packed_rows']} packed rows of ≤{cfg['batch_tokens']} tokens.", "",
             "| system | how | trained tokens/s | s/step | trained tokens/step | peak RSS GB | wall s | MFU | runs |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for system in cfg["systems"]:
        r = s[(row, setup, system)]
        how = DESCRIPTION.get(system, system).format(bt=cfg["batch_tokens"])
        how += "" if system != "tunesmith" or not r["precision"] else f" ({r['precision']})"
        speed = fmt(r['trained_tokens_per_s'], ',.0f',
                    "—" if r["timed_out_s"] is None else f"timed out (run > {r['timed_out_s']:.0f} s)")
        lines.append(f"| {system} | {how}; allocator {r['allocator']} | {speed} | "
                     f"{fmt(r['s_per_step'], '.2f')} | {fmt(r['trained_tokens_per_step'], ',.0f')} | "
                     f"{fmt(r['peak_rss_gb'], '.2f')} | {fmt(r['wall_s'], '.0f')} | "
                     f"{fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | {r['ok']}/{r['runs']} |")
    return lines + ratio_lines(s, row, setup)


def write_markdown(results: dict, path: Path) -> str:
    results = upgrade(results)
    cfg = results["config"]
    s = summarize(results)
    lines = header(results)
    for row in cfg["rows"]:
        for setup in cfg["setups"]:
            lines += row_lines(results, s, row, setup)
    failed = [r for r in results["runs"] if r.get("rc") != 0]
    if failed:
        lines += ["", "Failed runs: " + ", ".join(f"{r.get('row')}/{r['setup']}/{r['system']} r{r['repeat']} "
                                                  f"({'timed out' if r.get('timed_out') else 'rc ' + str(r['rc'])})" for r in failed)]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def estimate_minutes(results: dict, steps: int, warmup: int, repeats: int) -> float:
    """Minutes a run of every row × setup × system measured here would take with these steps: each
    run's wall time plus (or minus) its median step time for every step more (or fewer)."""
    cfg = results["config"]
    done = cfg["warmup"] + cfg["steps"]
    total = 0.0
    for r in results["runs"]:
        if r.get("rc") == 0 and r.get("s_per_step") is not None:
            total += r["wall_s"] + (warmup + steps - done) * r["s_per_step"]
    return total * repeats / cfg["repeats"] / 60
