"""What each method is, where it comes from and when to pick it, read from the method classes in
`methods.REGISTRY`: each declares its `paper`, `when` (what to pick it for), `tiny` (options small
enough for a tiny test model) and named `variants`. `tunesmith methods MODEL` prints the catalog with
the trainable-parameter count each entry has on that model; the invariant tests run every entry."""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch


class Variant(NamedTuple):
    """A named setting of a method's options: listed by `tunesmith methods`, tested like the method."""

    options: dict
    paper: str
    when: str


class Entry(NamedTuple):
    label: str  # the method's name, or its variant's
    method: str
    options: dict  # over the method's defaults
    paper: str
    when: str


def catalog(tiny: bool = False) -> list[Entry]:
    """Every registered method with its defaults, each followed by its named variants. With `tiny`,
    every entry starts from its class's `tiny` options (small sizes for a tiny model)."""
    from . import REGISTRY, method_class

    entries = []
    for name in REGISTRY:
        cls = method_class(name)
        base = dict(getattr(cls, "tiny", {})) if tiny else {}
        entries.append(Entry(name, name, base, cls.paper, cls.when))
        entries += [Entry(label, name, {**base, **v.options}, v.paper, v.when)
                    for label, v in getattr(cls, "variants", {}).items()]
    return entries


def method_table(model) -> list[dict]:
    """For every catalog entry: trainable parameters on `model` (a copy per method; `model` is untouched)."""
    from . import attach, count_parameters, method_class

    rows = []
    total = count_parameters(model)[1]
    for entry in catalog():
        cls = method_class(entry.method)
        options = cls.Options(**entry.options)
        tuned = copy.deepcopy(model)
        method = cls(options)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            attach(tuned, method)
        trainable, _ = count_parameters(tuned)
        recipe = f"method.name={entry.method}" + "".join(
            f" method.{entry.method}.{k}={_fmt(getattr(options, k))}" for k in entry.options)
        rows.append({"method": entry.label, "recipe": recipe, "trainable": trainable, "total": total,
                     "percent": 100.0 * trainable / max(total, 1), "merges": method.mergeable,
                     "saves": method.output, "paper": entry.paper, "when": entry.when})
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
    width = max(10, *(len(r["method"]) for r in rows))
    lines = [f"{'method':{width}s} {'trainable':>13s} {'%':>8s}  {'merges':6s}  recipe"]
    lines += [f"{r['method']:{width}s} {r['trainable']:>13,} {r['percent']:>8.3f}  {'yes' if r['merges'] else 'no':6s}  "
              f"{r['recipe']}" for r in rows]
    return "\n".join(lines)
