"""`tunesmith synth self-train`: LiST-style self-training of a classifier adapter (synth/self_train.py).

    tunesmith synth self-train --task intent --labelled 16 --pool 256 --rounds 2 --out st/
    -> st/labelled.jsonl, st/round-<r>/{pseudo,train}.jsonl, st/runs/..., st/stats.json
"""
from __future__ import annotations

from ..synth.self_train import SelfTrainConfig, SelfTrainError

SYNTH_ERRORS = (SelfTrainError,)


def add(sub, model_args) -> None:
    d = SelfTrainConfig()
    p = sub.add_parser("self-train", help="LiST self-training: a teacher adapter from K labelled examples "
                                          "pseudo-labels an unlabelled pool; confidence-weighted student adapters",
                       description="LiST-style self-training of LoRA adapters on a frozen base. --adapter: an "
                                   "adapter already trained on the K labelled examples, used as the first teacher.")
    model_args(p)
    p.add_argument("--task", default=d.task, help="a built-in classification task with a label set (default: intent)")
    p.add_argument("--labelled", type=int, default=d.labelled, help="K labelled examples (the first K of train)")
    p.add_argument("--pool", type=int, default=d.pool, help="N unlabelled examples (the next N of train, labels hidden)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="self-training rounds (student = next teacher)")
    p.add_argument("--out", required=True, help="output folder (must not hold a run already)")
    p.add_argument("--threshold", type=float, default=d.threshold, help="pseudo-labels below this confidence get weight 0")
    p.add_argument("--no-balance", action="store_true", help="do not equalise the predicted classes' total weight")
    p.add_argument("--max-weight", type=float, default=d.max_weight, help="cap on the class-balancing factor")
    p.add_argument("--labelled-weight", type=float, default=d.labelled_weight, help="weight of each gold record")
    p.add_argument("--warm-start", action="store_true", help="each student continues its teacher's adapter "
                                                               "(default: a fresh adapter)")
    p.add_argument("--teacher-steps", type=int, default=d.teacher_steps)
    p.add_argument("--student-steps", type=int, default=d.student_steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank of teacher and students")
    p.add_argument("--validation", type=int, default=d.validation, help="validation examples scored per round")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--recipe", default=None, help="a training recipe to start from")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for every training (repeatable), e.g. --set train.batch_tokens=1024")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=run_self_train)


def run_self_train(args) -> int:
    from ..synth.self_train import self_train

    cfg = SelfTrainConfig(task=args.task, labelled=args.labelled, pool=args.pool, rounds=args.rounds,
                          threshold=args.threshold, balance=not args.no_balance, max_weight=args.max_weight,
                          labelled_weight=args.labelled_weight, warm_start=args.warm_start,
                          teacher_steps=args.teacher_steps, student_steps=args.student_steps, lr=args.lr,
                          rank=args.rank, validation=args.validation, seed=args.seed, recipe=args.recipe,
                          overrides=args.overrides)
    stats = self_train(cfg, args.out, model_name=args.model, teacher_adapter=args.adapter,
                       dtype=args.dtype, progress=not args.quiet)
    acc = " → ".join(f"{100 * a:.1f}%" for a in stats["val_accuracy"])
    print(f"[tunesmith] self-train {cfg.task}: validation accuracy (teacher, then each round's student) {acc}; "
          f"pseudo-labels kept {stats['kept']}/{stats['generated']}; student adapter {stats['student']}")
    print(f"[tunesmith] pseudo-labels: {args.out}/round-<r>/pseudo.jsonl; stats: {args.out}/stats.json")
    return 0
