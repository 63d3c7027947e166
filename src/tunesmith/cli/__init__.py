"""The `tunesmith` command: one verb each.

    tunesmith train recipes/lora-sft.yaml data.train=my.jsonl train.steps=200
    tunesmith data inspect recipes/lora-sft.yaml
    tunesmith data prepare recipes/data-prepare.yaml prepare.inputs=raw/   # clean, dedup, filter -> shards
    tunesmith chat --adapter runs/lora-sft
    tunesmith generate --adapter runs/lora-sft --input prompts.jsonl --output out.jsonl
    tunesmith export --adapter runs/lora-sft/adapter --output merged/
    tunesmith embed --adapter runs/emb --input texts.jsonl --output vectors.npy
    tunesmith serve --adapter sql=runs/lora-sft   # OpenAI-compatible server on 127.0.0.1:8000
    tunesmith bench recipes/lora-sft.yaml steps=8   # tokens/s, memory, MFU, time per part
    tunesmith methods           # every tuning method with its size on a model
    tunesmith recipe            # every recipe key with its default and meaning
"""
from __future__ import annotations

import argparse
import os
import sys


def _user_errors():
    """Exceptions that are the user's to fix: printed as one line, no traceback."""
    from ..data import DataError
    from ..methods import MethodError
    from ..models.load import ModelError
    from ..recipe import RecipeError
    from ..train.checkpoint import CheckpointError
    from ..objectives import ObjectiveError
    from ..train.loop import TrainError

    errors = [RecipeError, DataError, ModelError, MethodError, ObjectiveError, TrainError, CheckpointError,
              FileNotFoundError]
    from ..export.atomic import ExportError
    from ..infer.generate import InferError

    from ..eval.files import FileTaskError
    from ..eval.rerank import RerankEvalError
    from ..eval.runner import EvalError
    from .synth import SYNTH_ERRORS

    return tuple(errors + [ExportError, InferError, EvalError, FileTaskError, RerankEvalError, *SYNTH_ERRORS])


def cmd_train(args) -> int:
    from ..recipe import load_recipe
    from ..train import distributed
    from ..objectives import objective_class
    from ..train.loop import TrainError, train

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.nproc > 1 and not objective_class(recipe.objective.name).multi_process:
        raise TrainError(f"{recipe.objective.name} runs in one process: set nproc=1")
    if distributed.under_launcher():  # a rank of a launched job: its parent chose (the overrides it passed)
        result = train(recipe)
    elif recipe.nproc > 1:
        return distributed.launch(recipe.nproc, ["train", args.recipe, *args.overrides, *_speed(recipe).overrides])
    else:
        result = train(_speed(recipe).recipe)
    if distributed.under_launcher() and int(os.environ.get("RANK", "0")) != 0:
        return 0 if result.status == "completed" else 130
    print(f"[tunesmith] report: {result.run_dir / 'report.md'}")
    return 0 if result.status == "completed" else 130


def _speed(recipe):
    """train.speed=auto (train/speed.py): the unset speed keys chosen from bench's measurements, printed."""
    from ..bench import matmul_peak
    from ..bench.estimate import estimate
    from ..train.speed import choose_speed

    choice = choose_speed(recipe, peak=matmul_peak, estimate=estimate)
    if choice.lines:
        print(choice.report(), flush=True)
    return choice


def _load(args):
    from ..infer.generate import load_for_inference

    if getattr(args, "fuse_small", None) or getattr(args, "fuse_expert", None):
        from ..infer.fuse import load_fused_args

        return load_fused_args(args.model, args.adapter, args.fuse_small, args.fuse_expert, args.fuse_mode,
                               args.fuse_alpha, args.dtype)
    return load_for_inference(args.model, args.adapter, dtype=args.dtype)


def _fusion_report(model) -> None:
    if hasattr(model, "stats"):  # a fused model: what α it used
        from ..infer.fuse import format_stats

        print(f"[tunesmith] {format_stats(model)}")


def cmd_generate(args) -> int:
    from ..infer.domains import domain_route
    from ..infer.generate import generate_file

    model, tok = _load(args)
    with domain_route(model, args.domain, args.adapter, args.model):
        generate_file(model, tok, args.input, args.output, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size)
    _fusion_report(model)
    print(f"[tunesmith] completions written to {args.output}")
    return 0


