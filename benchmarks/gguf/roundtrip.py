"""GGUF export of the embedded SmolLM2-135M-Instruct with a LoRA adapter, checked by the real consumer.

    python benchmarks/gguf/roundtrip.py                       # trains a 5-step LoRA run first (~2 min)
    python benchmarks/gguf/roundtrip.py --adapter runs/x      # an existing LoRA adapter or run folder
    python benchmarks/gguf/roundtrip.py --max-new-tokens 16 --prompts 5   # smoke run

1. The adapter (a short `tunesmith train recipes/lora-sft.yaml` run at lr 1e-3, so it changes the
   model) is merged into the base with `export_merged` (fp32): the reference transformers model.
2. The merged folder is written as GGUF at f16, bf16 and q8_0 (`export_gguf`): file size and export
   time (load + convert + write, one run each).
3. On 20 chat prompts, greedy continuations (the chat template rendered by the HF tokenizer) from the
   reference model and from llama.cpp (llama-cpp-python) running each GGUF from the same prompt ids:
   identical outputs, and the mean length of the common prefix. llama.cpp's own tokenization of
   each rendered prompt is compared with the HF tokenizer's too.
4. The GGUF LoRA path: the base as an f32 GGUF plus the adapter as a GGUF LoRA (`export_gguf_lora`),
   applied by llama.cpp at load, against the merged f32 GGUF in llama.cpp and against the reference.
Without llama-cpp-python, steps 3-4 use transformers' GGUF loader (no LoRA path) and say so.
Results: results.json and results.md beside this script.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain what a prime number is.",
    "Give me three tips for learning to cook.", "What is 17 times 23?", "Translate 'good morning' into Spanish.",
    "Why is the sky blue?", "Write a Python function that reverses a string.", "Name the planets of the solar system.",
    "What does a compiler do?", "Summarise the plot of Romeo and Juliet in two sentences.",
    "How do plants make their food?", "What is the difference between weather and climate?",
    "Suggest a name for a friendly robot.", "How many minutes are in a day?", "What is photosynthesis?",
    "List three uses of a paperclip.", "Describe a cat to someone who has never seen one.",
    "What is the boiling point of water at sea level?", "Write a short thank-you note to a teacher.",
]


def train_adapter(work: Path, threads: int) -> Path:
    """A 5-step LoRA run of recipes/lora-sft.yaml; returns its run folder."""
    cmd = [sys.executable, "-m", "tunesmith", "train", str(ROOT / "recipes" / "lora-sft.yaml"),
           f"data.train={ROOT / 'examples' / 'chat.jsonl'}", "train.steps=5", "train.lr=1e-3", "train.warmup=1",
           f"train.threads={threads}", "train.batch_tokens=2048", f"output_dir={work}", "name=lora",
           "train.eval_every=0", "train.save_every=0"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return work / "lora"


EOS = 2  # <|im_end|>: the end of the assistant's turn in SmolLM2's chat template


def until_eos(tokens: list[int]) -> list[int]:
    """The tokens up to and including the first eos: what a chat client shows."""
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def hf_greedy(model, prompts_ids, n):
    import torch

    outs = []
    with torch.no_grad():
        for ids in prompts_ids:
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=EOS,
                                 eos_token_id=EOS)
            outs.append(until_eos(out[0, len(ids):].tolist()))
    return outs


def llama_greedy(path: Path, prompts_ids, n, threads, lora: Path | None = None, kv_f32: bool = False):
    """Greedy tokens from llama.cpp: argmax of the last logits, fed back one token at a time."""
    import numpy as np
    from llama_cpp import Llama

    # logits_all: llama-cpp-python keeps no logits otherwise; the KV cache is llama.cpp's default (f16)
    # unless kv_f32 (type 0 = GGML_TYPE_F32)
    kv = {"type_k": 0, "type_v": 0} if kv_f32 else {}
    llm = Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=512, n_threads=threads,
                n_batch=512, logits_all=True, verbose=False, seed=0, **kv)
    outs = []
    for ids in prompts_ids:
        llm.reset()
        llm.eval(ids)
        toks = []
        for _ in range(n):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            toks.append(tok)
            if tok == EOS:
                break
            llm.eval([tok])
        outs.append(toks)
    return outs, llm


def gguf_greedy_transformers(path: Path, prompts_ids, n):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return hf_greedy(model, prompts_ids, n)


def cached(path: Path, key: dict, compute):
    """`compute()`, or its saved value when `path` holds one for the same `key` (a rerun skips the slow
    transformers generations)."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["value"]
    value = compute()
    path.write_text(json.dumps({"key": key, "value": value}))
    return value


