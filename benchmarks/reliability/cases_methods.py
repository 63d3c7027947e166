"""Reliability cases, group "methods": each method does what its paper says, end to end through the
real command line on a tiny model (`tunesmith train`), read back from what the run wrote (the printed
resolved recipe, the saved model, the checkpoint's optimizer state).

- HFT: a second stage (SFT, then SimPO on the SFT model) trains another half than the first; the same
  stage started again draws the same half; a per-epoch redraw leaves optimizer state only for the
  drawn half.
- SimPO: an unset β is SimPO's own (2.0), DPO's stays 0.1.
- SpIEL: `ma` keeps SM3's row and column accumulators only (O(d_in + d_out) a matrix); `ag` entries
  grown mid-run carry their own age; the values decay toward the base by default.
"""
from __future__ import annotations

import re
from pathlib import Path

import common
from common import ROOT, Case, Outcome, cli, has_traceback, last_line

SFT = str(ROOT / "recipes" / "lora-sft.yaml")
DPO = str(ROOT / "recipes" / "dpo.yaml")
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
def tiny_model() -> Path:
    """A tiny random 4-layer Llama with the embedded model's tokenizer, saved once per process."""
    return common.tiny_model(layers=4)


def train(tmp: Path, name: str, *overrides: str, recipe: str = SFT, model: Path | None = None):
    data = ROOT / "examples" / ("chat.jsonl" if recipe == SFT else "preference.jsonl")
    return cli(["train", recipe, f"model.name={model or tiny_model()}", f"name={name}", f"output_dir={tmp / 'runs'}",
                f"data.train={data}",
                "data.limit=8", "data.val_fraction=0", "train.batch_tokens=512", "train.precision=fp32",
                "model.frozen_dtype=same", "train.warmup=0", "train.eval_every=0", *overrides], cwd=tmp)


def failed(proc) -> Outcome | None:
    """An Outcome for a run that should have succeeded but did not; None when it succeeded."""
    if proc.returncode == 0:
        return None
    out = proc.stdout + proc.stderr
    return Outcome(got=f"rc={proc.returncode}: {last_line(proc.stderr) or last_line(proc.stdout)}"[:160], ok=False,
                   traceback=has_traceback(out))


def changed(before: Path, after: Path) -> set[str]:
    """Projection weights that differ between two saved models."""
    from safetensors.torch import load_file

    a, b = load_file(str(before / "model.safetensors")), load_file(str(after / "model.safetensors"))
    return {n for n in b if n.split(".")[-2] in PROJ and not a[n].equal(b[n])}


def optimizer_state(run: Path, step: int) -> dict:
    import torch

    return torch.load(run / "checkpoints" / f"step-{step}" / "train_state.pt", weights_only=True)["optimizer"]


# --------------------------------------------------------------------------------------------------
# HFT


def hft_stage_two(tmp: Path) -> Outcome:
    hft = ["method.name=hft", "method.hft.seed=3", "train.steps=2"]
    for proc in (train(tmp, "sft", *hft), train(tmp, "sft-again", *hft)):
        if bad := failed(proc):
            return bad
    runs = tmp / "runs"
    one, again = changed(tiny_model(), runs / "sft" / "model"), changed(tiny_model(), runs / "sft-again" / "model")
    proc = train(tmp, "simpo", *hft, "objective.name=simpo", recipe=DPO, model=runs / "sft" / "model")
    if bad := failed(proc):
        return bad
    two = changed(runs / "sft" / "model", runs / "simpo" / "model")
    stages = re.findall(r"stage ([0-9a-f]{16})", proc.stdout)
    ok = bool(one) and one == again and bool(two) and two != one and len(two) == len(one) and len(stages) == 1
    return Outcome(got=f"stage 1 trained {len(one)} matrices (again: {'same' if one == again else 'OTHER'}), "
                       f"stage 2 {len(two)}, {len(one & two)} shared", ok=ok)


def hft_redraw_drops_state(tmp: Path) -> Outcome:
    # 8 records, 512-token micro-batches: a few micro-batches an epoch; 9 steps cross at least two redraws
    proc = train(tmp, "hft-epoch", "method.name=hft", "method.hft.redraw=epoch", "train.steps=9",
                 "train.save_every=9")
    if bad := failed(proc):
        return bad
    from tunesmith.train.metrics import read_metrics

    run = tmp / "runs" / "hft-epoch"
    epochs = sorted({r["epoch"] for r in read_metrics(run / "metrics.jsonl") if "epoch" in r})
    held = len(optimizer_state(run, 9)["state"])
    pool = 4 * len(PROJ)
    drawn = 4 * 2 + 2 * 1 + 2 * 2  # per layer 2 of 4 attention; 1 of 3 FFN in half the layers, 2 in the others
    return Outcome(got=f"after epochs {epochs}: the optimizer holds {held} of {pool} pool matrices (the draw: {drawn})",
                   ok=held == drawn and len(epochs) >= 3)


