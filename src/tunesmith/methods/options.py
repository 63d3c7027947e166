"""The recipe's `method` section, derived from the registry: `name` picks a method and its block
(`method.<name>`, the method's own `Options`) holds its options; only the chosen block is held.
Adapter folders name their method the same way (`method_from_dict`).
"""
from __future__ import annotations

from ..config import OneOf, RecipeError, one_of
from . import REGISTRY, method_class


def _method_section() -> type[OneOf]:
    names = ("lora", *(n for n in REGISTRY if n != "lora"))  # the default first
    classes = {n: method_class(n) for n in names}
    return one_of(
        "MethodConfig", "The tuning method: `name` picks one, its block (`method.<name>`) holds its options.",
        names, blocks={n: c.Options for n, c in classes.items()}, uses={n: n for n in names},
        name_doc="Tuning method; its block below sets its options (`tunesmith methods` lists them with their sizes).",
        block_docs={n: f"Options of `{n}` ({c.paper}): {c.when}." for n, c in classes.items()}, module=__name__)


MethodConfig = _method_section()


def method_from_dict(name: str, options: dict, where: str = "method") -> MethodConfig:
    """A MethodConfig for method `name` with its options block (e.g. read from a saved adapter)."""
    values = {"name": name, name: options} if isinstance(name, str) and name in MethodConfig.uses else {"name": name}
    try:
        return MethodConfig.build(values, prefix=("method",))
    except RecipeError as e:
        if where == "method":
            raise
        raise RecipeError(f"{where}: {e}", e.loc) from None
