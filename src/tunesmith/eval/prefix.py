"""Greedy generation for prompts that share a long prefix: a many-shot evaluation's instruction and k
demonstrations are the same before every question, so their keys and values are computed once and
every batch continues from a copy of them.

At 16 shots on `sql` the shared part is ~95% of each prompt, so this turns the cost of a point on the
shot curve from (questions x prompt) tokens of prefill into one prefix plus the questions. A batch
is laid out as [prefix | left padding | question], with the padding masked: the model's position ids
come from the attention mask (cumulative count of real tokens), so every question continues at the
position right after the prefix, as it would in one unpadded prompt, and the output is the one
`infer.generate.generate` gives (tests/test_many_icl.py checks it).
"""
from __future__ import annotations

import copy

import torch

MIN_PREFIX = 64  # below this the copy of the cache costs more than the prefill it saves


def _cache_arg() -> str:
    """The name `generate` takes a prefilled cache by: `cache` in newer transformers 5 releases,
    `past_key_values` (deprecated there) before."""
    try:
        from transformers.generation.utils import ALL_CACHE_NAMES
    except ImportError:
        return "past_key_values"
    return "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"


CACHE_ARG = _cache_arg()


def encode_prompts(tokenizer, prompts) -> list[list[int]]:
    """Token ids of each prompt as generation encodes it (chat template with the assistant turn opened)."""
    from ..infer.generate import render_prompt

    templated = getattr(tokenizer, "chat_template", None) is not None
    return tokenizer([render_prompt(tokenizer, p) for p in prompts], add_special_tokens=not templated)["input_ids"]


def shared_prefix(rows: list[list[int]]) -> int:
    """Length of the longest common prefix of the rows, leaving at least one token of each row after it."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for r in rows[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def generate_greedy(model, tokenizer, prompts, *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of `prompts` (in order); the shared prefix is prefilled once when it is long."""
    from ..infer.generate import generate, left_pad, stop_ids

    rows = encode_prompts(tokenizer, prompts)
    p = shared_prefix(rows)
    if p < MIN_PREFIX:
        return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    stops = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[str | None] = [None] * len(rows)
    try:
        with torch.inference_mode():
            prefix = torch.tensor([rows[0][:p]], device=device)
            cache = model(input_ids=prefix, use_cache=True).past_key_values  # (1, heads, p, head_dim) per layer
            order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                suffix, mask = left_pad([rows[i][p:] for i in idx], pad)
                ids = torch.cat([prefix.expand(len(idx), -1), suffix.to(device)], dim=1)
                attention = torch.cat([torch.ones(len(idx), p, dtype=mask.dtype), mask], dim=1).to(device)
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(len(idx))
                out = model.generate(input_ids=ids, attention_mask=attention, **{CACHE_ARG: past},
                                     max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                                     use_cache=True, do_sample=False, temperature=None, top_p=None, top_k=None)
                for i, row in zip(idx, out[:, ids.shape[1]:].tolist()):
                    end = next((j for j, t in enumerate(row) if t in stops), len(row))
                    results[i] = tokenizer.decode(row[:end], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return results
