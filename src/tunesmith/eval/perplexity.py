"""Loss and perplexity of a model on text (any data file the `data` pipeline reads)."""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity(model, tokenizer, path: str, *, limit: int | None = None, max_length: int = 1024,
               batch_tokens: int = 4096, fmt: str = "auto") -> dict:
    """Token-weighted mean NLL over the trained tokens of `path` (all tokens for text; the answers
    for chats) and its exponential."""
    from ..data import collate, load_data, plan_batches
    from ..train.loop import mean_loss
    from ..recipe import DataConfig

    cfg = DataConfig(train=path, format=fmt, max_length=max_length, limit=limit, shuffle=False)
    samples = load_data(cfg, tokenizer).train
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    plan = plan_batches([len(s["input_ids"]) for s in samples], packing=True, batch_tokens=max(batch_tokens, max_length),
                        batch_size=1, seed=0, epoch=0, shuffle=False)
    batches = (collate([samples[i] for i in rows], packing=True, pad_id=pad) for rows in plan)
    mean, count = mean_loss(model, batches, model.device)
    return {"samples": len(samples), "tokens": count, "loss": mean, "perplexity": math.exp(min(mean, 50))}
