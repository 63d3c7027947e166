"""`tunesmith synth knowledge --out DIR [--n N] [--seed S]`: knowledge-preference training data
(instruction > context > parametric knowledge) as chat records, built from the `knowledge` task's
synthetic world and known real facts; no model is sampled (synth/knowledge.py)."""
from __future__ import annotations

from ..data.tasks.knowledge import KnowledgeError

SYNTH_ERRORS = (KnowledgeError,)


def cmd_synth_knowledge(args) -> int:
    from ..synth.knowledge import synthesize_knowledge

    stats = synthesize_knowledge(args.out, n=args.n, seed=args.seed, world_seed=args.world_seed)
    mix = ", ".join(f"{g} {c}" for g, c in stats["by_group"].items())
    print(f"[tunesmith] {stats['kept']} records ({mix}) in {stats['generation_s']:.2f} s")
    print(f"[tunesmith] train with: tunesmith train recipes/lora-sft.yaml data.train={args.out}/train.jsonl")
    print(f"[tunesmith] evaluate with: tunesmith eval --task knowledge --seed {args.world_seed} --adapter RUN")
    return 0


def add(sub, model_args) -> None:
    p = sub.add_parser("knowledge", help="knowledge-preference data: answers follow instruction > context > "
                                         "parametric knowledge (built from a synthetic world, no sampling)")
    p.add_argument("--out", required=True, help="output folder: train.jsonl, raw.jsonl, stats.json")
    p.add_argument("--n", type=int, default=600, help="training records (default 600)")
    p.add_argument("--seed", type=int, default=0, help="seed of the question draws (default 0)")
    p.add_argument("--world-seed", type=int, default=0,
                   help="seed of the knowledge task's worlds and splits; the records come from its training "
                        "split, so evaluate with `tunesmith eval --task knowledge --seed` the same (default 0)")
    p.set_defaults(fn=cmd_synth_knowledge)