def divergence_gaps(model, prompts_ids, reference, outs) -> list[float]:
    """For each output that differs: the reference's top-1 minus top-2 logit where they part (a small
    gap is a near tie that rounding can flip, a large one a real difference)."""
    import torch

    gaps = []
    with torch.no_grad():
        for ids, ref, out in zip(prompts_ids, reference, outs):
            k = next((i for i, (p, q) in enumerate(zip(ref, out)) if p != q), None)
            if k is None:
                continue
            top = model(torch.tensor([ids + ref[:k]])).logits[0, -1].topk(2).values
            gaps.append(round(float(top[0] - top[1]), 4))
    return gaps


def compare(a, b) -> dict:
    prefix = []
    for x, y in zip(a, b):
        k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x))
        prefix.append(k)
    return {"identical": sum(x == y for x, y in zip(a, b)), "of": len(a),
            "mean_common_prefix": round(sum(prefix) / len(prefix), 1)}


def run(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.export.gguf import export_gguf
    from tunesmith.export.merged import export_merged
    from tunesmith.models.load import DEFAULT_MODEL

    torch.set_num_threads(args.threads)
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    adapter = Path(args.adapter) if args.adapter else train_adapter(work, args.threads)
    merged = export_merged(DEFAULT_MODEL, adapter, work / "merged", dtype="fp32")
    tok = AutoTokenizer.from_pretrained(str(merged))
    prompts = PROMPTS[: args.prompts]
    rendered = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                for p in prompts]
    ids = [tok.encode(r, add_special_tokens=False) for r in rendered]
    ref_model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    key = {"adapter": str(adapter), "prompts": prompts, "n": args.max_new_tokens}
    reference = cached(work / "reference.json", key, lambda: hf_greedy(ref_model, ids, args.max_new_tokens))
    try:
        import llama_cpp  # noqa: F401
        consumer = "llama.cpp (llama-cpp-python %s)" % llama_cpp.__version__
    except ImportError:
        consumer = None
    result = {"adapter": str(adapter), "consumer": consumer or "transformers GGUF loader (llama-cpp-python absent)",
              "max_new_tokens": args.max_new_tokens, "prompts": len(prompts), "quants": {}}
    for quant in args.quants.split(","):
        t0 = time.perf_counter()
        written = export_gguf(merged, work / f"merged-{quant}.gguf", quant=quant, progress=False)
        seconds = time.perf_counter() - t0
        if consumer:
            outs, llm = llama_greedy(written.path, ids, args.max_new_tokens, args.threads)
            same_tok = sum(llm.tokenize(r.encode(), add_bos=False, special=True) == i for r, i in zip(rendered, ids))
            del llm
        else:
            outs, same_tok = gguf_greedy_transformers(written.path, ids, args.max_new_tokens), None
        result["quants"][quant] = {"bytes": written.bytes, "export_s": round(seconds, 2),
                                   "tokenizer_same_ids": same_tok, **compare(outs, reference),
                                   "gaps_where_different": divergence_gaps(ref_model, ids, reference, outs)}
        print(quant, result["quants"][quant], flush=True)
    if consumer:
        result["kv_f32"] = _kv_f32(merged, work, ids, reference, ref_model, args)
    result["merged_differs_from_base"] = cached(work / "base.json", key,
                                                lambda: _differs_from_base(ids, reference, args))
    if consumer:
        result["lora"] = _lora_path(adapter, work, ids, reference, args)
    return result


def _differs_from_base(ids, reference, args) -> dict:
    """How many greedy outputs the adapter changes (so the comparison is not of the base model alone)."""
    from tunesmith.models.load import load_model

    base, _ = load_model("smollm2-135m-instruct", "fp32")
    outs = hf_greedy(base.eval(), ids, args.max_new_tokens)
    return {"changed_outputs": sum(a != b for a, b in zip(outs, reference)), "of": len(ids)}


def _kv_f32(merged, work, ids, reference, ref_model, args) -> dict:
    """f32 and f16 GGUFs with an f32 KV cache: how much of a difference is llama.cpp's f16 cache."""
    from tunesmith.export.gguf import export_gguf

    out = {}
    for quant in ("f32", "f16"):
        path = work / f"merged-{quant}.gguf"
        if not path.is_file() or quant not in args.quants.split(","):
            path = export_gguf(merged, path, quant=quant, progress=False).path
        outs, _ = llama_greedy(path, ids, args.max_new_tokens, args.threads, kv_f32=True)
        gaps = divergence_gaps(ref_model, ids, reference, outs)
        out[quant] = {**compare(outs, reference), "gaps_where_different": gaps}
        print("kv f32", quant, out[quant], flush=True)
    return out


