"""`tunesmith eval --shots 0,1,4,16,64,max`: one evaluation per shot count, a table and a curve.

    tunesmith eval --task sql --limit 50 --shots 0,1,4,16,max
    -> eval-sql-test-shots.json (every count's summary and records), .md (the table), .png (the curve)

One plain count (`--shots 4`) keeps the single-evaluation output of `tunesmith eval`.
"""
from __future__ import annotations

from pathlib import Path


def eval_shots(args, task, load) -> int:
    """Evaluate at every count, then write the JSON, the markdown table and the curve side by side.
    `load(args)` gives (model, tokenizer); the shot list is checked before the model loads."""
    from ..eval.shots import evaluate_shots, format_shot_table, parse_shots, plot_shot_curves, save_shots
    from ..infer.domains import domain_route

    counts = parse_shots(args.shots)
    ks = tuple(int(k) for k in args.k.split(","))
    model, tokenizer = load(args)
    with domain_route(model, args.domain, args.adapter, args.model, default=args.task):
        curve = evaluate_shots(model, tokenizer, task, counts, split=args.split, limit=args.limit,
                               context=args.context, max_new_tokens=args.max_new_tokens, samples=args.samples,
                               temperature=args.temperature, ks=ks, batch_size=args.batch_size, seed=args.seed)
    out = Path(args.output or f"eval-{curve.task}-{args.split}-shots.json")
    save_shots(curve, out, model=args.model, adapter=args.adapter)
    table = format_shot_table(curve)
    out.with_suffix(".md").write_text(f"# {curve.task} ({curve.split}) by shot count\n\n{table}\n")
    drawn = plot_shot_curves({args.adapter or args.model or "model": curve}, out.with_suffix(".png"))
    print(table)
    if curve.max_shots is not None:
        print(f"[tunesmith] max = {curve.max_shots} shots (context {curve.context} tokens, "
              f"max_new_tokens {args.max_new_tokens})")
    print(f"[tunesmith] per-example records: {out}; table: {out.with_suffix('.md')}"
          + (f"; curve: {out.with_suffix('.png')}" if drawn else ""))
    return 0
