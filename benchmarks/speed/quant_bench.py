"""LoRA over an fp32 / bf16 / int8 / int4 / NF4 base (model.quantize): training tokens/s and peak RSS,
as `tunesmith bench` measures them, each configuration in its own process (peak RSS is per process),
interleaved, `REPEATS` rounds (default 2) of `STEPS` timed steps (default 3) after one warm-up;
`CONFIGS=fp32,int8` picks some.

    OMP_NUM_THREADS=2 python benchmarks/speed/quant_bench.py recipes/lora-sft.yaml train.batch_tokens=2048

fp32 = model.frozen_dtype=same + train.precision=fp32; bf16 = frozen_dtype=bf16 + precision=bf16
(the recipe's default); int8 / int4 / nf4 = the fp32 run with the frozen decoder Linears quantised
after the method is attached (what `model.quantize` does), computed in fp32. The quantised bytes of
the base's decoder Linears are printed beside (the weight memory the format saves).
"""
import json
import os
import subprocess
import sys

CONFIGS = {
    "fp32": (["model.frozen_dtype=same", "train.precision=fp32"], "none"),
    "bf16": (["model.frozen_dtype=bf16", "train.precision=bf16"], "none"),
    "int8": (["model.frozen_dtype=same", "train.precision=fp32"], "int8"),
    "int4-g64": (["model.frozen_dtype=same", "train.precision=fp32"], "int4"),
    "nf4": (["model.frozen_dtype=same", "train.precision=fp32"], "nf4"),
}


def linear_bytes(model) -> int:
    """Bytes held by the decoder Linears' base weights (dense or quantised)."""
    from tunesmith.models.quant import QuantizedWeight, _block_linears

    total = 0
    for _, mod in _block_linears(model):
        w = mod.weight
        total += w.nbytes() if isinstance(w, QuantizedWeight) else w.numel() * w.element_size()
    return total


def one(name: str, recipe_path: str, overrides: list[str]) -> dict:
    import tunesmith.train.prepare as prepare
    from tunesmith.bench.throughput import bench
    from tunesmith.models.quant import quantize_frozen
    from tunesmith.recipe import load_recipe

    extra, mode = CONFIGS[name]
    original, held = prepare.prepare_model, {}

    def quantised(recipe, model=None, tokenizer=None):
        model, tokenizer, method = original(recipe, model, tokenizer)
        quantize_frozen(model, mode, 64)
        held["linear_bytes"] = linear_bytes(model)
        return model, tokenizer, method

    prepare.prepare_model = quantised
    r = bench(load_recipe(recipe_path, [*overrides, *extra]), steps=int(os.environ.get("STEPS", "3")), warmup=1,
              breakdown=False)
    return {"config": name, "tokens_per_s": r.tokens_per_s, "s_per_step": r.s_per_step,
            "peak_rss_gb": r.peak_mem_gb, "linear_mb": held["linear_bytes"] / 1e6}


def main() -> None:
    if sys.argv[1] == "--one":
        print("RESULT " + json.dumps(one(sys.argv[2], sys.argv[3], sys.argv[4:])), flush=True)
        return
    names = os.environ.get("CONFIGS", ",".join(CONFIGS)).split(",")
    rows = []
    for rep in range(int(os.environ.get("REPEATS", "2"))):
        for name in names:
            out = subprocess.run([sys.executable, __file__, "--one", name, *sys.argv[1:]], capture_output=True,
                                 text=True, check=True).stdout
            row = json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT ")))
            rows.append(row)
            print(f"round {rep + 1} {name:9s} {row['tokens_per_s']:7.1f} tokens/s  {row['s_per_step']:6.2f} s/step  "
                  f"peak RSS {row['peak_rss_gb']:.2f} GB  decoder Linears {row['linear_mb']:.0f} MB", flush=True)
    print("\n| base | tokens/s (best of rounds) | peak RSS GB (min) | decoder Linear weights MB |")
    print("|---|---|---|---|")
    for name in names:
        mine = [r for r in rows if r["config"] == name]
        print(f"| {name} | {max(r['tokens_per_s'] for r in mine):.1f} | {min(r['peak_rss_gb'] for r in mine):.2f} | "
              f"{mine[0]['linear_mb']:.0f} |")


if __name__ == "__main__":
    main()