def _lora_path(adapter, work, ids, reference, args) -> dict:
    from tunesmith.export.gguf import export_gguf, export_gguf_lora
    from tunesmith.models.load import DEFAULT_MODEL

    base = export_gguf(DEFAULT_MODEL, work / "base-f32.gguf", quant="f32", progress=False)
    t0 = time.perf_counter()
    lora = export_gguf_lora(adapter, work / "lora-f32.gguf", progress=False)
    seconds = time.perf_counter() - t0
    merged32 = export_gguf(work / "merged", work / "merged-f32.gguf", quant="f32", progress=False)
    with_lora, _ = llama_greedy(base.path, ids, args.max_new_tokens, args.threads, lora=lora.path)
    merged_out, _ = llama_greedy(merged32.path, ids, args.max_new_tokens, args.threads)
    out = {"bytes": lora.bytes, "export_s": round(seconds, 2),
           "vs_merged_f32_gguf": compare(with_lora, merged_out), "vs_reference": compare(with_lora, reference),
           "merged_f32_gguf_vs_reference": compare(merged_out, reference)}
    print("lora", out, flush=True)
    return out


def write_table(result: dict, command: str) -> str:
    lines = ["# GGUF export: size, export time, and greedy outputs in the real consumer", "",
             f"    {command}", "",
             f"Machine: {result['machine']}. Consumer: {result['consumer']}. Adapter: a 5-step LoRA run of "
             "`recipes/lora-sft.yaml` (r=16, alpha 32, all linear layers, lr 1e-3) on the embedded "
             f"SmolLM2-135M-Instruct; it changes {result['merged_differs_from_base']['changed_outputs']} of "
             f"{result['merged_differs_from_base']['of']} greedy outputs of the base model.", "",
             f"Reference: the merged model in transformers (fp32), greedy, up to {result['max_new_tokens']} new tokens "
             f"(to the end of the turn) on {result['prompts']} chat prompts; llama.cpp runs each GGUF from the same "
             "prompt ids, greedy (argmax of its logits), with its default f16 KV cache.", "",
             "| GGUF | size (MiB) | export (s) | identical outputs | mean common prefix (tokens) | "
             "reference's top-1 − top-2 logit where an output parts | llama.cpp tokenizes the prompts the same |",
             "|---|---|---|---|---|---|---|"]
    for quant, r in result["quants"].items():
        same = "—" if r["tokenizer_same_ids"] is None else f"{r['tokenizer_same_ids']}/{r['of']}"
        lines.append(f"| {quant} | {r['bytes'] / 2**20:.1f} | {r['export_s']} | {r['identical']}/{r['of']} | "
                     f"{r['mean_common_prefix']} | {', '.join(map(str, r['gaps_where_different'])) or '—'} | {same} |")
    if "kv_f32" in result:
        lines += ["", "The same with llama.cpp's KV cache in f32 (`type_k=type_v=F32`) instead of f16:", "",
                  "| GGUF | identical outputs | mean common prefix | top-1 − top-2 where an output parts |",
                  "|---|---|---|---|"]
        for quant, c in result["kv_f32"].items():
            lines.append(f"| {quant} | {c['identical']}/{c['of']} | {c['mean_common_prefix']} | "
                         f"{', '.join(map(str, c['gaps_where_different'])) or '—'} |")
    if "lora" in result:
        lo = result["lora"]
        lines += ["", "GGUF LoRA (f32, %.1f MiB, exported in %s s) applied by llama.cpp at load on the base as an "
                  "f32 GGUF:" % (lo["bytes"] / 2**20, lo["export_s"]), "",
                  "| comparison | identical outputs | mean common prefix |", "|---|---|---|"]
        for key, label in [("vs_merged_f32_gguf", "base f32 GGUF + GGUF LoRA vs merged f32 GGUF (both llama.cpp)"),
                           ("vs_reference", "base f32 GGUF + GGUF LoRA vs merged transformers"),
                           ("merged_f32_gguf_vs_reference", "merged f32 GGUF vs merged transformers")]:
            c = lo[key]
            lines.append(f"| {label} | {c['identical']}/{c['of']} | {c['mean_common_prefix']} |")
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", default=None, help="a LoRA adapter or run folder (default: train one)")
    p.add_argument("--work", default="/tmp/tunesmith-gguf-bench", help="where the run and the files go")
    p.add_argument("--quants", default="f16,bf16,q8_0")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default=str(HERE))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args)
    result["machine"] = f"{cpu_name()}, {os.cpu_count()} CPUs, {args.threads} threads"
    command = "python benchmarks/gguf/roundtrip.py " + " ".join(sys.argv[1:])
    out = Path(args.out_dir)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "results.md").write_text(write_table(result, command.strip()))
    print(write_table(result, command.strip()))


if __name__ == "__main__":
    main()
