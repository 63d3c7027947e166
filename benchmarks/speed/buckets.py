"""Packed attention with length buckets against one batch padded to the row's longest document,
A/B in one process (the bucket ratio is the only change; 0 = one bucket), alternating, 2 repeats.

    python benchmarks/speed/buckets.py recipes/lora-sft.yaml train.batch_tokens=2048
    python benchmarks/speed/buckets.py recipes/lora-sft.yaml train.batch_tokens=4096 \
        data.train=TEXT.jsonl data.format=text data.max_length=2048 data.val_fraction=0

(TEXT.jsonl: `python benchmarks/gpu/make_model.py --text TEXT.jsonl --docs 400`.)
"""
import os
import sys

from tunesmith.bench.throughput import bench
from tunesmith.models import attention
from tunesmith.recipe import load_recipe

recipe, overrides = sys.argv[1], sys.argv[2:]
ratios = [float(x) for x in os.environ.get("RATIOS", "0,0.75").split(",")]
for rep in range(2):
    for ratio in ratios:
        attention.BUCKET_RATIO = ratio
        r = bench(load_recipe(recipe, overrides), steps=3, warmup=1, breakdown=False)
        print(f"ratio {ratio}: {r.tokens_per_s:.0f} tokens/s, {r.s_per_step:.2f} s/step", flush=True)
