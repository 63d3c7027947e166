"""`--domain NAME` for generation and evaluation: every token runs through that domain's expert.

A model trained with domain routing (method `moe` or `moe_lora` with enforced routing, on data whose
records carry a `domain` or on a mix of sources) saves the data's domain names beside its adapter
(`tunesmith_domains.json`, sorted: the k-th name is expert k). At inference the names are read
back and the whole generation runs under `models.moe.routing(model, k)`: prompt and generated
tokens alike, as in training, where every token of a record took its record's expert.

    with domain_route(model, "sql", adapter="runs/moe"):
        generate_file(model, tok, ...)
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from ..export.peft_format import adapter_folder
from ..models.embedding import DOMAINS_FILE
from ..models.moe import moe_modules, routing
from .generate import InferError


class DomainError(InferError):
    """`--domain` that cannot apply: no domains saved with the model, or a name it does not know."""


def domain_names(adapter=None, model=None) -> tuple[list[str], Path | None]:
    """(the domain names, the file they came from) saved with an adapter (its folder or its run folder)
    or a model folder; ([], None) when there are none."""
    places: list[Path] = []
    if adapter is not None:
        places += [adapter_folder(adapter), Path(adapter), Path(adapter).parent]
    if model is not None and Path(model).is_dir():
        places += [Path(model), Path(model).parent]
    for place in places:
        path = place / DOMAINS_FILE
        if path.is_file():
            try:
                names = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise DomainError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
            if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
                raise DomainError(f"{path}: expected a JSON list of domain names")
            return names, path
    return [], None


def domain_index(name: str, adapter=None, model=None) -> int:
    """The expert number of domain `name` (its place in the saved sorted names)."""
    names, path = domain_names(adapter, model)
    if not names:
        raise DomainError(f"--domain {name}: this model was not trained with domains (no {DOMAINS_FILE} beside "
                          f"{adapter or model}); train on records with a `domain` field or a mix of sources")
    if name not in names:
        raise DomainError(f"--domain {name}: unknown domain; {path} lists {', '.join(names)}")
    return names.index(name)


@contextlib.contextmanager
def domain_route(model, name: str | None, adapter=None, model_path=None, default: str | None = None):
    """Run the forwards inside this block through domain `name`'s expert. Without `name`, a model with
    one expert per domain (no router) uses the domain called `default` if it has one (`eval --task
    sql`: the sql expert), else expert 0; either is said on stderr. A learned router is left alone."""
    if name is None:
        names, _ = domain_names(adapter, model_path)
        enforced = names and any(m.router is None for m in moe_modules(model))
        if enforced and default in names:
            print(f"[tunesmith] every token runs the `{default}` expert (the task's domain; --domain picks another)",
                  file=sys.stderr)
            name = default
        else:
            if enforced:
                print(f"[tunesmith] note: this model has one expert per domain ({', '.join(names)}); without "
                      f"--domain every token runs expert 0 ({names[0]})", file=sys.stderr)
            yield None
            return
    k = domain_index(name, adapter, model_path)
    layers = moe_modules(model)
    if not layers:
        raise DomainError(f"--domain {name}: this model has no MoE layers to route (train it with method moe or "
                          "moe_lora and routing by domain)")
    if k >= min(m.n_experts for m in layers):
        raise DomainError(f"--domain {name}: domain {k} has no expert; the MoE layers have "
                          f"{min(m.n_experts for m in layers)}")
    with routing(model, k):
        yield k
