"""The `grow` verb: depth up-scaling (models/grow.py).

    tunesmith grow --model smollm2-135m-instruct --solar 6 --output grown/
    tunesmith grow --model smollm2-135m-instruct --repeat 10:20 --identity --output grown/
"""
from __future__ import annotations


def add_grow_verb(sub) -> None:
    p = sub.add_parser("grow", help="a deeper model from a Llama-family one: repeat a span of its decoder layers "
                                    "(SOLAR/Yi depth up-scaling), then train it on")
    p.add_argument("--model", default="smollm2-135m-instruct", help="the model to grow (any name `--model` takes)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--solar", type=int, default=None, metavar="M",
                     help="SOLAR: two copies, the last M layers dropped from the first and the first M from the "
                          "second: 2(n-M) layers")
    how.add_argument("--repeat", default=None, metavar="START:END",
                     help="repeat layers START..END-1 right after themselves (end excluded)")
    p.add_argument("--identity", action="store_true",
                   help="zero the copies' o_proj/down_proj (LLaMA Pro): the grown model starts as the original")
    p.add_argument("--output", required=True, help="the HF folder to write (train it with model.name=FOLDER)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.set_defaults(fn=cmd_grow)


def cmd_grow(args) -> int:
    from ..models.grow import grow_model

    out, sources = grow_model(args.model, args.output, solar=args.solar, repeat=args.repeat,
                              identity=args.identity, dtype=args.dtype)
    print(f"[tunesmith] grown model ({len(sources)} layers, from layers {_spans(sources)}) written to {out}")
    return 0


def _spans(sources: list[int]) -> str:
    """[0, 1, 2, 1, 2, 3] → "0-2, 1-3": the stack as runs of consecutive source layers."""
    runs: list[list[int]] = []
    for i in sources:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
