"""`tunesmith eval --task passkey|needle|kv|position-ppl:FILE`: long-context evaluation.

    tunesmith eval --task passkey --lengths 1k,2k,4k,8k --depths 0,0.25,0.5,0.75,1 --samples 2
    -> eval-passkey/: grid.json, grid.md, heatmap.png (length x depth, % correct), records.jsonl
    tunesmith eval --task position-ppl:book.txt --lengths 16k --bucket 1k
    -> eval-position-ppl/: positions.json, positions.md, positions.png (loss by position)

A grid appends each answer to records.jsonl as it comes; run the same command again and the prompts
already answered (same model, adapter, dtype, seed) are kept, not asked again. A position-ppl FILE
is a .txt (one long text) or a .jsonl with a `text` per line; texts are cut to the largest length.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..eval.long_context import LONG_TASKS

POSITION_PPL = "position-ppl:"


def is_long_task(task: str) -> bool:
    return task in LONG_TASKS or task.startswith(POSITION_PPL)


def add_long_args(p) -> None:
    """The eval parser's long-context options (`--samples` is the prompts per grid cell)."""
    p.add_argument("--lengths", default="1k,2k,4k",
                   help="passkey/needle/kv: prompt lengths in tokens (k = 1024), e.g. 1k,2k,4k,8k,16k; "
                        "position-ppl: texts are cut to the largest")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                   help="passkey/needle/kv: where the fact sits, as fractions of the filler text (0 = start)")
    p.add_argument("--needles", type=int, default=4, help="needle: needles in the text, the asked one among them")
    p.add_argument("--bucket", default="1k", help="position-ppl: positions per bucket of the loss table")
    p.add_argument("--rope", default=None, metavar="KEY=VALUE,...",
                   help="evaluate with the RoPE scaled without training, as the recipe's model.rope.* keys would: "
                        "e.g. scaling=linear,factor=2 | scaling=yarn,target_length=16384 | theta=250000")


