"""What each method is, where it comes from and when to pick it; `tunesmith methods MODEL` prints
this with the trainable-parameter count each method has on that model."""
from __future__ import annotations

import copy
import dataclasses

import torch

# (label, method name, options over the defaults, paper, when to pick it)
CATALOG = [
    ("full", "full", {}, "—", "the most capacity; needs memory for weights, gradients and optimizer state of everything"),
    ("freeze", "freeze", {}, "—", "train the top layers (or chosen modules) only: cheap, no adapter to ship"),
    ("hft", "hft", {}, "Hui et al., 2024 (Half Fine-Tuning)",
     "full-tuning quality with less forgetting: a seeded half of each layer's matrices trains"),
    ("lora", "lora", {}, "Hu et al., 2021", "the default: small adapter, merges into the weights"),
    ("rslora", "lora", {"rslora": True}, "Kalajdzievski, 2023", "LoRA at large ranks (scale alpha/sqrt(r))"),
    ("dora", "lora", {"dora": True}, "Liu et al., 2024 (DoRA)",
     "closer to full tuning than LoRA at the same rank; magnitude and direction train apart"),
    ("lora+", "lora", {"plus_ratio": 16.0}, "Hayou et al., 2024 (LoRA+)", "faster LoRA convergence: B learns 16× faster"),
    ("pissa", "lora", {"init": "pissa"}, "Meng et al., 2024 (PiSSA)",
     "LoRA that starts on the principal singular directions: converges faster"),
    ("sparse", "sparse", {}, "Ansell et al., 2024 (SpIEL)",
     "1% of each matrix trains, chosen and re-chosen during training; merges exactly"),
    ("adapter", "adapter", {}, "He et al., 2022 (scaled parallel adapter)",
     "an FFN-side adapter: strong at larger budgets; does not merge"),
    ("houlsby", "adapter", {"form": "sequential", "sublayers": ["attn", "ffn"], "scale": 1.0},
     "Houlsby et al., 2019", "the classic sequential adapter after attention and FFN"),
    ("pfeiffer", "adapter", {"form": "sequential", "sublayers": ["ffn"], "scale": 1.0},
     "Pfeiffer et al., 2021", "a sequential adapter after the FFN only"),
    ("prefix", "prefix", {}, "Li & Liang, 2021", "the smallest budgets: trained keys/values every layer attends to"),
    ("ia3", "ia3", {}, "Liu et al., 2022 (IA3)", "the fewest parameters: learned scales of keys, values and FFN"),
    ("mam", "mam", {}, "He et al., 2022 (MAM adapter)", "prefix on attention + scaled parallel adapter on the FFN"),
    ("longlora", "longlora", {}, "Chen et al., 2024 (LongLoRA)",
     "longer context: LoRA on attention with trainable embeddings and norms"),
]


def method_table(model) -> list[dict]:
    """For every catalog entry: trainable parameters on `model` (a copy per method; `model` is untouched)."""
    from ..recipe import method_from_dict
    from . import attach, build_method, count_parameters

    rows = []
    for label, name, options, paper, when in CATALOG:
        cfg = method_from_dict(name, options)
        block = getattr(cfg, name)
        changed = {k: v for k, v in dataclasses.asdict(block).items()
                   if k in options}
        tuned = copy.deepcopy(model)
        method = build_method(cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            attach(tuned, method)
        trainable, _ = count_parameters(tuned)
        total = count_parameters(model)[1]
        rows.append({"method": label, "recipe": f"method.name={name}" + "".join(
            f" method.{name}.{k}={_fmt(v)}" for k, v in changed.items()),
            "trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1),
            "merges": method.mergeable, "saves": method.output, "paper": paper, "when": when})
        del tuned
    return rows


def _fmt(v) -> str:
    if isinstance(v, list):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v).lower() if isinstance(v, bool) else str(v)


def format_table(rows: list[dict], markdown: bool = False) -> str:
    if markdown:
        lines = ["| method | trainable | % | merges | paper | pick it for | recipe |", "|---|---:|---:|---|---|---|---|"]
        lines += [f"| `{r['method']}` | {r['trainable']:,} | {r['percent']:.3f} | {'yes' if r['merges'] else 'no'} | "
                  f"{r['paper']} | {r['when']} | `{r['recipe']}` |" for r in rows]
        return "\n".join(lines)
    lines = [f"{'method':10s} {'trainable':>13s} {'%':>8s}  {'merges':6s}  recipe"]
    lines += [f"{r['method']:10s} {r['trainable']:>13,} {r['percent']:>8.3f}  {'yes' if r['merges'] else 'no':6s}  "
              f"{r['recipe']}" for r in rows]
    return "\n".join(lines)
