"""The three data rows of benchmarks/vs_hf and how every system gets the same tokens.

  chat   the chat recipe's own data: examples/chat.jsonl (unit-conversion chats, one or two turns,
         ~76 tokens a sample with SmolLM2's template and its default system prompt), rendered as
         recipes/lora-sft.yaml renders it (max_length 1024, only assistant answers and their
         terminators train).
  short  short-sample chat (~50 tokens a sample): one-turn arithmetic questions with one-line
         answers, generated deterministically here (`short_chats`), rendered and masked the same way.
  prose  long English prose: Python's bundled documentation topics (`pydoc_data`, as
         benchmarks/methods/run.py's `general_text`), plain text, every token after a sample's first
         trains, cut to 2048 tokens.

tunesmith reads the source JSONL itself (chat or text format). For the HF and TRL runs the driver
renders the same file with tunesmith's own loader (the recipe's data section with the same
overrides) and writes the result as pre-tokenized records, `{"input_ids", "labels"}` with -100 where
tunesmith's loss weight is 0, so every side trains exactly the same ids at the same positions; it
also writes tunesmith's packing plan of them for hf-best. The source is cycled until neither the
packed plan nor hf-default's 8 samples a step run out inside a run.
"""
from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ROWS = {
    "chat": {"format": "chat", "max_length": 1024,
             "title": "(a) chat recipe data: examples/chat.jsonl, prompts masked"},
    "short": {"format": "chat", "max_length": 1024,
              "title": "(b) short-sample chat (~50 tokens a sample), prompts masked"},
    "prose": {"format": "text", "max_length": 2048,
              "title": "(c) long prose: Python documentation topics, every token trained"},
}


def general_text():
    """`general_text` of benchmarks/methods/run.py (loaded by path: the driver is also called run.py)."""
    spec = importlib.util.spec_from_file_location("methods_run", HERE.parent / "methods" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.general_text


def short_chats(n: int, seed: int = 0) -> list[dict]:
    """`n` one-turn chats of ~50 tokens (with SmolLM2's default system prompt): a short arithmetic
    question and a one-line worked answer. Deterministic in (n, seed)."""
    rng = random.Random(seed)
    asks = [("What is {a} plus {b}?", "{a} + {b} = {r}.", lambda a, b: a + b),
            ("Add {a} and {b}.", "{a} + {b} = {r}.", lambda a, b: a + b),
            ("What is {a} minus {b}?", "{a} - {b} = {r}.", lambda a, b: a - b),
            ("What is {a} times {b}?", "{a} × {b} = {r}.", lambda a, b: a * b),
            ("Multiply {a} by {b}.", "{a} × {b} = {r}.", lambda a, b: a * b),
            ("What is double {a}?", "2 × {a} = {r}.", lambda a, b: 2 * a)]
    out = []
    for _ in range(n):
        question, answer, op = rng.choice(asks)
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        r = op(a, b)
        out.append({"messages": [{"role": "user", "content": question.format(a=a, b=b)},
                                 {"role": "assistant", "content": answer.format(a=a, b=b, r=r)}]})
    return out


def source_records(row: str, work: Path) -> list[str]:
    """One cycle of the row's source, as JSONL lines."""
    if row == "chat":
        return [line for line in (ROOT / "examples" / "chat.jsonl").read_text().splitlines() if line.strip()]
    if row == "short":
        return [json.dumps(r) for r in short_chats(400)]
    docs = general_text()(work / "docs.jsonl", 10**6)  # all of them (~80)
    return [line for line in docs.read_text().splitlines() if line.strip()]


def data_overrides(row: str, path: Path, max_length: int | None = None) -> list[str]:
    """tunesmith's data overrides for a row's source file (the bench command and the loader here)."""
    spec = ROWS[row]
    return [f"data.train={path}", f"data.format={spec['format']}", "data.validation=null", "data.val_fraction=0",
            f"data.max_length={max_length or spec['max_length']}", "data.overflow=truncate", "data.packing=true",
            "data.shuffle=false"]


def render(recipe_path: Path, overrides: list[str]) -> list[dict]:
    """The training samples tunesmith builds from the recipe with these overrides (input_ids, weights)."""
    from tunesmith.models.load import load_tokenizer
    from tunesmith.objectives import objective_class
    from tunesmith.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    tokenizer = load_tokenizer(recipe.model.name)
    return list(objective_class(recipe.objective.name).load(recipe, tokenizer).train)


def prepare_row(row: str, args, recipe_path: Path, work: Path) -> dict:
    """Write a row's source (cycled), its pre-tokenized samples and tunesmith's packed plan of them."""
    from tunesmith.data.batching import plan_batches

    folder = work / "data" / row
    folder.mkdir(parents=True, exist_ok=True)
    once = source_records(row, folder)
    total = args.warmup + args.steps
    max_length = args.max_length or ROWS[row]["max_length"]
    source = folder / "source.jsonl"
    source.write_text("\n".join(once) + "\n")
    lengths_once = [len(s["input_ids"]) for s in render(recipe_path, data_overrides(row, source, max_length))]

    def plan(lengths):
        return plan_batches(lengths, packing=True, batch_tokens=args.batch_tokens, batch_size=8, seed=0, epoch=0,
                            shuffle=False)

    # Enough cycles that no plan runs out inside a run; the last packed rows (partly filled) stay beyond it.
    cycles = next(c for c in range(1, 10**4)
                  if len(plan(lengths_once * c)) >= total + 4 and len(lengths_once) * c >= total * 8)
    source.write_text("\n".join(once * cycles) + "\n")
    samples = render(recipe_path, data_overrides(row, source, max_length))
    lengths = [len(s["input_ids"]) for s in samples]
    packed = plan(lengths)
    pretokenized = folder / "samples.jsonl"
    with pretokenized.open("w") as f:
        for s in samples:
            labels = [t if w > 0 else -100 for t, w in zip(s["input_ids"], s["weights"])]
            f.write(json.dumps({"input_ids": s["input_ids"], "labels": labels}) + "\n")
    plan_file = folder / "packed_batches.json"
    plan_file.write_text(json.dumps(packed))
    units = [sum(1 for w in s["weights"] if w > 0) for s in samples]
    expected = sum(units[j] for r in packed[args.warmup:total] for j in r)
    print(f"[vs_hf] {row}: {len(once)} records × {cycles} = {len(samples)} samples, {sum(lengths):,} tokens "
          f"(mean {sum(lengths) / len(lengths):.0f}, ≤{max_length}), {sum(units):,} trained; {len(packed)} packed "
          f"rows of ≤{args.batch_tokens} tokens", flush=True)
    return {"row": row, "source": str(source), "samples_file": str(pretokenized), "plan": str(plan_file),
            "max_length": max_length, "format": ROWS[row]["format"], "records": len(once), "cycles": cycles,
            "samples": len(samples), "tokens": sum(lengths), "trained_tokens": sum(units),
            "mean_sample_tokens": sum(lengths) / len(lengths), "mean_trained_tokens": sum(units) / len(units),
            "packed_rows": len(packed), "tunesmith_expected_trained_tokens": expected}