def parse_rope(spec: str):
    """`--rope scaling=yarn,factor=2` as a RopeConfig (the recipe's `model.rope.*` keys, one flag)."""
    from ..config import RecipeError, RopeConfig
    from ..eval.runner import EvalError

    fields = {}
    for part in filter(None, (s.strip() for s in spec.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key.strip() not in RopeConfig.model_fields:
            raise EvalError(f"--rope: `{part}` should be KEY=VALUE with KEY one of {', '.join(RopeConfig.model_fields)}")
        fields[key.strip()] = value.strip()
    try:
        return RopeConfig(**fields)
    except RecipeError as e:
        raise EvalError(f"--rope {e}") from None


def _with_rope(args, load):
    """`load`, then the RoPE `--rope` asks for applied to the loaded model (refused over an adapter's own)."""
    if not args.rope:
        return load
    from ..eval.runner import EvalError
    from ..models.rope import apply_rope, changed_rope, describe_rope

    cfg = parse_rope(args.rope)

    def loaded(a):
        model, tokenizer = load(a)
        if changed_rope(model):
            raise EvalError(f"--rope: the adapter already runs with {describe_rope(changed_rope(model))}; "
                            "evaluate it as trained, or without the adapter")
        print(f"[tunesmith] RoPE for this evaluation: {describe_rope(apply_rope(model, cfg))}")
        return model, tokenizer

    return loaded


def eval_long(args, load) -> int:
    """Run a long-context task and write its files; `load(args)` gives (model, tokenizer)."""
    load = _with_rope(args, load)
    if args.task.startswith(POSITION_PPL):
        return _position_ppl(args, load)
    from ..eval.long_context import parse_depths, parse_lengths
    from ..eval.long_grid import format_grid, run_grid, save_grid
    from ..infer.domains import domain_route
    from ..jsonl import write_jsonl

    lengths, depths = parse_lengths(args.lengths), parse_depths(args.depths)
    out = Path(args.output or f"eval-{args.task}")
    identity = {"model": args.model, "adapter": args.adapter, "dtype": args.dtype, "rope": args.rope,
                **({"needles": args.needles} if args.task == "needle" else {})}
    done = _earlier(out / "records.jsonl", args.task, args.seed, identity)
    model, tokenizer = load(args)
    _context_note(model, max(lengths))
    write_jsonl(out / "records.jsonl", done)  # the kept records only; new ones are appended as they come
    with (out / "records.jsonl").open("a", encoding="utf-8") as f, \
            domain_route(model, args.domain, args.adapter, args.model):
        def append(record):
            f.write(json.dumps({**record, **identity}, ensure_ascii=False) + "\n")
            f.flush()

        grid = run_grid(model, tokenizer, args.task, lengths, depths, samples=args.samples, seed=args.seed,
                        needles=args.needles, done=done, on_record=append)
    save_grid(grid, out, **identity)
    print(format_grid(grid))
    if done:
        print(f"[tunesmith] {len(done)} answers kept from an earlier run in {out}")
    print(f"[tunesmith] grid: {out / 'grid.md'}, {out / 'grid.json'}; heat map: {out / 'heatmap.png'}; "
          f"answers: {out / 'records.jsonl'}")
    return 0


def _earlier(path: Path, task: str, seed: int, identity: dict) -> list[dict]:
    """The records of an earlier run in `path` that this run would ask again: same task, seeds and identity."""
    from ..eval.runner import EvalError
    from ..jsonl import read_jsonl

    if not path.is_file():
        return []
    return [r for _, r in read_jsonl(path, EvalError)
            if r.get("task") == task and r.get("seed") == seed + r.get("sample", -1)
            and all(r.get(k) == v for k, v in identity.items())]


def _context_note(model, longest: int) -> None:
    trained = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(trained, int) and longest > trained:
        print(f"[tunesmith] note: prompts up to {longest} tokens exceed the model's {trained} trained positions")


def _position_ppl(args, load) -> int:
    """Loss by position bucket over the texts of a .txt or .jsonl file, cut to the largest --lengths."""
    from tqdm.auto import tqdm

    from ..eval.long_context import parse_lengths
    from ..eval.long_grid import format_positions, position_perplexity
    from ..infer.domains import domain_route
    from ..jsonl import write_json
    from ..plots import plot_curves

    path = args.task[len(POSITION_PPL):]
    texts = _texts(path)[:args.limit] if args.limit else _texts(path)
    length, bucket = max(parse_lengths(args.lengths)), parse_lengths(args.bucket)[0]
    out = Path(args.output or "eval-position-ppl")
    model, tokenizer = load(args)
    _context_note(model, length)
    with domain_route(model, args.domain, args.adapter, args.model):
        rows = position_perplexity(model, tokenizer, tqdm(texts, desc="position-ppl", unit="text"), length, bucket)
    write_json(out / "positions.json", {"file": path, "texts": len(texts), "length": length, "bucket": bucket,
                                        "model": args.model, "adapter": args.adapter, "rope": args.rope,
                                        "buckets": rows})
    table = format_positions(rows)
    (out / "positions.md").write_text(f"# Loss by position: {path} ({len(texts)} texts, cut to {length} tokens)"
                                      f"\n\n{table}\n")
    plot_curves({}, out / "positions.png", "loss", {"loss": [(r["end"], r["loss"]) for r in rows if r["tokens"]]},
                xlabel="position (bucket end, tokens)", title=f"loss by position: {Path(path).name}")
    print(table)
    print(f"[tunesmith] table: {out / 'positions.md'}; curve: {out / 'positions.png'}")
    return 0


def _texts(path: str) -> list[str]:
    """One text for a .txt file; each line's `text` for a .jsonl file."""
    from ..eval.runner import EvalError
    from ..jsonl import read_jsonl

    if path.endswith(".txt"):
        return [Path(path).read_text(encoding="utf-8")]
    if not path.endswith(".jsonl"):
        raise EvalError(f"position-ppl: {path} should be a .txt (one text) or a .jsonl with a `text` per line")
    texts = []
    for where, row in read_jsonl(path, EvalError):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise EvalError(f"{where}: expected an object with a string `text`")
        texts.append(row["text"])
    return texts
