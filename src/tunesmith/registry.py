"""Registries map a name to "module:Class" inside a package; the class is imported on first use."""
from __future__ import annotations

import importlib


def load_entry(registry: dict[str, str], package: str, name: str, kind: str, error: type[Exception]):
    """The class registered as `name`; an unknown name is `error` listing the valid ones."""
    if name not in registry:
        raise error(f"unknown {kind} `{name}`; choose one of {', '.join(registry)}")
    module, cls = registry[name].split(":")
    return getattr(importlib.import_module(f"{package}.{module}"), cls)