def cmd_chat(args) -> int:
    from ..infer.domains import domain_route
    from ..infer.generate import chat

    model, tok = _load(args)
    with domain_route(model, args.domain, args.adapter, args.model):
        chat(model, tok, system_prompt=args.system, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    return 0


def cmd_export(args) -> int:
    from ..export.atomic import ExportError
    from ..export.merged import export_merged
    from ..infer.generate import base_model_for
    from ..models.load import DEFAULT_MODEL

    if args.format == "st":
        from .embeddings import export_st

        return export_st(args)
    if args.format != "hf":
        return _export_gguf(args)
    if args.quant is not None:
        raise ExportError("--quant is for --format gguf / gguf-lora; a transformers folder takes --dtype")
    if args.model is None:
        args.model = base_model_for(args.adapter) if args.adapter else DEFAULT_MODEL
    from ..export.mixtral import export_mixtral, is_moe_adapter

    if args.adapter and is_moe_adapter(args.adapter):  # learned-router MoE in every layer -> Mixtral
        print(f"[tunesmith] Mixtral model written to {export_mixtral(args.model, args.adapter, args.output, args.dtype)}")
        return 0
    out = export_merged(args.model, args.adapter, args.output, dtype=args.dtype)
    print(f"[tunesmith] merged model written to {out}")
    return 0


def _export_gguf(args) -> int:
    """`--format gguf`: the model (an adapter merged in first) as one .gguf plus an Ollama Modelfile;
    `--format gguf-lora`: a LoRA adapter as a GGUF LoRA for llama.cpp's --lora."""
    from ..export.atomic import ExportError
    from ..export.gguf import export_gguf, export_gguf_lora, export_merged_gguf, usage
    from ..infer.generate import base_model_for
    from ..models.load import DEFAULT_MODEL

    if args.format == "gguf-lora":
        if args.adapter is None:
            raise ExportError("--format gguf-lora needs --adapter (a LoRA adapter or run folder)")
        written = export_gguf_lora(args.adapter, args.output, base=args.model, quant=args.quant or "f32")
    else:
        if args.model is None:
            args.model = base_model_for(args.adapter) if args.adapter else DEFAULT_MODEL
        quant = args.quant or "f16"
        written = export_merged_gguf(args.model, args.adapter, args.output, quant) if args.adapter \
            else export_gguf(args.model, args.output, quant)
    print(f"[tunesmith] {'GGUF LoRA' if args.format == 'gguf-lora' else 'GGUF'} written to {written.path} "
          f"({written.bytes / 2**20:.1f} MiB, {written.tensors} tensors)")
    if written.modelfile is not None:
        print(f"[tunesmith] Ollama Modelfile: {written.modelfile}")
    print("[tunesmith] run it with:\n" + "\n".join(f"  {line}" for line in usage(written, args.format == "gguf-lora")))
    return 0


def cmd_eval(args) -> int:
    from ..eval.runner import evaluate, format_summary, get_eval_task, save_result
    from ..infer.domains import domain_route
    from .long_context import eval_long, is_long_task

    if is_long_task(args.task):
        return eval_long(args, _load)
    if args.task.partition(":")[0] in ("retrieval", "rerank"):
        from .embeddings import eval_rerank, eval_retrieval

        return (eval_retrieval if args.task.startswith("retrieval") else eval_rerank)(args)
    if args.task.startswith("text:"):
        from ..objectives.sft import perplexity

        model, tok = _load(args)
        with domain_route(model, args.domain, args.adapter, args.model):
            result = perplexity(model, tok, args.task[len("text:"):], limit=args.limit)
        print("\n".join(f"{k:<10} {v:.4f}" if isinstance(v, float) else f"{k:<10} {v}" for k, v in result.items()))
        return 0
    task = get_eval_task(args.task, args.metric, seed=args.seed)
    if not isinstance(args.shots, int):  # a list or `max`: one evaluation per count (cli/shots.py)
        from .shots import eval_shots

        return eval_shots(args, task, _load)
    model, tok = _load(args)
    ks = tuple(int(k) for k in args.k.split(","))
    with domain_route(model, args.domain, args.adapter, args.model, default=args.task):
        result = evaluate(model, tok, task, split=args.split, limit=args.limit, shots=args.shots,
                          samples=args.samples, temperature=args.temperature, ks=ks,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    out = args.output or f"eval-{result.task}-{args.split}.json"
    save_result(result, out, model=args.model, adapter=args.adapter,
                **({"fusion": model.stats.summary()} if hasattr(model, "stats") else {}))
    print(format_summary(result))
    _fusion_report(model)
    print(f"[tunesmith] per-example records: {out}")
    return 0


def cmd_quickstart(args) -> int:
    from ..quickstart import quickstart

    from ..recipe import load_recipe

    quickstart(args.recipe, [*args.overrides, *_speed(load_recipe(args.recipe, args.overrides)).overrides])
    return 0


def cmd_recipe(args) -> int:
    from ..recipe import reference

    if args.markdown:
        print("| key | default | meaning |\n|---|---|---|")
        for key, default, doc in reference():
            print(f"| `{key}` | `{default}` | {doc} |")
        return 0
    for key, default, doc in reference():
        print(f"{key:34s} {default!s:22s} {doc}")
    return 0


def cmd_bench(args) -> int:
    from ..bench import matmul_peak, run_bench, run_lengths
    from ..recipe import RecipeError, load_recipe
    from ..runtime import allocator_in_use, pick_device, set_threads

    overrides = []
    for item in args.overrides:  # `steps=N` / `warmup=N` belong to the bench, the rest to the recipe
        key, _, value = item.partition("=")
        if key in ("steps", "warmup"):
            if not value.isdigit():
                raise RecipeError(f"{key}: expected a whole number, got {value!r}")
            setattr(args, key, int(value))
        else:
            overrides.append(item)
    if args.peak:
        recipe = load_recipe(args.recipe, overrides) if args.recipe else load_recipe(None, overrides)
        device = pick_device(recipe.train.device)
        threads = set_threads(recipe.train.threads) if device.type == "cpu" else None
        for dtype in ("bf16", "fp32"):
            print(f"matmul peak {dtype}: {matmul_peak(device, dtype, threads, refresh=True):.3f} TFLOP/s "
                  f"({device}, {threads or 'default'} threads, allocator {allocator_in_use()}; cached for MFU)")
        if not args.recipe:
            return 0
    if not args.recipe:
        raise RecipeError("tunesmith bench needs a recipe (or --peak alone)")
    recipe = load_recipe(args.recipe, overrides)
    if args.lengths:
        return run_lengths(recipe, args.lengths, args.steps, args.warmup, args.json)
    return run_bench(_speed(recipe).recipe, args.steps, args.warmup, not args.no_breakdown, args.json)


def cmd_estimate(args) -> int:
    from ..bench.estimate import estimate, format_estimate
    from ..recipe import RecipeError, load_recipe

    if args.sizes:  # no recipe: what 0.5B-8B configs need, from meta-device models
        from ..bench.estimate_sizes import format_sizes, size_table

        print(format_sizes(size_table(tokens=args.sizes_tokens), args.sizes_tokens))
        return 0
    if args.recipe is None:
        raise RecipeError("tunesmith estimate needs a recipe (or --sizes alone)")
    choice = _speed(load_recipe(args.recipe, args.overrides))
    result = choice.estimate or estimate(choice.recipe)  # made by the choice already when it was measured as is
    result.mfu = args.mfu
    print(format_estimate(result))
    if args.json:
        import dataclasses
        import json

        with open(args.json, "w") as f:
            json.dump({**dataclasses.asdict(result), "peak_gb": result.peak_gb, "step_s": result.step_s}, f, indent=1)
    return 0


def cmd_prune(args) -> int:
    from ..models.prune import prune_model

    out = prune_model(args.model, args.keep, args.output, dtype=args.dtype)
    print(f"[tunesmith] pruned model ({args.keep} layers) written to {out}")
    return 0


def cmd_methods(args) -> int:
    from ..methods.catalog import format_table, method_table
    from ..models.load import DEFAULT_MODEL, load_model

    model, _ = load_model(args.model or DEFAULT_MODEL, "fp32")
    rows = method_table(model)
    print(f"methods on {args.model or DEFAULT_MODEL} ({rows[0]['total']:,} parameters); "
          "set one with the recipe overrides shown:")
    print(format_table(rows, markdown=args.markdown))
    return 0


def _model_args(p):
    p.add_argument("--model", default=None,
                   help="base model: folder, .gguf, cached hub id, a full-tuning run folder, or "
                        "smollm2-135m-instruct (default: the adapter's base, else the embedded model)")
    p.add_argument("--adapter", default=None, help="an adapter folder (any method, or a PEFT LoRA) or a tunesmith run folder")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])


