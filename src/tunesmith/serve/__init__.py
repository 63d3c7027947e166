"""`tunesmith serve`: an OpenAI-compatible HTTP server for a base model and its adapters.

    tunesmith serve --model smollm2-135m-instruct --adapter sql=runs/sql --adapter chat=runs/chat

One scheduler thread owns the models and runs continuous batching (`scheduler.py`, `engine.py`);
LoRA adapters share the base model's weights and mix within a batch (`multilora.py`); other adapters
are their own merged models (`pool.py`); the routes, limits and API key are in `app.py`.
"""
from __future__ import annotations

from .app import Limits, build_app, serve
from .pool import ModelPool, ServeError, parse_adapters
from .scheduler import Scheduler

__all__ = ["Limits", "ModelPool", "Scheduler", "ServeError", "build_app", "parse_adapters", "serve"]
