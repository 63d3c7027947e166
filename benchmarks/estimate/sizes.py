"""Training memory of 0.5B / 1B / 3B / 8B Llama- and Qwen-shaped models in bf16 / int8 / int4 / NF4,
full fine-tuning and LoRA (rank 16, all linear layers), from meta-device models (no weights):
`tunesmith.bench.estimate_sizes`. Writes benchmarks/estimate/sizes.md.

    python benchmarks/estimate/sizes.py                 # 2048 tokens per micro-batch
    python benchmarks/estimate/sizes.py --tokens 4096
"""
import argparse
from pathlib import Path

from tunesmith.bench.estimate_sizes import SIZES, format_sizes, size_table

parser = argparse.ArgumentParser()
parser.add_argument("--tokens", type=int, default=2048)
parser.add_argument("--rank", type=int, default=16)
parser.add_argument("--out", default=str(Path(__file__).with_name("sizes.md")))
args = parser.parse_args()
rows = size_table(tokens=args.tokens, rank=args.rank)
table = format_sizes(rows, args.tokens)
command = "python benchmarks/estimate/sizes.py" + (f" --tokens {args.tokens}" if args.tokens != 2048 else "") + \
    (f" --rank {args.rank}" if args.rank != 16 else "")
header = f"""# What fits: training memory by model size, base format and method

Made by `{command}` (meta-device models, no weights; `tunesmith.bench.estimate_sizes`, whose
docstring says what each part counts). GB = 1e9 bytes. One micro-batch of {args.tokens} tokens in one
row, AdamW, fp32 master weights and gradients for what trains, bf16 compute; LoRA rank {args.rank}
on every decoder Linear; int4 = group 64 with fp32 scale and zero (5 bits per weight); nf4 = QLoRA's
NormalFloat-4, block 64, fp32 absmax (4.5 bits per weight, no double quantisation). Embeddings,
lm_head and norms stay bf16. Peak = weights + AdamW + max(activations + head transient, gradients);
add the runtime (≈0.5 GB for a CPU process, ≈0.5-1 GB of CUDA context) and allocator slack.
Configs: {', '.join(f'{k} = ' + ('Qwen2.5-0.5B' if v[0] == 'qwen2' else {'1B': 'Llama-3.2-1B', '3B': 'Llama-3.2-3B', '8B': 'Llama-3.1-8B'}[k]) for k, v in SIZES.items())}.

"""
Path(args.out).write_text(header + table + "\n")
print(table)
