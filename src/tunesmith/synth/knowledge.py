"""Knowledge-preference training data (HierPref-style, methods.md §14): questions whose answer must
follow instruction knowledge > context knowledge > parametric knowledge, as chat records for SFT.

    stats = synthesize_knowledge("data/hierpref", n=600, seed=1)
    # data/hierpref/train.jsonl  -> tunesmith train recipes/lora-sft.yaml data.train=data/hierpref/train.jsonl
    # data/hierpref/raw.jsonl    -> every record's condition, sources and fact (provenance)
    # data/hierpref/stats.json   -> counts by condition, build time

The records come from the `knowledge` task's builder (data/tasks/knowledge.py), not from sampling a
model: the paper writes its questions with GPT-4o from Wikidata, here a synthetic world of made-up
entities stands in for the facts no model knows, and the real facts are the ones the embedded model
was checked to know. The mix of conditions is knowledge.MIX (parametric 10%, context support 10%,
context conflict 15%, instruction conflict 15%, instruction + noise 10%, context + noise 15%,
multi-hop through the context 15%, multi-hop through parametric knowledge 10%). Records are drawn
from the training split of world seed `world_seed`: evaluate with `tunesmith eval --task knowledge
--seed <world_seed>` and no test entity or test fact is in the data; `seed` varies the questions.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from ..data.tasks import task_records
from ..jsonl import write_json, write_jsonl
from ..data.tasks.knowledge import GROUPS, MIX, KnowledgeError, KnowledgeTask


def knowledge_task(n: int, seed: int = 0, world_seed: int = 0, mix: dict[str, float] | None = None) -> KnowledgeTask:
    """The task whose training split is the synthesized data."""
    if n < 1:
        raise KnowledgeError(f"--n must be at least 1 (got {n})")
    return KnowledgeTask(seed=world_seed, n_train=n, mix=mix, draw=seed)


def synthesize_knowledge(out_dir: str | Path, *, n: int = 600, seed: int = 0, world_seed: int = 0,
                         mix: dict[str, float] | None = None) -> dict:
    """Write raw.jsonl, train.jsonl and stats.json into `out_dir`; returns the stats."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    task = knowledge_task(n, seed, world_seed, mix)
    examples = task.examples("train")
    records = task_records(task, "train")
    build_s = time.perf_counter() - t0
    write_jsonl(out / "raw.jsonl", ({"id": ex.id, "group": ex.meta["group"], "prompt": ex.prompt,
                                      "target": ex.reference, **{k: v for k, v in ex.meta.items() if k != "group"}}
                                     for ex in examples))
    write_jsonl(out / "train.jsonl", records)
    groups = Counter(ex.meta["group"] for ex in examples)
    stats = {"method": "knowledge-preference", "generated": len(examples), "kept": len(records), "dropped": {},
             "generation_s": build_s, "samples_per_s": None, "train_s": None, "model_sampling": False,
             "by_group": {g: groups[g] for g in GROUPS if groups[g]}, "mix": dict(mix or MIX), "seed": seed,
             "world_seed": world_seed}
    write_json(out / "stats.json", stats)
    return stats
