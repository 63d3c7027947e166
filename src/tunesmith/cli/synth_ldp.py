"""`tunesmith synth ldp`: linguistically-diverse prompting for a low-resource constructed language."""
from __future__ import annotations

from ..synth.ldp import HIGH, TARGET, FilterConfig, LdpConfig, LdpError

SYNTH_ERRORS = (LdpError,)


def add(sub, model_args) -> None:
    p = sub.add_parser("ldp", help="translate a low-resource language's text to English with exemplars from "
                                   "diverse high-resource languages, then fine-tune on the synthetic pairs",
                       description="LDP: synthetic (X, English) pairs from monolingual X text, prompted with "
                                   "exemplars of several high-resource languages; filtered, then LoRA-tuned on. "
                                   "Writes x2en.jsonl, pairs.jsonl, train.jsonl, tuned/ and stats.json into --out.")
    model_args(p)
    p.add_argument("--target", default=TARGET, help=f"the low-resource language code (default {TARGET}: Lunish)")
    p.add_argument("--high", default=",".join(HIGH),
                   help=f"comma-separated high-resource language codes (default {','.join(HIGH)})")
    p.add_argument("--pool", type=int, default=200, help="unlabelled target sentences to translate")
    p.add_argument("--shots", type=int, default=4, help="exemplars per prompt")
    p.add_argument("--rounds", type=int, default=1,
                   help="2: translate the pool again with kept synthetic target pairs in context (intra-lingual)")
    p.add_argument("--no-reverse", action="store_true", help="train X -> English only (not English -> X as well)")
    p.add_argument("--min-ratio", type=float, default=0.5, help="length-ratio filter: smallest English/source chars")
    p.add_argument("--max-ratio", type=float, default=2.0, help="length-ratio filter: largest English/source chars")
    p.add_argument("--copy-similarity", type=float, default=0.9,
                   help="copy filter: drop answers at least this similar to their source")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tune", action="store_true", help="stop after writing train.jsonl")
    p.add_argument("--recipe", default=None, help="fine-tuning recipe (default: LoRA r16, lr 1e-3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for the fine-tuning, e.g. --set train.steps=40 (repeatable)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(fn=run)


def run(args) -> int:
    import json

    from ..infer.generate import DEFAULT_MODEL, base_model_for, load_for_inference
    from ..synth.ldp import check_languages, run_ldp

    high = tuple(c.strip() for c in args.high.split(",") if c.strip())
    cfg = LdpConfig(target=args.target, high=high, pool=args.pool, shots=args.shots, rounds=args.rounds,
                    reverse=not args.no_reverse, seed=args.seed, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, batch_size=args.batch_size,
                    filters=FilterConfig(args.min_ratio, args.max_ratio, args.copy_similarity),
                    tune=not args.no_tune, recipe=args.recipe, overrides=tuple(args.overrides))
    check_languages(cfg.target, cfg.high)  # before the model loads
    model, tokenizer = load_for_inference(args.model, args.adapter, dtype=args.dtype)
    base = args.model or (base_model_for(args.adapter) if args.adapter else DEFAULT_MODEL)
    stats = run_ldp(model, tokenizer, cfg, args.out, model_name=base)
    print(json.dumps({k: stats[k] for k in ("generated", "kept", "dropped", "generation_s", "train_s", "output")}))
    return 0
