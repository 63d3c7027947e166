"""The `data` verb: look at the data a recipe trains on, or prepare it into shards.

    tunesmith data inspect recipes/lora-sft.yaml
    tunesmith data prepare recipes/data-prepare.yaml prepare.inputs=raw/ prepare.output=shards/
    tunesmith train recipes/lora-sft.yaml data.train=shards/
    tunesmith data long-docs --output long/ --min-tokens 8192 --max-tokens 16384
"""
from __future__ import annotations


def add_data_verb(sub) -> None:
    p = sub.add_parser("data", help="look at the data a recipe trains on, or clean it into tokenized shards")
    dsub = p.add_subparsers(dest="action", required=True)
    q = dsub.add_parser("inspect", help="rendered samples with trained tokens marked, and statistics")
    q.add_argument("recipe")
    q.add_argument("overrides", nargs="*")
    q.add_argument("-n", type=int, default=3, help="samples to show")
    q.set_defaults(fn=cmd_data)
    q = dsub.add_parser("prepare", help="stream files through normalise, dedup, filters, PII scrub and near-dedup "
                                        "into tokenized shards (the recipe's prepare: and data: sections)")
    q.add_argument("recipe")
    q.add_argument("overrides", nargs="*", help="a.b=c overrides, e.g. prepare.inputs=raw/ prepare.workers=2")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(fn=cmd_prepare)
    q = dsub.add_parser("long-docs", help="long documents from local code: each installed package's (or folder's) "
                                          "source files concatenated per sub-package, split train/held-out by package")
    q.add_argument("--output", required=True, help="folder for train.jsonl, held_out.jsonl and summary.md")
    q.add_argument("--packages", nargs="*", default=None,
                   help="installed packages to read (default: those of torch, transformers, numpy, pydantic, ... "
                        "that are installed); `--packages` alone = none, with --folder")
    q.add_argument("--folder", action="append", default=[], help="a source folder read as a package (repeatable)")
    q.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer counts the tokens")
    q.add_argument("--min-tokens", type=int, default=4096, help="shortest document (and row) kept")
    q.add_argument("--max-tokens", type=int, default=None, help="cut documents into rows of at most this many tokens")
    q.add_argument("--held-out", nargs="+", default=None, help="packages held out (default: by --held-out-fraction)")
    q.add_argument("--held-out-fraction", type=float, default=0.1, help="share of tokens held out, whole packages")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(fn=cmd_long_docs)


def cmd_long_docs(args) -> int:
    from ..data.long_docs import build_long_docs, format_summary, write_long_docs
    from ..models.load import load_tokenizer

    docs = build_long_docs(load_tokenizer(args.model), packages=args.packages, folders=args.folder,
                           min_tokens=args.min_tokens, max_tokens=args.max_tokens, held_out=args.held_out,
                           held_out_fraction=args.held_out_fraction, progress=not args.quiet)
    folder = write_long_docs(docs, args.output)
    print(format_summary(docs))
    print(f"[tunesmith] long documents in {folder} (train.jsonl, held_out.jsonl, summary.md)")
    return 0


def cmd_prepare(args) -> int:
    from ..data.pipeline import format_report, prepare
    from ..models.load import load_tokenizer
    from ..recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    tokenizer = load_tokenizer(recipe.model.name) if recipe.prepare.tokenize else None
    result = prepare(recipe.prepare, recipe.data, tokenizer, progress=not args.quiet)
    print(format_report(result.report))
    what = "shards" if recipe.prepare.tokenize else "cleaned data"
    print(f"[tunesmith] {what} in {result.folder} (report.md, near_duplicates.jsonl)")
    if recipe.prepare.tokenize:
        print(f"[tunesmith] train on them: tunesmith train RECIPE data.train={result.folder}")
    return 0


def cmd_data(args) -> int:
    from ..data import format_inspection, load_data
    from ..models.load import load_tokenizer
    from ..objectives import objective_class
    from ..objectives.preference import Preference
    from ..recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    kind = objective_class(recipe.objective.name)
    if getattr(kind, "loads", None) == "embedder":  # query/positive/negatives items (contrastive, grl)
        from ..data.pairs import format_contrastive_inspection, load_contrastive
        from ..models.embedding import model_folder

        options, tokenizer = getattr(recipe.objective, kind.block), load_tokenizer(str(model_folder(recipe.model.name)))
        splits = load_contrastive(recipe.data, tokenizer, max_length=options.max_length, seed=recipe.train.seed,
                                  query_prefix=options.query_prefix, document_prefix=options.document_prefix,
                                  report=False)
        print(format_contrastive_inspection(splits, tokenizer, n=args.n))
        return 0
    tokenizer = load_tokenizer(recipe.model.name)
    max_length = recipe.data.max_length
    if objective_class(recipe.objective.name) is Preference:  # the data it trains on: chosen/rejected pairs
        from ..data.preference import load_pairs
        from ..data.report import format_pair_inspection

        pairs = load_pairs(recipe.data, tokenizer, seed=recipe.train.seed, report=False)
        print(format_pair_inspection(pairs.train, tokenizer, pairs.stats, n=args.n, max_length=max_length))
        return 0
    if recipe.objective.name in ("listwise", "many_icl"):  # samples the objective builds (ranking prompts, many-shot sequences)
        splits = kind.load(recipe, tokenizer)
    else:
        splits = load_data(recipe.data, tokenizer, seed=recipe.train.seed, report=False)
    print(format_inspection(splits.train, tokenizer, splits.stats, n=args.n, max_length=max_length))
    return 0
