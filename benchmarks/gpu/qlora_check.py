"""QLoRA on CUDA: NF4 base (bitsandbytes' dequantisation kernel on our layout) + LoRA, checked and timed.

    python benchmarks/gpu/qlora_check.py                 # parity, then 1B and 8B timings
    python benchmarks/gpu/qlora_check.py --sizes 1B      # parity and the 1B timing only

1. parity: bitsandbytes' CUDA dequantisation of our NF4 tensors equals our own (torch) one; a tiny
   Llama with LoRA over an NF4 base matches its dequantised reference in forward and in the LoRA
   gradients (bf16 autocast), and the base receives no gradient;
2. speed and memory: LoRA (rank 16, all linear) training steps on a random Llama-3.2-1B / Llama-3.1-8B
   shaped model (estimate_sizes.SIZES), bf16 base against NF4 and int8 bases, 2048 tokens per step
   (one row), bf16 autocast, AdamW: tokens/s and torch.cuda.max_memory_allocated.
Prints one JSON line per result; with $OUT set, also writes $OUT/qlora_check.json.
"""
import argparse
import json
import os
import sys
import time

import torch

RESULTS = []


def emit(**row):
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def lora_model(config, rank=16):
    from transformers import AutoModelForCausalLM

    from tunesmith.methods import attach, build_method
    from tunesmith.recipe import load_recipe

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    method = build_method(load_recipe(None, ["method.name=lora", f"method.lora.rank={rank}"]).method)
    attach(model, method)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def parity():
    import copy

    from transformers import LlamaConfig

    from tunesmith.models.quant import QuantizedWeight, quantize_frozen

    w = torch.randn(256, 512, device="cuda")
    q = QuantizedWeight(w, "nf4")
    fast = q.dequantize(torch.float32)
    slow = q.to("cpu").dequantize(torch.float32).cuda()
    emit(check="nf4 bnb dequant == torch dequant", ok=bool(torch.equal(fast, slow)),
         max_abs=float((fast - slow).abs().max()))
    torch.manual_seed(0)
    tiny = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000)
    model = lora_model(tiny, rank=8)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    quantize_frozen(model, "nf4")
    ref = copy.deepcopy(model)
    for mod in ref.modules():
        if isinstance(getattr(mod, "weight", None), QuantizedWeight):
            dense = mod.weight.dequantize()
            del mod.weight
            mod.weight = torch.nn.Parameter(dense, requires_grad=False)
    ids = torch.randint(0, 1000, (2, 64), device="cuda")
    outs = []
    for m in (model, ref):
        with torch.autocast("cuda", torch.bfloat16):
            out = m(ids).logits.float()
        out.square().mean().backward()
        outs.append((out.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (a, ga), (b, gb) = outs
    worst = max(float((ga[n] - gb[n]).abs().max() / gb[n].abs().max().clamp(min=1e-12)) for n in ga)
    emit(check="nf4+LoRA vs dequantised reference", logits_max_abs=float((a - b).abs().max()),
         grad_max_rel=worst, ok=bool(torch.allclose(a, b, atol=2e-2) and worst < 2e-2),
         trained_outside_lora=[n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n])


def timing(size: str, base: str, tokens: int = 2048, steps: int = 5):
    from tunesmith.bench.estimate_sizes import size_config
    from tunesmith.models.quant import quantize_frozen

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = lora_model(size_config(size))
    if base != "bf16":
        quantize_frozen(model, base)
    torch.cuda.empty_cache()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 1):
        if i == 1:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    emit(size=size, base=base, method="lora r16 all-linear, checkpointing", tokens=tokens,
         tokens_per_s=round(tokens / dt, 1), peak_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2),
         gpu=torch.cuda.get_device_name())
    del model, opt


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1B,8B")
    parser.add_argument("--bases", default="bf16,nf4,int8")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("qlora_check: no CUDA device", file=sys.stderr)
        return 1
    parity()
    for size in args.sizes.split(","):
        for base in args.bases.split(","):
            try:
                timing(size, base)
            except torch.cuda.OutOfMemoryError as e:
                emit(size=size, base=base, error=f"out of memory: {e}"[:200])
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "qlora_check.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