# --------------------------------------------------------------------------------------------------
# SimPO


def simpo_default_beta(tmp: Path) -> Outcome:
    got = {}
    for loss in ("simpo", "dpo"):
        proc = train(tmp, loss, f"objective.name={loss}", "train.steps=1", recipe=DPO,
                     *(["objective.preference.reference=copy"] if loss == "dpo" else []))
        if bad := failed(proc):
            return bad
        saved = (tmp / "runs" / loss / "recipe.yaml").read_text()
        m = re.search(r"preference:\n\s+beta: ([0-9.]+)", saved)
        printed = re.search(r"preference:\n\s+beta: ([0-9.]+)", proc.stdout)
        got[loss] = (m.group(1) if m else None, printed.group(1) if printed else None)
    ok = got["simpo"] == ("2.0", "2.0") and got["dpo"] == ("0.1", "0.1")
    return Outcome(got=f"resolved β (saved, printed): simpo {got['simpo']}, dpo {got['dpo']}", ok=ok)


# --------------------------------------------------------------------------------------------------
# SpIEL


SPARSE = ["method.name=sparse", "method.sparse.density=0.05", "method.sparse.reselect_every=3",
          "method.sparse.accumulate_steps=1", "train.steps=6", "train.save_every=5"]


def spiel_ma_memory(tmp: Path) -> Outcome:
    proc = train(tmp, "ma", *SPARSE, "method.sparse.criterion=ma")
    if bad := failed(proc):
        return bad
    state = optimizer_state(tmp / "runs" / "ma", 6)["state"]
    keys = {k for s in state.values() for k in s}
    held = sum(t.numel() for s in state.values() for t in s.values())
    # per layer: q, o 64×64; k, v 32×64; gate, up 128×64; down 64×128 → d_out + d_in summed
    rows_cols = 4 * (2 * 128 + 2 * 96 + 2 * 192 + 192)
    values = 4 * sum(round(0.05 * n) for n in (4096, 2048, 2048, 4096, 8192, 8192, 8192))
    ok = keys == {"row", "col"} and held == rows_cols
    return Outcome(got=f"SM3 state {sorted(keys)}: {held:,} floats for {len(state)} matrices "
                       f"(Σ d_in+d_out = {rows_cols:,}; AdamW moments would be {2 * values:,})", ok=ok)


def spiel_ag_ages(tmp: Path) -> Outcome:
    proc = train(tmp, "ag", *SPARSE)
    if bad := failed(proc):
        return bad
    state = optimizer_state(tmp / "runs" / "ag", 5)["state"]
    if not all("age" in s for s in state.values()):
        return Outcome(got=f"no per-entry age in the optimizer state (keys: {sorted({k for s in state.values() for k in s})})",
                       ok=False)
    ages = sorted({float(a) for s in state.values() for a in s["age"].unique()})
    # reselections at steps 1 and 4 (phase: step 3, 4 → 2 steps): at step 5 kept entries are 5 steps old,
    # entries grown at step 4 are 2 + 1
    return Outcome(got=f"per-entry ages at step 5: {ages}", ok=ages == [3.0, 5.0])


def spiel_pull_default(tmp: Path) -> Outcome:
    proc = train(tmp, "pull", *SPARSE)
    if bad := failed(proc):
        return bad
    groups = optimizer_state(tmp / "runs" / "pull", 6)["param_groups"]
    decay = sorted({g["weight_decay"] for g in groups})
    printed = re.search(r"pulled toward the base with weight decay ([0-9.e-]+)", proc.stdout)
    ok = decay == [1.0] and printed is not None and printed.group(1) == "1"
    return Outcome(got=f"values' weight decay {decay} (train.weight_decay 0); log: "
                       f"{printed.group(0) if printed else 'no line'}", ok=ok)


CASES = [
    Case("hft stage 2 draws another half", "methods",
         "SFT then SimPO from the SFT model train different halves; the same stage again the same half",
         hft_stage_two),
    Case("hft redraw drops optimizer state", "methods",
         "after per-epoch redraws the optimizer holds state for the drawn half only", hft_redraw_drops_state),
    Case("simpo default beta from paper", "methods",
         "unset β resolves to SimPO's 2.0 (DPO's 0.1), saved and printed", simpo_default_beta),
    Case("spiel ma optimizer memory O(d_in+d_out)", "methods",
         "ma's optimizer state is SM3's row and column accumulators only", spiel_ma_memory),
    Case("spiel ag grown entries carry their own age", "methods",
         "entries grown mid-run are bias-corrected by their own age", spiel_ag_ages),
    Case("spiel pulls toward base by default", "methods",
         "the sparse values decay toward the pretrained weights without any option set", spiel_pull_default),
]
