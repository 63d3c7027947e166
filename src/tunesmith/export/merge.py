"""`tunesmith merge RECIPE`: several fine-tunes of one base into one model or one LoRA adapter.

    merge:
      method: ties            # linear | task_arithmetic | ties | dare_linear | dare_ties | magnitude_prune | slerp
      base: smollm2-135m-instruct   # optional: the adapters' recorded base
      models:
        - {path: runs/sql/adapter, weight: 1.0}
        - {path: runs/json/adapter, weight: 1.0}
      density: 0.5            # ties / dare / magnitude_prune: share of each task vector kept
      lambda: 1.0             # θ = θ_base + λ·τ_merged
      t: 0.5                  # slerp: 0 = the first model, 1 = the second
      seed: 0                 # DARE's drop masks
      space: auto             # auto | adapter | delta
      rank: null              # write a LoRA of this rank from the merged ΔW (truncated SVD)
      output: merged/

Inputs are LoRA / rsLoRA adapter folders (ours or PEFT's; a run folder's `adapter/`), any other
mergeable tunesmith adapter (its task vector is the merged model minus the base), and full model
folders (a full-tuning run's `model/`; task vector = model − base). Every task vector must be of one
base: adapters that record different bases, and tensors whose shapes differ from the base's, are
refused in one line.

Where the merge happens (`space`), for LoRA inputs with ΔW_i = s_i·B_i·A_i:
- linear, task_arithmetic and slerp combine the ΔW_i linearly, Σ c_i·ΔW_i, which one LoRA holds
  exactly: A = [c_1·s_1·A_1; c_2·s_2·A_2; ...], B = [B_1, B_2, ...] (rank Σ r_i, scale 1; PEFT's
  `cat`). SLERP's c_i come from the angle between ΔW_1 and ΔW_2, module by module. `auto` does this.
- ties, dare and magnitude_prune are not linear in ΔW: `auto` / `delta` merge the dense ΔW_i and
  write a full model (exact), or with `rank` a LoRA of that rank by truncated SVD, B = U_r·S_r,
  A = V_rᵀ (PEFT's `ties_svd`, `dare_linear_svd`, ...). `space: adapter` instead merges the A's and
  the B's separately with weights ±sqrt(|w_i·s_i|) (PEFT's `ties`, `dare_linear`, ...: a rank-r
  adapter, but B_m·A_m is not the merge of the ΔW_i; cross terms B_i·A_j enter).
Full models and non-LoRA adapters (DoRA, IA3, sparse, ...: the folded model minus the base) are
merged tensor by tensor on their task vectors (`delta`) and written as a full model. SLERP, too,
interpolates task vectors, not weights as mergekit does: for two LoRA specialists of the embedded
model (sql, json; rank 16) every adapted weight pair W+ΔW_1, W+ΔW_2 has cosine > 0.9995 (SLERP on
weights would be linear everywhere), while the ΔW pairs are near orthogonal (median cosine 0.03). A LoRA output loads wherever our adapters do (eval, generate, serve,
`export --format gguf-lora`); a full model is a plain transformers folder. DARE's masks are drawn
from one generator seeded with `seed`, tensor by tensor in the model's order (A's before B's in
adapter space), input after input: the order PEFT's `add_weighted_adapter` draws them in.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tunesmith.methods import attach, build_method
from tunesmith.methods.lora import lora_modules
from tunesmith.methods.options import method_from_dict
from tunesmith.models import merging
from tunesmith.models.load import DTYPES, load_model, resolve

from .atomic import ExportError, atomic_folder
from .tuned import save_tuned
from .merge_inputs import MergeSpec, read_merge_recipe, Source, classify, pick_base, load_sources

__all__ = ["MERGE_FILE", "MergeResult", "MergeSpec", "read_merge_recipe", "run_merge"]

MERGE_FILE = "tunesmith_merge.json"  # what was merged with what, beside the output


def plan(spec: MergeSpec, sources: list[Source], base: nn.Module) -> str:
    """How to merge: "cat" (exact LoRA, adapter space), "factors" (PEFT's A/B merge), "svd" (LoRA of
    `rank` from the merged ΔW) or "model" (full model from the merged task vectors)."""
    lora_only = all(s.kind == "lora" for s in sources)
    if not lora_only and (spec.space == "adapter" or spec.rank is not None):
        field_ = "space" if spec.space == "adapter" else "rank"
        other = next(s for s in sources if s.kind != "lora")
        raise ExportError(f"merge.{field_}: a LoRA output needs LoRA inputs; {other.label} is a {other.what} "
                          "(leave space: auto and rank unset for a full model)")
    if spec.rank is not None:
        return "svd"
    if not lora_only or spec.space == "delta":
        return "model"
    if spec.method in ("linear", "task_arithmetic", "slerp"):
        too_big = _cat_rank_too_big(sources, base)
        if too_big is None:
            return "cat"
        if spec.space == "adapter":
            raise ExportError(f"merge.space: the concatenated rank {too_big[1]} exceeds min(in, out) = {too_big[2]} "
                              f"of `{too_big[0]}`, so no single LoRA holds the result; use space: delta")
        return "model"
    if spec.space == "adapter":
        ranks = {a.shape[0] for s in sources for a, _, _ in s.lora.values()}
        if len(ranks) != 1:
            raise ExportError(f"merge.space: merging A's and B's needs one rank, the adapters have {sorted(ranks)}; "
                              "use space: delta")
        return "factors"
    return "model"


def _modules(sources: list[Source], base: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The LoRA-adapted modules of any input, in the base model's order (the order DARE draws in)."""
    adapted = set().union(*(s.lora for s in sources))
    return [(n, m) for n, m in base.named_modules() if n in adapted]


