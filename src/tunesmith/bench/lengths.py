"""`tunesmith bench RECIPE --lengths 1k,2k,4k,8k,16k`: training speed and memory against row length.

    tunesmith bench recipes/lora-sft.yaml --lengths 1k,2k,4k,8k,16k --json lengths.json

For every length N the recipe's model, method and objective train on synthetic rows of exactly N
tokens (one document per row, every token trained; `data.max_length` = `train.batch_tokens` = N,
one row per step), and `tunesmith bench` times them. Each length runs in a fresh process, so each
peak memory is that length's own and not the high-water mark of a longer one before it.

Long rows get long-row settings by default: `tunesmith estimate` predicts the step's peak first,
and where it exceeds what this device has (available RAM on a CPU, the GPU's memory), the loss is
chunked (if it was not) and then activation checkpointing goes on; the table says what was chosen.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor

import torch

FIT_SHARE = 0.9  # of the device's memory a step may plan to use


@dataclasses.dataclass
class LengthRow:
    length: int
    tokens_per_s: float
    s_per_step: float
    peak_mem_gb: float
    estimated_gb: float
    checkpointing: bool
    loss_chunk: int
    mfu: float | None
    chosen: list[str]  # the long-row settings switched on for this length


def parse_lengths(text: str) -> list[int]:
    """`1k,2k,16k` (k = 1024) or `1000,3000` -> token counts, as given."""
    out = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", part)
        if not m or int(m[1]) == 0:
            raise ValueError(f"--lengths: `{part.strip()}` is not a length; write e.g. 1k,2k,4k or 1000,3000")
        out.append(int(m[1]) * (1024 if m[2] else 1))
    return out


def device_memory_gb(device: torch.device) -> float:
    """What one training process may use: the GPU's memory, or the RAM available now."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 1e9
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def at_length(recipe, length: int):
    """The recipe with rows of `length` tokens, one row per optimizer step."""
    r = recipe.model_copy(deep=True)
    r.data.max_length, r.data.packing = length, True
    r.train.batch_tokens, r.train.grad_accum, r.train.effective_batch = length, 1, None
    return r


def _fresh(fn, *args):
    """`fn(*args)` in a new process (spawned: nothing of this one's memory comes along)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _estimated_peak_gb(recipe) -> float:
    from .estimate import estimate

    return estimate(recipe).peak_gb


def long_row_settings(recipe, budget_gb: float) -> tuple[object, float, list[str]]:
    """The recipe with the loss chunked and then activation checkpointing on, each only if the
    estimated peak is still over `budget_gb`; the estimate of what was chosen; what was switched on."""
    r, chosen = recipe.model_copy(deep=True), []
    peak = _fresh(_estimated_peak_gb, r)
    if peak > budget_gb and r.train.loss_chunk == 0:
        r.train.loss_chunk = 1024
        chosen.append("loss chunked (1024)")
        peak = _fresh(_estimated_peak_gb, r)
    if peak > budget_gb and not r.train.activation_checkpointing:
        r.train.activation_checkpointing = True
        chosen.append("activation checkpointing")
        peak = _fresh(_estimated_peak_gb, r)
    return r, peak, chosen


def synthetic_rows(length: int, count: int, vocab: int, seed: int = 0) -> list[dict]:
    """`count` samples of exactly `length` random tokens, each trained on every token but the first."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (count, length), generator=g).tolist()
    return [{"input_ids": row, "weights": [0.0] + [1.0] * (length - 1)} for row in ids]


def _bench_length(recipe, steps: int, warmup: int) -> dict:
    from transformers import AutoConfig

    from ..models.load import resolve
    from .throughput import bench

    vocab = AutoConfig.from_pretrained(str(resolve(recipe.model.name))).vocab_size
    rows = synthetic_rows(recipe.data.max_length, warmup + steps, vocab, recipe.train.seed)
    return dataclasses.asdict(bench(recipe, steps=steps, warmup=warmup, breakdown=False, items=rows))


def bench_lengths(recipe, lengths: list[int], steps: int = 2, warmup: int = 1, budget_gb: float | None = None,
                  log=print) -> list[LengthRow]:
    """Time `steps` steps (after `warmup`) at every length, each in a fresh process (module docstring).
    `budget_gb` (default: this device's memory × FIT_SHARE) decides the long-row settings."""
    from ..objectives import objective_class
    from ..recipe import RecipeError
    from ..runtime import pick_device

    if not objective_class(recipe.objective.name).token_loss:
        raise RecipeError(f"tunesmith bench --lengths times objectives that train on plain token rows (sft); "
                          f"`{recipe.objective.name}` is not one")
    if budget_gb is None:
        budget_gb = FIT_SHARE * device_memory_gb(pick_device(recipe.train.device))
    out = []
    for n in lengths:
        r, estimated, chosen = long_row_settings(at_length(recipe, n), budget_gb)
        if chosen or estimated > budget_gb:
            fits = "fits" if estimated <= budget_gb else "still over: it may run out of memory"
            log(f"[tunesmith] {n} tokens: {' and '.join(chosen) or 'the recipe settings'}: estimated "
                f"{estimated:.2f} GB of {budget_gb:.2f} GB ({fits})")
        res = _fresh(_bench_length, r, steps, warmup)
        out.append(LengthRow(n, res["tokens_per_s"], res["s_per_step"], res["peak_mem_gb"], estimated,
                             r.train.activation_checkpointing, r.train.loss_chunk, res["mfu"], chosen))
        log(f"[tunesmith] {n} tokens: {res['tokens_per_s']:,.0f} tokens/s, {res['peak_mem_gb']:.2f} GB")
    return out


def run_lengths(recipe, lengths: str, steps: int | None, warmup: int | None, json_path: str | None) -> int:
    """`tunesmith bench RECIPE --lengths ...`: print the table (and write the rows to `json_path`)."""
    import json

    from ..recipe import RecipeError

    try:
        parsed = parse_lengths(lengths)
    except ValueError as e:
        raise RecipeError(str(e)) from None
    rows = bench_lengths(recipe, parsed, steps=2 if steps is None else steps, warmup=1 if warmup is None else warmup)
    print(format_lengths(rows))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    return 0


def format_lengths(rows: list[LengthRow]) -> str:
    lines = [f"{'length':>7} {'tokens/s':>10} {'s/step':>8} {'peak GB':>8} {'est. GB':>8} {'MFU':>6}  "
             "checkpointing  loss chunk"]
    for r in rows:
        mfu = f"{100 * r.mfu:5.1f}%" if r.mfu is not None else f"{'-':>6}"
        lines.append(f"{r.length:>7} {r.tokens_per_s:>10,.0f} {r.s_per_step:>8.2f} {r.peak_mem_gb:>8.2f} "
                     f"{r.estimated_gb:>8.2f} {mfu}  {'on' if r.checkpointing else 'off':<13}  {r.loss_chunk or 'off'}")
    return "\n".join(lines)
