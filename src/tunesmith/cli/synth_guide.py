"""`tunesmith synth self-guide TASK.yaml [--out DIR] [key=value ...]`: SELF-GUIDE (synth/self_guide.py):
the model writes inputs and outputs for a task from ~3 demonstrations, filters and votes, then is
fine-tuned on what it wrote. Run it again on the same --out to continue where it stopped."""
from __future__ import annotations

from pathlib import Path

from ..synth.task_spec import SelfGuideError

SYNTH_ERRORS: tuple = (SelfGuideError,)


def add(sub, model_args) -> None:
    p = sub.add_parser("self-guide", help="SELF-GUIDE: synthesise a task's inputs and outputs with the model itself, "
                                          "filter, vote and fine-tune on them (resumable)")
    p.add_argument("task", metavar="TASK.yaml",
                   help="instruction, demonstrations [{input, output}], type, labels, eval_task, synth, train, eval "
                        "(examples/synth/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override TASK.yaml keys, right after it: synth.rounds=6 synth.samples=5 'train.overrides=[train.steps=20]'")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: runs/self-guide-<task file name>); an existing one resumes")
    model_args(p)
    p.set_defaults(fn=cmd_self_guide)


def cmd_self_guide(args) -> int:
    from ..synth.self_guide import self_guide
    from ..synth.task_spec import load_task

    spec = load_task(args.task, args.overrides)  # checked before any model loads
    out = Path(args.out or f"runs/self-guide-{Path(args.task).stem}")
    stats = self_guide(spec, out, model_name=args.model, adapter=args.adapter, dtype=args.dtype)
    drops = ", ".join(f"{k} {v}" for k, v in sorted(stats["dropped"].items())) or "none"
    rate = stats["outputs"]["self_consistency_rate"]
    print(f"[tunesmith] self-guide: kept {stats['kept']} of {stats['generated']} generated inputs (dropped: {drops}); "
          f"self-consistency {'n/a' if rate is None else f'{100 * rate:.0f}%'}; "
          f"generation {stats['generation_s']:.1f} s")
    if stats["train_s"] is not None:
        print(f"[tunesmith] fine-tuned in {stats['train_s']:.1f} s ({stats['train_steps']} steps)")
    if stats["eval"]:
        e = stats["eval"]
        print(f"[tunesmith] {e['task']} {e['metric']} on {e['examples']} test examples: {100 * e['score']:.1f}%")
    print(f"[tunesmith] written to {out}: inputs.jsonl, outputs.jsonl, train.jsonl, stats.json")
    return 0
