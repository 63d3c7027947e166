"""The HTTP side: FastAPI routes in OpenAI's shapes, limits, the API key, and the uvicorn server.

Handlers never touch a model: they check the request, tokenize it, hand a `Job` to the scheduler
thread and relay its events, as one JSON answer or as server-sent events (`data: {...}` chunks
ending with `data: [DONE]`). The first event is awaited before answering, so a request whose
adapter cannot load still gets a proper error status rather than a broken stream.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import sys
import time
from dataclasses import dataclass

from tunesmith.infer.generate import _encode
from tunesmith.runtime import set_threads

from .engine import Sequence, now
from .pool import ServeError
from .protocol import APIError, ChatRequest, CompletionRequest, chunk, new_id, parse, response, usage
from .scheduler import Job, Scheduler

try:  # the `serve` extra; route signatures need these names at import time
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError:  # build_app says what to install
    FastAPI = None

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_PROMPTS = 16  # prompts in one /v1/completions request (each with n choices)


@dataclass
class Limits:
    """What one request may ask for, and how many may be in flight (each has a command-line flag)."""

    max_body_bytes: int = 1 << 20  # larger bodies: 413
    max_tokens: int = 1024  # a request asking for more: 400 (not clamped, so the client knows)
    max_queue: int = 64  # requests in flight (decoding or waiting); one more: 429
    request_timeout_s: float = 300.0  # a sequence still decoding then ends with finish_reason "length"

    def check(self) -> None:
        for name in ("max_body_bytes", "max_tokens", "max_queue", "request_timeout_s"):
            if getattr(self, name) <= 0:
                raise ServeError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")


def build_app(pool, scheduler: Scheduler, limits: Limits, api_key: str | None = None):
    """The FastAPI app; its lifespan starts and stops the scheduler thread."""
    if FastAPI is None:
        raise ServeError("tunesmith serve needs fastapi and uvicorn: pip install 'tunesmith[serve]'")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop)  # in-flight sequences finish first

    app = FastAPI(title="tunesmith", lifespan=lifespan)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):  # unknown routes, wrong methods
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid or missing API key (send `Authorization: Bearer <key>`)",
                           code="invalid_api_key")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "tunesmith"}
                                           for n in pool.names]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        return await _complete(request, "chat", pool, scheduler, limits)

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        return await _complete(request, "text", pool, scheduler, limits)

    return app


async def _read_json(request, limit: int):
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body is {length} bytes; the limit is {limit} (--max-body-bytes)",
                       code="request_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise APIError(413, f"the request body is over {limit} bytes (--max-body-bytes)", code="request_too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None


def _prompts(req, kind: str, tokenizer) -> list[list[int]]:
    """Token ids of each prompt: chat messages through the chat template, completions as raw text."""
    if kind == "chat":
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in req.messages]
        try:
            return [_encode(tokenizer, messages, None)]
        except Exception as e:  # InferError, or the chat template refusing the messages (jinja's TemplateError)
            raise APIError(400, f"messages: {e}", param="messages") from None
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not 1 <= len(prompts) <= MAX_PROMPTS:
        raise APIError(400, f"prompt: give a string or a list of 1 to {MAX_PROMPTS} strings", param="prompt")
    return [tokenizer(p)["input_ids"] for p in prompts]


def _max_tokens(req, prompts: list[list[int]], limits: Limits, context: int | None) -> int:
    asked = req.max_completion_tokens if getattr(req, "max_completion_tokens", None) else req.max_tokens
    longest = max(len(p) for p in prompts)
    if not longest:
        raise APIError(400, "the prompt is empty", param="prompt")
    if asked is not None and asked > limits.max_tokens:
        raise APIError(400, f"max_tokens={asked} is over this server's limit of {limits.max_tokens} (--max-tokens)",
                       param="max_tokens")
    room = limits.max_tokens if context is None else min(limits.max_tokens, context - longest)
    if room < 1 or (asked is not None and context is not None and longest + asked > context):
        raise APIError(400, f"the prompt has {longest} tokens and asks for {asked or 1} more, past the model's "
                            f"context of {context} tokens", param="max_tokens" if asked else "messages",
                       code="context_length_exceeded")
    return asked or room


async def _complete(request, kind: str, pool, scheduler: Scheduler, limits: Limits):
    req = parse(ChatRequest if kind == "chat" else CompletionRequest, await _read_json(request, limits.max_body_bytes))
    if req.model not in pool.names:
        raise APIError(404, f"the model `{req.model}` does not exist; served: {', '.join(pool.names)}",
                       param="model", code="model_not_found")
    with pool.tokenizer_lock:
        prompts = _prompts(req, kind, pool.tokenizer)
    max_tokens = _max_tokens(req, prompts, limits, pool.context)
    deadline = now() + limits.request_timeout_s
    seqs = [Sequence(ids, max_tokens, req.temperature, req.top_p, None if req.seed is None else req.seed + i,
                     tuple(req.stop or ()), deadline=deadline)
            for ids in prompts for i in range(req.n)]
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(event):  # called from the scheduler thread
        with contextlib.suppress(RuntimeError):  # the loop closed: the client is gone
            loop.call_soon_threadsafe(events.put_nowait, event)

    job = Job(req.model, seqs, emit)
    if not scheduler.submit(job):
        if scheduler.failed or scheduler.stopping:
            raise APIError(503, scheduler.failed or "the server is shutting down", type="server_error")
        raise APIError(429, f"the server is busy: {limits.max_queue} requests in flight (--max-queue); retry later",
                       type="rate_limit_error", code="rate_limit_exceeded")
    try:
        first = await events.get()
    except asyncio.CancelledError:
        job.cancelled = True
        raise
    if first[0] == "error":
        raise APIError(first[1], first[2], type="server_error")
    rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
    prompt_tokens = sum(len(p) for p in prompts)
    if req.stream:
        return StreamingResponse(_stream(kind, rid, req, job, first, events, prompt_tokens),
                                 media_type="text/event-stream")
    return await _collect(request, kind, rid, req, job, first, events, prompt_tokens)


async def _collect(request, kind, rid, req, job, event, events, prompt_tokens):
    texts, finishes, tokens = [""] * len(job.seqs), [None] * len(job.seqs), 0
    watch = _Disconnect(request)
    try:
        while event[0] != "done":
            if event[0] == "delta":
                texts[event[1]] += event[2]
            elif event[0] == "finish":
                finishes[event[1]], tokens = event[2], tokens + event[3]
            elif event[0] == "error":
                raise APIError(event[1], event[2], type="server_error")
            event = await watch.next(events)
            if event is None:  # the client went away: free its rows at the next step
                job.cancelled = True
                return Response(status_code=499)
    except asyncio.CancelledError:
        job.cancelled = True
        raise
    return response(kind, rid, req.model, texts, finishes, prompt_tokens, tokens)


class _Disconnect:
    """Nothing is written to a client waiting for a whole reply, so only asking its connection tells
    that it is gone; asked every `every_s` while events keep coming, and whenever none comes."""

    def __init__(self, request, every_s: float = 0.25):
        self.request, self.every_s, self.asked = request, every_s, time.monotonic()

    async def gone(self) -> bool:
        self.asked = time.monotonic()
        return await self.request.is_disconnected()

    async def next(self, events):
        """The next event, or None once the client has disconnected."""
        while True:
            if time.monotonic() - self.asked >= self.every_s and await self.gone():
                return None
            try:
                return await asyncio.wait_for(events.get(), self.every_s)
            except asyncio.TimeoutError:
                if await self.gone():
                    return None


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(kind, rid, req, job, event, events, prompt_tokens):
    created, tokens, finished = int(time.time()), 0, False
    try:
        if kind == "chat":
            for i in range(len(job.seqs)):
                yield _sse(chunk(kind, rid, created, req.model, i, first=True))
        while event[0] != "done":
            if event[0] == "delta":
                yield _sse(chunk(kind, rid, created, req.model, event[1], text=event[2]))
            elif event[0] == "finish":
                tokens += event[3]
                yield _sse(chunk(kind, rid, created, req.model, event[1], finish=event[2]))
            elif event[0] == "error":
                yield _sse(APIError(event[1], event[2], type="server_error").body())
                break
            event = await events.get()
        if req.include_usage:
            yield _sse({"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                        "created": created, "model": req.model, "choices": [],
                        "usage": usage(prompt_tokens, tokens)})
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        if not finished:  # the client went away: free its rows at the next step
            job.cancelled = True


def serve(model: str, adapters: dict[str, str], *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, dtype: str = "fp32", max_adapters: int = 4, max_batch: int = 16,
          threads: int = 0, limits: Limits | None = None) -> None:
    """Load the base model, then serve it and its adapters until SIGINT/SIGTERM (which stop taking
    new requests and let those in flight finish)."""
    from .pool import ModelPool

    limits = limits or Limits()
    limits.check()
    if max_batch < 1:
        raise ServeError(f"--max-batch must be >= 1, got {max_batch}")
    if threads < 0:
        raise ServeError(f"--threads must be >= 0 (0 = one per physical core), got {threads}")
    if host not in LOCAL_HOSTS:
        print(f"[tunesmith] warning: listening on {host}: other machines can reach this server"
              + ("" if api_key else "; anyone can use it (set --api-key or TUNESMITH_API_KEY)"), file=sys.stderr)
    pool = ModelPool(model, adapters, dtype=dtype, max_adapters=max_adapters)
    # the training default (physical cores): on CPU, more intra-op threads than cores make every step
    # wait on the busiest one
    threads = set_threads(threads)
    scheduler = Scheduler(pool, max_batch=max_batch, max_queue=limits.max_queue, threads=threads)
    app = build_app(pool, scheduler, limits, api_key)
    import uvicorn  # installed with fastapi (the `serve` extra), checked by build_app

    print(f"[tunesmith] serving {', '.join(pool.names)} at http://{host}:{port}/v1 "
          f"(max batch {max_batch}, {threads} threads, {'API key required' if api_key else 'no API key'}); "
          "Ctrl-C stops", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=int(limits.request_timeout_s) + 5)
