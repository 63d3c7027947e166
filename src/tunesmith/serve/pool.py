"""The models a server answers for: one base model and named adapters, loaded on first use.

Plain-LoRA adapters become slots of the base model's engine (`multilora.py`), so one batch mixes
them. Any other adapter (DoRA, IA3, prefix, sparse, ...) or a full-tuning folder is its own model in
memory: merged where the method merges, with the method attached where it does not (prefix tuning).
Both kinds share one LRU of `max_adapters`; an adapter a running sequence uses is never evicted
(the pool then holds more than its size until that sequence ends).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from tunesmith.export.peft_format import adapter_folder
from tunesmith.export.tuned import read_method
from tunesmith.infer.generate import InferError, load_for_inference, stop_ids

from .engine import Engine, Route
from .multilora import install, lora_factors, uninstall


class ServeError(InferError):
    """Bad server settings or adapter list; the message says which."""


def parse_adapters(items: list[str]) -> dict[str, str]:
    """`name=path` pairs from the command line, checked for shape and duplicate names."""
    adapters: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ServeError(f"--adapter: expected name=path, got {item!r}")
        if name in adapters:
            raise ServeError(f"--adapter: the name `{name}` is given twice")
        adapters[name] = path
    return adapters


def _full_model_folder(path: str) -> Path | None:
    """The transformers folder of a full-tuning run (`<run>/model/`) or of a plain model, else None."""
    for folder in (Path(path) / "model", Path(path)):
        if (folder / "config.json").is_file():
            return folder
    return None


def check_adapter(name: str, path: str) -> None:
    """Fail at start, not on the first request, for a folder that is no adapter or model."""
    if not Path(path).expanduser().exists():
        raise ServeError(f"--adapter {name}={path}: no such file or folder")
    if _full_model_folder(path) is None:
        try:
            read_method(adapter_folder(path))
        except ValueError as e:
            raise ServeError(f"--adapter {name}={path}: {e}") from None


class ModelPool:
    """The base model's engine, the adapter table, and the adapters in memory (an LRU)."""

    def __init__(self, base: str, adapters: dict[str, str], dtype: str = "fp32", max_adapters: int = 4):
        if max_adapters < 1:
            raise ServeError(f"--max-adapters must be >= 1, got {max_adapters}")
        if base in adapters:
            raise ServeError(f"--adapter: the name `{base}` is the base model's own name")
        for name, path in adapters.items():
            check_adapter(name, path)
        self.base_name, self.adapters, self.dtype, self.max_adapters = base, dict(adapters), dtype, max_adapters
        model, self.tokenizer = load_for_inference(base, dtype=dtype)
        # a fast tokenizer is not safe to call from two threads at once ("Already borrowed")
        self.tokenizer_lock = threading.Lock()
        self.route = Route()
        self.base = self._engine(model, self.route)
        self.loaded: OrderedDict[str, Engine | None] = OrderedDict()  # None: a LoRA slot of the base engine
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None

    def _engine(self, model, route=None) -> Engine:
        stops = stop_ids(model, self.tokenizer)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else stops[0]
        try:
            engine = Engine(model, pad, route)
        except ValueError as e:
            raise ServeError(str(e)) from None
        engine.stops = frozenset(stops)
        return engine

    @property
    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def engines(self) -> list[Engine]:
        return [self.base] + [e for e in self.loaded.values() if e is not None]

    def resolve(self, name: str, in_use: set[str]) -> tuple[Engine, str | None]:
        """(engine, LoRA slot or None) for a served model name, loading the adapter if needed (called
        by the scheduler thread, which owns the models). `in_use`: adapters that must stay loaded."""
        if name == self.base_name:
            return self.base, None
        if name not in self.adapters:
            raise KeyError(name)
        if name not in self.loaded:
            self._evict(in_use)
            self.loaded[name] = self._load(name, self.adapters[name])
        self.loaded.move_to_end(name)
        engine = self.loaded[name]
        return (self.base, name) if engine is None else (engine, None)

    def _load(self, name: str, path: str) -> Engine | None:
        full = _full_model_folder(path)
        if full is not None:
            model, _ = load_for_inference(str(full), dtype=self.dtype)
            return self._engine(model)
        lora = lora_factors(path, self.base.model)
        if lora is not None:
            install(self.base.model, self.route, name, *lora)
            return None
        model, _ = load_for_inference(self.base_name, adapter=path, dtype=self.dtype, merge=True)
        return self._engine(model)

    def _evict(self, in_use: set[str]) -> None:
        for old in list(self.loaded):
            if len(self.loaded) < self.max_adapters:
                return
            if old in in_use:
                continue
            engine = self.loaded.pop(old)
            if engine is None:
                uninstall(self.base.model, old)