def _rank(source: Source) -> int:
    return max(a.shape[0] for a, _, _ in source.lora.values())


def _cat_rank_too_big(sources: list[Source], base: nn.Module) -> tuple[str, int, int] | None:
    """(module, Σ r_i, min(in, out)) of the first module the concatenated LoRA cannot fit, else None."""
    total = sum(_rank(s) for s in sources)
    for name, mod in _modules(sources, base):
        if total > min(mod.in_features, mod.out_features):
            return name, total, min(mod.in_features, mod.out_features)
    return None


def _coefficients(spec: MergeSpec, sources: list[Source], name: str, mod: nn.Linear) -> list[float]:
    """c_i with ΔW_merged = Σ c_i·ΔW_i for the linear methods (λ included)."""
    weights = [s.weight for s in sources]
    if spec.method == "slerp":
        return list(merging.slerp_coefficients(sources[0].dense(name, mod), sources[1].dense(name, mod), spec.t))
    if spec.method == "linear":
        total = sum(weights)
        return [spec.lambda_ * w / total for w in weights]
    return [spec.lambda_ * w for w in weights]


def merge_cat(spec: MergeSpec, sources: list[Source], base: nn.Module, progress: bool) -> dict:
    """Exact: A = [c_i·s_i·A_i; ...], B = [B_i, ...] (zero blocks where an input lacks the module)."""
    from tqdm.auto import tqdm

    out = {}
    for name, mod in tqdm(_modules(sources, base), desc="merge", unit="module", disable=not progress, leave=False):
        coeffs = _coefficients(spec, sources, name, mod)
        a_parts, b_parts = [], []
        for s, c in zip(sources, coeffs):
            if name in s.lora:
                a, b, scale = s.lora[name]
                a_parts.append(c * scale * a)
                b_parts.append(b)
            else:
                a_parts.append(torch.zeros(_rank(s), mod.in_features))
                b_parts.append(torch.zeros(mod.out_features, _rank(s)))
        out[name] = (torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1))
    return out


