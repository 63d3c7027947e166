"""Write a randomly initialised model folder with the embedded model's architecture (or a ~1B
scale-up of it) and its tokenizer, plus a text JSONL to train on: what the GPU check benchmarks.

Speed and memory do not depend on the weights' values, so random weights stand in for the real ones
(and a ~1B model needs no download).

    python benchmarks/gpu/make_model.py --src TOKENIZER_AND_CONFIG_FOLDER --out DIR --size 1b
    python benchmarks/gpu/make_model.py --text DIR/text.jsonl --docs 2000
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

# The embedded model's family (SmolLM2: Llama blocks, 49152-token vocabulary, tied embeddings),
# scaled to ~1.1B parameters with a TinyLlama-like shape.
SIZES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,  # the dry run's
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
    "135m": {},
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
           "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 64},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")


def make_model(src: Path, out: Path, size: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    for key, value in SIZES[size].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return sum(p.numel() for p in model.parameters())


def write_text(path: Path, docs: int) -> None:
    """Variable-length English prose (Python's bundled documentation topics), cycled to `docs`."""
    from pydoc_data import topics

    texts = [topics.topics[k].strip() for k in sorted(topics.topics)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(docs):
            f.write(json.dumps({"text": texts[i % len(texts)]}) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, help="folder with config.json and the tokenizer files")
    p.add_argument("--out", type=Path)
    p.add_argument("--size", choices=sorted(SIZES), default="135m")
    p.add_argument("--text", type=Path, help="write a text JSONL here")
    p.add_argument("--docs", type=int, default=2000)
    args = p.parse_args()
    if args.text:
        write_text(args.text, args.docs)
        print(f"wrote {args.docs} documents to {args.text}")
    if args.out:
        n = make_model(args.src, args.out, args.size)
        print(f"wrote {args.size} ({n / 1e6:.0f}M parameters, random weights) to {args.out}")


if __name__ == "__main__":
    main()
