"""An 8B Llama-architecture model (Llama-3-8B's shape) with random weights, LoRA, one GPU:
`tunesmith bench`'s tokens/s, MFU and peak memory, to set beside torchtune's published 8B LoRA
figure (4,699 tokens/s on one A6000).

The model is built on the meta device (no memory, no download) and materialised on the GPU in
bf16 (16 GB), its weights drawn N(0, 0.02) there: speed and memory do not depend on their values.
`tunesmith.bench.throughput.bench` then runs as for any recipe, its model loader pointed at this
model; the tokenizer (and so the data's token ids, all below the 128,256-token vocabulary) is the
embedded model's.

    python benchmarks/gpu/llama8b.py --tokenizer FOLDER --data text.jsonl --json OUT.json
    python benchmarks/gpu/llama8b.py --size tiny --device cpu ...   # the dry run: a 2-layer model
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Llama-3-8B (and 3.1): what torchtune's 8B LoRA figure trained
SHAPES = {
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "rope_theta": 500000.0,
           "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128256, "rope_theta": 500000.0,
             "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
}


def build(size: str, device, dtype):
    """The model on `device` in `dtype`, via the meta device: no full-size fp32 copy ever exists."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[size], attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            else:  # RMSNorm scales
                p.fill_(1.0)
    # rotary frequencies are a buffer computed at construction, lost on the meta device: rebuild it
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)  # built on the CPU: tiny
    model.config.use_cache = False
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="a folder with the embedded model's tokenizer")
    p.add_argument("--data", required=True, help="text JSONL to train on")
    p.add_argument("--size", choices=sorted(SHAPES), default="8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("overrides", nargs="*", help="more recipe overrides (key=value)")
    args = p.parse_args()

    import torch

    from tunesmith.bench.throughput import bench, format_bench
    from tunesmith.models.load import load_tokenizer
    from tunesmith.recipe import load_recipe
    from tunesmith.train import prepare

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = build(args.size, device, dtype)
    built_s = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    print(f"[llama8b] {args.size}: {n / 1e9:.2f}B parameters in {dtype}, built on {device} in {built_s:.1f} s", flush=True)
    recipe = load_recipe(ROOT / "recipes" / "lora-sft.yaml", [
        f"model.name={args.tokenizer}", f"data.train={args.data}", "data.format=text", "data.val_fraction=0",
        f"data.max_length={args.max_length}", f"train.batch_tokens={args.batch_tokens}", f"train.device={args.device}",
        *([] if device.type == "cuda" else ["train.precision=fp32", "model.frozen_dtype=same"]), *args.overrides])
    tokenizer = load_tokenizer(args.tokenizer)
    prepare._load = lambda recipe: (model, tokenizer)  # bench's loader: this model, not a folder's
    result = bench(recipe, steps=args.steps, warmup=args.warmup)
    print(format_bench(result))
    if args.json:
        figures = dataclasses.asdict(result)
        figures["info"].update({"model": f"llama-{args.size} (random weights)", "parameters_total": n,
                                "build_s": built_s, "torchtune_8b_lora_a6000_tokens_per_s": 4699})
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()