def merge_factors(spec: MergeSpec, sources: list[Source], base: nn.Module, progress: bool) -> dict:
    """PEFT's adapter-space merge: the A's and the B's each merged by the method, with weights
    ±sqrt(|w_i·s_i|) on A and sqrt(|w_i·s_i|) on B (so a plain sum would give Σ w_i·s_i·B_i·A_i on the
    diagonal); λ goes on A."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(spec.seed)
    rank = _rank(sources[0])
    ws = [s.weight * next(iter(s.lora.values()))[2] for s in sources]
    w_a = [math.copysign(math.sqrt(abs(w)), w) for w in ws]
    w_b = [math.sqrt(abs(w)) for w in ws]
    out = {}
    for name, mod in tqdm(_modules(sources, base), desc="merge", unit="module", disable=not progress, leave=False):
        a_list = [s.lora[name][0] if name in s.lora else torch.zeros(rank, mod.in_features) for s in sources]
        b_list = [s.lora[name][1] if name in s.lora else torch.zeros(mod.out_features, rank) for s in sources]
        a = merging.combine(spec.method, a_list, w_a, density=spec.density, generator=gen)
        b = merging.combine(spec.method, b_list, w_b, density=spec.density, generator=gen)
        out[name] = (spec.lambda_ * a, b)
    return out


def _merged_delta(spec: MergeSpec, tensors: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """λ·τ_merged of one tensor (SLERP: the interpolated task vector; its λ is 1)."""
    merged = merging.combine(spec.method, tensors, [m.weight for m in spec.models], density=spec.density,
                             t=spec.t, generator=gen)
    return spec.lambda_ * merged


def merge_svd(spec: MergeSpec, sources: list[Source], base: nn.Module, progress: bool) -> dict:
    """Merge the dense ΔW_i module by module, then keep the top `rank` singular triplets: B = U_r·S_r, A = V_rᵀ."""
    from tqdm.auto import tqdm

    gen, r = torch.Generator().manual_seed(spec.seed), spec.rank
    out = {}
    for name, mod in tqdm(_modules(sources, base), desc="merge", unit="module", disable=not progress, leave=False):
        if r > min(mod.in_features, mod.out_features):
            raise ExportError(f"merge.rank: {r} exceeds min(in, out) = {min(mod.in_features, mod.out_features)} "
                              f"of `{name}`")
        delta = _merged_delta(spec, [s.dense(name, mod) for s in sources], gen)
        u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
        out[name] = (vh[:r].contiguous(), (u[:, :r] * sv[:r]).contiguous())
    return out


def merge_model(spec: MergeSpec, sources: list[Source], base: nn.Module, progress: bool) -> int:
    """θ_base += λ·τ_merged for every parameter some input changes (in place); return how many."""
    from tqdm.auto import tqdm

    lora_names = {f"{m}.weight" for s in sources for m in s.lora}
    changed = lora_names.union(*(s.delta for s in sources))
    gen = torch.Generator().manual_seed(spec.seed)
    params = [(n, p) for n, p in base.named_parameters() if n in changed]
    for name, p in tqdm(params, desc="merge", unit="tensor", disable=not progress, leave=False):
        tensors = []
        for s in sources:
            if s.kind == "lora":
                module = name.removesuffix(".weight")
                tensors.append(s.dense(module, base.get_submodule(module)) if module in s.lora
                               else torch.zeros(p.shape))
            else:
                tensors.append(s.delta.get(name, torch.zeros(p.shape)))
        with torch.no_grad():
            p.add_(_merged_delta(spec, tensors, gen).to(p.dtype))
    return len(params)


# ---- writing


def _record(spec: MergeSpec, sources: list[Source], base_name: str, how: str) -> dict:
    return {"method": spec.method, "base": base_name, "how": how,
            "models": [{"path": str(s.path), "weight": s.weight, "kind": s.what} for s in sources],
            "density": spec.density, "lambda": spec.lambda_, "t": spec.t, "seed": spec.seed, "rank": spec.rank}


def write_lora(base: nn.Module, base_name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
               out_dir, record: dict) -> Path:
    """Attach a LoRA of the factors' rank (alpha = rank: scale 1, the factors hold every scale) to
    `base` and save it as our adapter folder plus PEFT's files."""
    ranks = {a.shape[0] for a, _ in factors.values()}
    if len(ranks) != 1:
        raise ExportError(f"merged factors have ranks {sorted(ranks)}; a LoRA folder holds one rank")
    rank = ranks.pop()
    cfg = method_from_dict("lora", {"rank": rank, "alpha": float(rank), "targets": list(factors)}, where="merge")
    method = build_method(cfg)
    with torch.random.fork_rng(devices=[]):  # LoRA's random A is overwritten at once
        attach(base, method)
    wrapped = lora_modules(base)
    if set(wrapped) != set(factors):
        odd = sorted(set(wrapped) ^ set(factors))[:3]
        raise ExportError(f"could not wrap exactly the merged modules (differing: {odd})")
    with torch.no_grad():
        for name, (a, b) in factors.items():
            wrapped[name].lora_a.copy_(a)
            wrapped[name].lora_b.copy_(b)
    out = save_tuned(base, method, base_name, out_dir)
    (out / MERGE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out


def write_model(base: nn.Module, base_name: str, out_dir, dtype: str, record: dict) -> Path:
    """The merged model as a plain transformers folder (atomically), with the base's tokenizer as shipped."""
    from transformers import AutoTokenizer

    base.to(DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(str(resolve(base_name)))
    with atomic_folder(out_dir, marker="config.json") as tmp:
        base.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if base.generation_config is not None and not (tmp / "generation_config.json").is_file():
            base.generation_config.save_pretrained(tmp)
        (tmp / MERGE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return Path(out_dir)


# ---- the whole merge


@dataclass
class MergeResult:
    output: Path
    kind: str  # "lora" or "model"
    summary: str  # what was merged with what, how, into what


_HOW = {"cat": "exact, in adapter space (factors concatenated)",
        "factors": "in adapter space (A's and B's merged apart, as PEFT)",
        "svd": "truncated SVD of the merged ΔW",
        "model": "on the task vectors"}


def _summary(spec: MergeSpec, sources: list[Source], base_name: str, how: str, into: str, out: Path) -> str:
    """`ties (density 0.5, λ 1) of A (lora r8, w 1) + B (...) on BASE, how -> what at OUT`."""
    option = {"slerp": "t", **{m: "density" for m in merging.SPARSE}}.get(spec.method)
    extra = f"{option} {getattr(spec, option):g}, " if option else ""
    inputs = " + ".join(f"{s.path} ({s.what}, w {s.weight:g})" for s in sources)
    return f"{spec.method} ({extra}λ {spec.lambda_:g}) of {inputs} on {base_name}, {_HOW[how]} -> {into} at {out}"


def run_merge(spec: MergeSpec, progress: bool = True) -> MergeResult:
    """Read the inputs, check they share the base, merge as `plan` decides and write `spec.output`."""
    sources = classify(spec)
    base_name = pick_base(spec, sources)
    base, _ = load_model(base_name, "fp32")
    base.requires_grad_(False)
    load_sources(sources, base)
    how = plan(spec, sources, base)
    record = _record(spec, sources, base_name, how)
    if how == "model":
        n = merge_model(spec, sources, base, progress)
        out, kind = write_model(base, base_name, spec.output, spec.dtype, record), "model"
        into = f"a full model ({n} tensors merged)"
    else:
        factors = {"cat": merge_cat, "factors": merge_factors, "svd": merge_svd}[how](spec, sources, base, progress)
        out, kind = write_lora(base, base_name, factors, spec.output, record), "lora"
        into = f"a LoRA adapter of rank {next(iter(factors.values()))[0].shape[0]} on {len(factors)} modules"
    return MergeResult(out, kind, _summary(spec, sources, base_name, how, into, out))
