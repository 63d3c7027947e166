"""Logit fusion on the sql task: does a small sql expert lift the large base model, and what does
fusion cost per token?  Run from the repository root after `benchmarks/fusion/train.sh`:

    nice -n 5 python benchmarks/fusion/run.py --limit 50

Rows (one test split, the same first `--limit` examples, greedy, one sitting):
large base alone, + proxy tuning (α = 1), + dynamic fusion (α per token), the small expert alone,
the small base alone, the large model tuned directly with the expert's recipe (upper bound).
Then decoding speed: the same prompts decoded for exactly `--speed-tokens` tokens by the large model
alone, proxy and dynamic fusion (best of `--repeats`, interleaved), and the α search on its own.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tunesmith.eval.runner import evaluate, get_eval_task, save_result
from tunesmith.infer.fuse import FusedLM, fuse_logits
from tunesmith.infer.generate import _encode, left_pad, load_for_inference, stop_ids

RUNS = Path("runs/fusion")
SMALL, EXPERT, LARGE_TUNED = RUNS / "heal" / "model", RUNS / "expert", RUNS / "large-tuned"


ROWS = {"base": "large base", "proxy": "large + proxy (α=1)", "dynamic": "large + dynamic", "expert": "small expert",
        "small": "small base", "tuned": "large tuned directly"}


def models(keys, need_small: bool):
    large, tok = load_for_inference(None)
    small = expert = None
    if need_small or set(keys) & {"proxy", "dynamic", "expert", "small"}:
        small, _ = load_for_inference(str(SMALL))
        expert, _ = load_for_inference(str(SMALL), adapter=str(EXPERT))
    built = {"base": lambda: large, "proxy": lambda: FusedLM(large, small, [expert], mode="proxy"),
             "dynamic": lambda: FusedLM(large, small, [expert], mode="dynamic"), "expert": lambda: expert,
             "small": lambda: small, "tuned": lambda: load_for_inference(None, adapter=str(LARGE_TUNED))[0]}
    return large, small, expert, tok, {ROWS[k]: built[k]() for k in keys}


def quality(rows, tok, args) -> dict:
    task = get_eval_task("sql")
    out = {}
    for name, model in rows.items():
        r = evaluate(model, tok, task, split="test", limit=args.limit, max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch_size, progress=False)
        save_result(r, RUNS / f"eval-{name.split(' (')[0].replace(' + ', '-').replace(' ', '-')}.json")
        n_tokens = sum(len(tok(rec["prediction"], add_special_tokens=False)["input_ids"]) for rec in r.records)
        out[name] = {"accuracy": r.summary["accuracy"], "mean_score": r.summary["mean_score"],
                     "generation_s": r.summary["generation_s"], "answer_tokens": n_tokens}
        out[name]["first_predictions"] = [rec["prediction"] for rec in r.records[:2]]
        if isinstance(model, FusedLM):
            out[name]["alpha"] = model.stats.summary()
        print(f"{name:22s} accuracy {100 * out[name]['accuracy']:5.1f}%  {r.summary['generation_s']:.0f} s", flush=True)
    return out


def _prompts(tok, n):
    from tunesmith.eval.runner import build_prompt

    task = get_eval_task("sql")
    return [_encode(tok, build_prompt(task, ex, []), None) for ex in task.examples("test")[:n]]


@torch.inference_mode()
def speed(large, small, expert, tok, args) -> dict:
    """Seconds per decoded token (whole batch) for a fixed-length decode: no stop token ends it early."""
    ids, mask = left_pad(_prompts(tok, args.batch_size), stop_ids(large, tok)[0])
    pad = stop_ids(large, tok)[0]
    decoders = {
        "large alone": lambda: large.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.speed_tokens,
                                              min_new_tokens=args.speed_tokens, do_sample=False, pad_token_id=pad,
                                              temperature=None, top_p=None, top_k=None),
        "proxy fusion": lambda: FusedLM(large, small, [expert], mode="proxy").generate(
            ids, mask, max_new_tokens=args.speed_tokens, eos_token_id=[], pad_token_id=pad),
        "dynamic fusion": lambda: FusedLM(large, small, [expert], mode="dynamic").generate(
            ids, mask, max_new_tokens=args.speed_tokens, eos_token_id=[], pad_token_id=pad),
    }
    best = {k: float("inf") for k in decoders}
    for _ in range(args.repeats):  # interleaved, so a busy moment of the machine hits every mode alike
        for name, fn in decoders.items():
            t0 = time.perf_counter()
            out = fn()
            assert out.shape[1] == ids.shape[1] + args.speed_tokens, name
            best[name] = min(best[name], time.perf_counter() - t0)
    tokens = args.batch_size * args.speed_tokens
    result = {k: {"s": v, "tokens_per_s": tokens / v, "cost_vs_large": v / best["large alone"]} for k, v in best.items()}
    # the α search alone, on one step's logits of the whole batch
    v = large.config.vocab_size
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(args.batch_size, v, generator=g) * 3 for _ in range(3)]
    t0 = time.perf_counter()
    for _ in range(10):
        fuse_logits(logits[0], logits[1], logits[2:], mode="dynamic")
    result["alpha search per step"] = {"s": (time.perf_counter() - t0) / 10}
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--speed-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rows", default=",".join(ROWS), help=f"quality rows to (re)measure: {','.join(ROWS)}; empty = none")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 on a shared CPU, where two threads per process oversubscribe the cores")
    p.add_argument("--output", default="benchmarks/fusion/results.json")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    large, small, expert, tok, rows = models([k for k in args.rows.split(",") if k], not args.no_speed)
    out = Path(args.output)
    result = json.loads(out.read_text()) if out.is_file() else {}  # rows measured earlier are kept
    result["machine"] = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    result.setdefault("quality", {}).update(quality(rows, tok, args))
    result.setdefault("settings", {}).update(quality=dict(limit=args.limit, max_new_tokens=args.max_new_tokens,
                                                          batch_size=args.batch_size))
    if not args.no_speed:
        result["speed"] = speed(large, small, expert, tok, args)
        result["settings"]["speed"] = dict(batch_size=args.batch_size, tokens=args.speed_tokens, repeats=args.repeats)
        for name, row in result["speed"].items():
            print(name, {k: round(x, 3) for k, x in row.items()}, flush=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
