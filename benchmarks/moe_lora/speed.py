"""Cost of MoE-LoRA against LoRA and full-expert MoE on SmolLM2-135M: trainable parameters, a training
step (forward + backward of one packed row holding an sql and a json record: two domains), a prefill
forward and greedy decoding with the KV cache, each method's model built from the same base and timed in interleaved
rounds (the machine is shared: only ratios measured side by side in one sitting mean anything).

    nice -n 5 python benchmarks/moe_lora/speed.py      # writes benchmarks/moe_lora/results.json after every round
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from tunesmith.data import collate
from tunesmith.data.render import Renderer
from tunesmith.data.sources import read_records
from tunesmith.methods import attach, build_method, cast_frozen, count_parameters
from tunesmith.models.load import load_model
from tunesmith.models.moe import routing
from tunesmith.objectives.sft import causal_lm_loss
from tunesmith.recipe import method_from_dict

CONFIGS = [
    ("lora r16 all-linear", "lora", {"rank": 16, "alpha": 32}),
    ("moe_lora E=2 enforced r8", "moe_lora", {"experts": 2, "routing": "enforced"}),
    ("moe_lora E=4 learned top-2 r8", "moe_lora", {"experts": 4, "top_k": 2}),
    ("moe E=2 enforced (full experts)", "moe", {"experts": 2}),
]
ROUNDS, NEW_TOKENS, ROW_TOKENS = 5, 8, 256
PROMPT = "List the names of employees hired in 2019, with their salary and city, ordered by salary."


def batch_of_two_domains(tokenizer) -> dict:
    """One packed row of sql and json records, alternating (route ids 1 and 0), about ROW_TOKENS tokens."""
    renderer = Renderer(tokenizer)
    samples, n = [], 0
    for record in read_records("task:sql/train+task:json/train"):
        sample = renderer(record.fields["messages"])
        sample["domain"] = 1 if record.fields["domain"] == "sql" else 0
        samples.append(sample)
        n += len(sample["input_ids"])
        if n > ROW_TOKENS:
            break
    return collate(samples, packing=True, pad_id=tokenizer.pad_token_id or 0)


def build(base, name, opts):
    """A copy of the base with the method attached, frozen weights in bf16 (the recipes' frozen_dtype)."""
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    attach(model, build_method(method_from_dict(name, opts)))
    cast_frozen(model, torch.bfloat16)
    return model


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def train_step(model, batch):
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, n, _ = causal_lm_loss(model, batch)
    (loss / n).backward()
    model.zero_grad(set_to_none=True)


def prefill(model, batch):
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        causal_lm_loss(model, batch)


def decode(model, prompt_ids, enforced: bool):
    """Greedy decoding of NEW_TOKENS tokens with the KV cache (a fixed count: no stop at end-of-turn),
    an enforced-routing model on expert 1 (the sql domain), a learned one on its router."""
    model.eval()
    with torch.no_grad(), routing(model, 1 if enforced else None), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(prompt_ids, use_cache=True)
        for _ in range(NEW_TOKENS):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(nxt, past_key_values=out.past_key_values, use_cache=True)


def main() -> None:
    torch.set_num_threads(2)
    base, tokenizer = load_model("smollm2-135m-instruct", "fp32")
    batch = batch_of_two_domains(tokenizer)
    tokens = int(batch["input_ids"].numel())
    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids.repeat(2, 1)  # (2, P)
    models = [(label, name, opts.get("routing", "enforced") == "enforced" and name != "lora", build(base, name, opts))
              for label, name, opts in CONFIGS]
    times = {label: {"train": [], "prefill": [], "decode": []} for label, *_ in models}
    for r in range(ROUNDS):  # interleaved: every method sees the same machine load, round by round
        for label, name, enforced, model in models:
            times[label]["train"].append(timed(lambda: train_step(model, batch)))
            times[label]["prefill"].append(timed(lambda: prefill(model, batch)))
            times[label]["decode"].append(timed(lambda: decode(model, prompt_ids, enforced)))
        write(models, times, tokens, r + 1)  # after every round: a cut-short sitting keeps what it measured
        print(f"round {r + 1}/{ROUNDS} done", file=sys.stderr, flush=True)


def write(models, times, tokens: int, rounds: int) -> None:
    """results.json: per method, its parameter counts, every round's seconds and the tokens/s they give."""
    rows = []
    for label, name, _, model in models:
        trainable, total = count_parameters(model)
        row = {"method": label, "trainable": trainable, "total": total}
        for part, count in (("train", tokens), ("prefill", tokens), ("decode", 2 * NEW_TOKENS)):
            row[f"{part}_s"] = times[label][part]  # every round, in order
            row[f"{part}_tok_s_best"] = count / min(times[label][part])  # the least-disturbed round
            row[f"{part}_tok_s_median"] = count / statistics.median(times[label][part])
        rows.append(row)
    out = {"tokens_per_row": tokens, "rounds": rounds, "new_tokens": NEW_TOKENS, "decode_batch": 2, "rows": rows}
    Path(__file__).with_name("results.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
