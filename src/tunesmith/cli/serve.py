"""The `serve` verb: an OpenAI-compatible HTTP server for a model and its adapters (`tunesmith.serve`).

    tunesmith serve --adapter sql=runs/sql [--api-key KEY]      # 127.0.0.1:8000
"""
from __future__ import annotations

import os


def cmd_serve(args) -> int:
    from ..serve import Limits, parse_adapters, serve

    limits = Limits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens, max_queue=args.max_queue,
                    request_timeout_s=args.request_timeout)
    serve(args.model, parse_adapters(args.adapter), host=args.host, port=args.port,
          api_key=args.api_key or os.environ.get("TUNESMITH_API_KEY") or None, dtype=args.dtype,
          max_adapters=args.max_adapters, max_batch=args.max_batch, threads=args.threads, limits=limits)
    return 0


def add_serve_verb(sub) -> None:
    """The `serve` subcommand."""
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a model and its adapters")
    p.add_argument("--model", default="smollm2-135m-instruct", help="the base model (served under this name)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="an adapter or run folder served as model NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (or env TUNESMITH_API_KEY)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for the model (0 = one per physical core)")
    p.add_argument("--max-adapters", type=int, default=4, help="adapters kept in memory (least recently used leave)")
    p.add_argument("--max-queue", type=int, default=64, help="requests in flight; one more gets 429")
    p.add_argument("--max-tokens", type=int, default=1024, help="the most max_tokens a request may ask for (400 over it)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds a request may decode; then it ends with finish_reason length")
    p.set_defaults(fn=cmd_serve)
