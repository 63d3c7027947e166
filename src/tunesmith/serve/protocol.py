"""OpenAI's request and response shapes, as far as tunesmith serves them.

Requests are checked by pydantic; unknown fields are ignored (clients send their own extras), but
fields that ask for something not served (logprobs, tools, echo, suffix) are refused by name rather
than silently dropped. Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default; 0 decodes greedily
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    logprobs: bool | int | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop is a non-empty string or a list of at most 4 non-empty strings")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"only text content parts are served, got {str(part)[:80]}", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None


def parse(kind: type[_Request], data) -> _Request:
    """The request, or APIError 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = kind.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or None
        raise APIError(400, f"{where}: {err['msg']}" if where else err["msg"], param=where) from None
    for name in ("logprobs", "tools", "echo", "suffix"):
        if getattr(req, name, None):
            raise APIError(400, f"{name} is not supported by tunesmith serve", param=name)
    return req


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk(kind: str, rid: str, created: int, model: str, index: int, text: str | None = None,
          finish: str | None = None, first: bool = False) -> dict:
    """One streamed chunk: a chat delta (the first carries the role) or a completion's text piece."""
    if kind == "chat":
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def response(kind: str, rid: str, model: str, texts: list[str], finishes: list[str], prompt_tokens: int,
             completion_tokens: int) -> dict:
    """The whole (non-streamed) answer."""
    if kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": f}
                   for i, (t, f) in enumerate(zip(texts, finishes))]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                   for i, (t, f) in enumerate(zip(texts, finishes))]
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}
