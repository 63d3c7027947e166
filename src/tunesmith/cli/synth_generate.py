"""`tunesmith synth generate PROMPTS.jsonl --out OUT.jsonl --n N`: many samples per prompt, resumable
(synth/engine.py)."""
from __future__ import annotations

from ..synth.engine import SynthError

SYNTH_ERRORS: tuple = (SynthError,)


def add(sub, model_args) -> None:
    p = sub.add_parser("generate", help="sample N completions of every prompt of a JSONL file into a resumable "
                                        "JSONL with provenance (run again to continue an interrupted run)")
    p.add_argument("prompts", metavar="PROMPTS.jsonl",
                   help='one job a line: {"id"?: str, "prompt": str | "messages": [...], ...}; other fields are '
                        "copied into each record's meta")
    p.add_argument("--out", required=True, metavar="OUT.jsonl", help="records are appended; an existing file resumes")
    model_args(p)
    p.add_argument("--n", type=int, default=1, help="samples per prompt (greedy, temperature 0, makes one)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="a string that ends a sample (cut before it); repeatable")
    p.add_argument("--batch-size", type=int, default=8, help="sequences decoding together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", default=None, help="system prompt for prompts without one")
    p.add_argument("--raw", action="store_true", help="prompts are raw text, not chat messages")
    p.add_argument("--no-dedup", action="store_true", help="do not mark duplicate samples (duplicate_of)")
    p.set_defaults(fn=cmd_generate)


def cmd_generate(args) -> int:
    from ..infer.generate import load_for_inference
    from ..synth.engine import read_jobs, synthesize

    jobs = read_jobs(args.prompts)  # checked before the model loads
    model, tokenizer = load_for_inference(args.model, args.adapter, dtype=args.dtype)
    stats = synthesize(model, tokenizer, jobs, args.out, n=args.n, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, max_new_tokens=args.max_new_tokens, stop=args.stop,
                       batch_size=args.batch_size, seed=args.seed, dedup=not args.no_dedup,
                       system_prompt=args.system, raw=args.raw)
    print(f"[tunesmith] {stats.samples} samples of {stats.jobs - stats.skipped_jobs} prompts in "
          f"{stats.generation_s:.1f} s ({stats.samples_per_s:.2f} samples/s, {stats.tokens_per_s:.1f} tokens/s); "
          f"{stats.skipped_jobs} prompts already done; written to {args.out}")
    return 0
