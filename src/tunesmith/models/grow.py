"""Depth up-scaling: a deeper model grown from a smaller one by repeating a span of its decoder
layers, then trained on (continued pretraining or fine-tuning "heals" the seam).

- SOLAR (Kim et al., 2023, "SOLAR 10.7B: Scaling LLMs with Simple yet Effective Depth Up-Scaling"):
  two copies of an n-layer model, the last m layers dropped from the first and the first m from
  the second, stacked: 2(n − m) layers (n = 32, m = 8 → 48). `--solar M`.
- Yi-9B was grown from Yi-6B the same way, by repeating a span of middle layers (32 → 48).
  `--repeat A:B` repeats layers A..B−1 (Python slice, end excluded) right after themselves.

    tunesmith grow --model smollm2-135m-instruct --solar 6 --output grown/       # 30 → 48 layers
    tunesmith grow --model smollm2-135m-instruct --repeat 10:20 --output grown/  # 30 → 40 layers
    tunesmith train recipes/lora-sft.yaml model.name=grown/ method.name=full

`--identity` zeroes the residual writes (`o_proj`, `down_proj`) of every repeated copy, as LLaMA
Pro's block expansion does (Wu et al., 2024): each copy then adds nothing to the residual stream,
so the grown model computes exactly the original function until training moves the copies.
Without it (SOLAR, Yi) the loss right after growing is above the original's and falls as it heals.

The layer bookkeeping (deep copies, `layer_idx` for the KV cache, `num_hidden_layers` and per-layer
config lists) is `models.prune.arrange_layers`, shared with pruning.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .load import ModelError, load_model
from .prune import arrange_layers, decoder_layers, save_model_folder

RESIDUAL_WRITES = ("o_proj", "down_proj")
"The projections through which a Llama-family layer writes into the residual stream."


def solar_layers(total: int, drop: int) -> list[int]:
    """SOLAR's stack: layers 0..n−m−1 of one copy, then m..n−1 of the other."""
    if not 0 <= drop < total:
        raise ModelError(f"--solar M must be between 0 and the model's {total} layers minus one, got {drop}")
    return list(range(total - drop)) + list(range(drop, total))


def parse_span(text: str) -> tuple[int, int]:
    """`A:B` → (A, B)."""
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise ModelError(f"--repeat takes START:END (layer indices, end excluded, e.g. 10:20), got {text!r}") from None
    return start, end


def repeat_layers(total: int, start: int, end: int) -> list[int]:
    """Layers 0..end−1, then start..end−1 again, then end..n−1: the span repeated in place."""
    if not 0 <= start < end <= total:
        raise ModelError(f"--repeat {start}:{end} must satisfy 0 <= START < END <= {total} (the model's layers)")
    return list(range(end)) + list(range(start, end)) + list(range(end, total))


def repeated_positions(sources: list[int]) -> list[int]:
    """Positions in the grown stack whose layer index already appeared earlier: the copies."""
    seen: set[int] = set()
    copies = []
    for position, i in enumerate(sources):
        if i in seen:
            copies.append(position)
        seen.add(i)
    return copies


def grow_layers(model, sources: list[int], identity: bool = False):
    """Rebuild the decoder as `[layers[i] for i in sources]` (in place; returns `model`); with
    `identity`, the copies' residual writes are zeroed so the output is the original model's."""
    arrange_layers(model, sources)
    if identity:
        layers = decoder_layers(model)
        with torch.no_grad():
            for position in repeated_positions(sources):
                zeroed = [m for name, m in layers[position].named_modules() if name.split(".")[-1] in RESIDUAL_WRITES]
                if len(zeroed) != len(RESIDUAL_WRITES):
                    raise ModelError(f"--identity needs {' and '.join(RESIDUAL_WRITES)} in every decoder layer "
                                     f"(a Llama-family model); layer {position} has {len(zeroed)} of them")
                for module in zeroed:
                    module.weight.zero_()
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
    return model


def plan(total: int, solar: int | None = None, repeat: str | None = None) -> list[int]:
    """The grown stack's source indices from the CLI's choice (exactly one of `solar`, `repeat`)."""
    if (solar is None) == (repeat is None):
        raise ModelError("grow needs exactly one of --solar M or --repeat START:END")
    if solar is not None:
        return solar_layers(total, solar)
    return repeat_layers(total, *parse_span(repeat))


def grow_model(name: str, out_dir, *, solar: int | None = None, repeat: str | None = None,
               identity: bool = False, dtype: str = "fp32") -> tuple[Path, list[int]]:
    """Load `name`, grow it, save a transformers folder (atomically); returns (folder, source indices)."""
    model, tokenizer = load_model(name, dtype)
    sources = plan(len(decoder_layers(model)), solar, repeat)
    grow_layers(model, sources, identity)
    note = f"{name}\nlayers from: {sources}\nidentity copies: {identity}\n"
    return save_model_folder(model, tokenizer, out_dir, "grown_from.txt", note), sources