def _domain_arg(p):
    p.add_argument("--domain", default=None, metavar="NAME",
                   help="a model trained with one expert per data domain (MoE, enforced routing): run every token "
                        "through this domain's expert (eval: by default the task's own, e.g. sql, if it is a domain)")


def _fuse_args(p):
    p.add_argument("--fuse-small", default=None, metavar="SMALL",
                   help="logit fusion: the small base model the experts were tuned from (--model is the large one)")
    p.add_argument("--fuse-expert", action="append", default=[], metavar="EXPERT",
                   help="a tuned small model: adapter or run folder on SMALL, or a model folder (repeatable)")
    p.add_argument("--fuse-mode", default="dynamic", choices=["dynamic", "proxy"],
                   help="dynamic: α searched per token (Fan et al., 2024); proxy: fixed --fuse-alpha")
    p.add_argument("--fuse-alpha", type=float, default=1.0, help="α of proxy mode")


def _shots_arg(text: str):
    """`--shots`: one count stays an int (the single-evaluation path); a list or `max` stays text."""
    return int(text) if text.isdigit() else text


def _add_model_verbs(sub) -> None:
    """The verbs that use a trained model: generate, chat, export, eval (embed and mine: `cli/embeddings.py`)."""
    p = sub.add_parser("generate", help="complete JSONL prompts (`prompt` or `messages` per line)")
    _model_args(p)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    _domain_arg(p)
    _fuse_args(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("chat", help="talk to a model (with an adapter) in the terminal")
    _model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    _domain_arg(p)
    _fuse_args(p)
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("export", help="merge an adapter (LoRA family, IA3, sparse) into a plain transformers folder, "
                                      "or write a GGUF for llama.cpp / Ollama")
    _model_args(p)
    p.add_argument("--output", required=True, help="the folder (hf) or the .gguf file (gguf, gguf-lora) to write")
    p.add_argument("--format", default="hf", choices=["hf", "gguf", "gguf-lora", "st"],
                   help="hf: a transformers folder; gguf: one .gguf (+ <name>.Modelfile for Ollama), an adapter "
                        "merged in; gguf-lora: a LoRA adapter as a GGUF LoRA (llama.cpp --lora); st: an embedder "
                        "as a sentence-transformers folder (SentenceTransformer(path) loads it)")
    p.add_argument("--quant", default=None, choices=["f32", "f16", "bf16", "q8_0"],
                   help="GGUF weight type (default f16; f32 for gguf-lora, which takes f32/f16/bf16)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("eval", help="measure a model (with an adapter) on a task")
    _model_args(p)
    p.add_argument("--task", required=True,
                   help="sql, json, translate-XX (English -> XX; translate-XX-YY, translate-all), humaneval, "
                        "a JSONL task file, text:FILE for loss/perplexity, or "
                        "retrieval:builtin / retrieval:BEIR_FOLDER (with --model bm25 or an embedder), or "
                        "rerank:builtin / rerank:BEIR_FOLDER (BM25 top --top-k reranked by the model), or "
                        "passkey / needle / kv (long context) / position-ppl:FILE (loss by position)")
    p.add_argument("--metric", default=None, help="for task files: exact_match, contains, bleu, chrf, chrf++, sql, python")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples")
    p.add_argument("--shots", type=_shots_arg, default=0,
                   help="k training examples in the prompt (in-context baseline); a list such as 0,1,4,16,64,max "
                        "evaluates at each count (max: as many as fit the context) and writes a table and a curve")
    p.add_argument("--context", type=int, default=None,
                   help="--shots max: the context in tokens the prompt and answer must fit (default: the model's)")
    p.add_argument("--samples", type=int, default=1, help="samples per example (for pass@k); passkey/needle/kv: "
                                                           "prompts per length x depth cell")
    p.add_argument("--k", default="1", help="comma-separated k for pass@k, e.g. 1,5")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="where the per-example JSON goes")
    p.add_argument("--top-k", type=int, default=20, help="rerank: BM25 candidates per query")
    p.add_argument("--mode", default="full", choices=["full", "window"],
                   help="rerank: all candidates in one prompt, or sliding windows back to front")
    p.add_argument("--window", type=int, default=20, help="rerank --mode window: candidates per window")
    p.add_argument("--step", type=int, default=10, help="rerank --mode window: how far each window moves")
    p.add_argument("--passage-tokens", type=int, default=100, help="rerank: each passage cut to this many tokens")
    from .long_context import add_long_args

    add_long_args(p)
    _domain_arg(p)
    _fuse_args(p)
    p.set_defaults(fn=cmd_eval)

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune, evaluate and export open LLMs.")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("train", help="train a recipe: tunesmith train RECIPE [key=value ...]")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="a.b=c overrides, e.g. train.lr=1e-4 method.name=full")
    p.set_defaults(fn=cmd_train)

    from .data import add_data_verb

    add_data_verb(sub)

    _add_model_verbs(sub)
    from .embeddings import add_embedding_verbs
    from .grow import add_grow_verb
    from .merge import add_merge_verb
    from .serve import add_serve_verb

    add_embedding_verbs(sub, _model_args)
    add_merge_verb(sub)
    add_grow_verb(sub)
    add_serve_verb(sub)
    from .synth import add_synth_verb

    add_synth_verb(sub, _model_args)
    from .dashboard import add_dashboard_verb
    from .plan import add_plan_verb

    add_plan_verb(sub)
    add_dashboard_verb(sub)

    p = sub.add_parser("quickstart", help="measure, LoRA-tune and re-measure the embedded model on the sql task")
    p.add_argument("--recipe", default="recipes/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="a.b=c overrides of the quickstart recipe")
    p.set_defaults(fn=cmd_quickstart)

    p = sub.add_parser("bench", help="time a recipe's training step: tokens/s, memory, MFU, where the time goes")
    p.add_argument("recipe", nargs="?", default=None)
    p.add_argument("overrides", nargs="*", help="recipe overrides, and steps=N / warmup=N")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 8; 2 per length with --lengths)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; 1 with --lengths)")
    p.add_argument("--lengths", default=None, help="time synthetic rows of these lengths instead, e.g. 1k,2k,4k,8k,16k "
                                                   "(each in a fresh process; long rows checkpoint where they must)")
    p.add_argument("--peak", action="store_true", help="measure this machine's bf16/fp32 matmul peak (cached for MFU)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-part timing step")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("estimate", help="predict a recipe's peak memory and step time without loading its weights")
    p.add_argument("recipe", nargs="?")
    p.add_argument("--sizes", action="store_true", help="memory of 0.5B/1B/3B/8B configs: bf16/int8/int4/nf4, full and LoRA")
    p.add_argument("--sizes-tokens", type=int, default=2048, help="tokens per micro-batch for --sizes")
    p.add_argument("overrides", nargs="*", help="recipe overrides")
    p.add_argument("--mfu", type=float, default=0.35,
                   help="share of the matmul peak a step reaches, for the time (tunesmith bench measures it)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.set_defaults(fn=cmd_estimate)

    p = sub.add_parser("prune", help="a smaller model from a Llama-family one: keep N evenly spaced decoder layers")
    p.add_argument("--model", default="smollm2-135m-instruct", help="the model to cut (any name `--model` takes)")
    p.add_argument("--keep", type=int, required=True, help="decoder layers to keep (first and last always kept)")
    p.add_argument("--output", required=True, help="the HF folder to write")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.set_defaults(fn=cmd_prune)

    p = sub.add_parser("methods", help="every tuning method with its trainable parameters on a model")
    p.add_argument("model", nargs="?", default=None, help="a model (default: the embedded smollm2-135m-instruct)")
    p.add_argument("--markdown", action="store_true", help="a markdown table with papers and when to pick each")
    p.set_defaults(fn=cmd_methods)

    p = sub.add_parser("recipe", help="every recipe key with its default and meaning")
    p.add_argument("--markdown", action="store_true", help="as the README's table")
    p.set_defaults(fn=cmd_recipe)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command line (not a call from Python): train and measure on jemalloc if present
        from ..runtime import reexec_with_allocator

        reexec_with_allocator(sys.argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except _user_errors() as e:
        print(f"tunesmith: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tunesmith: interrupted", file=sys.stderr)
        return 130

