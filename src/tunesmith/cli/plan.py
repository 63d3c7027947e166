"""The `plan` verb (`tunesmith.plan`): pick method and settings for a time and memory budget."""
from __future__ import annotations

import sys


def cmd_plan(args) -> int:
    from ..plan import PlanError, PlanInterrupted, PlanSettings, make_plan, parse_memory, parse_time
    from ..plan.candidates import parse_list
    from ..plan.report import table

    try:
        lrs = "default" if args.lrs == "default" else parse_list(args.lrs, "--lrs")
        settings = PlanSettings(
            recipe=args.recipe, overrides=list(args.overrides), time_s=parse_time(args.time),
            memory_bytes=parse_memory(args.memory) if args.memory else None, out=args.out,
            methods=[m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None,
            lrs=lrs, ranks=parse_list(args.ranks, "--ranks", int),
            batch_tokens=parse_list(args.batch_tokens, "--batch-tokens", int),
            grad_accum=parse_list(args.grad_accum, "--grad-accum", int), precision=args.precision,
            pilot_steps=args.pilot_steps, pilot_time_s=parse_time(args.pilot_time, "--pilot-time"),
            pilots=not args.no_pilots, candidates_file=args.candidates)
        if args.pilot_steps is not None and args.pilot_steps < 2:
            raise PlanError(f"--pilot-steps: expected at least 2, got {args.pilot_steps}")
        state = make_plan(settings)
    except PlanError as e:
        print(f"tunesmith: error: {e}", file=sys.stderr)
        return 2
    except PlanInterrupted as e:
        print(f"tunesmith: {e}; run the same command again to continue the plan", file=sys.stderr)
        return 130
    from ..plan.candidates import Candidate

    out = settings.out_dir
    print(table([Candidate.from_json(c) for c in state["candidates"]], markdown=False))
    if state.get("winner"):
        print(f"[plan] winner: {state['winner']} → {out / 'winner.yaml'}; train it with: "
              f"tunesmith train {out / 'winner.yaml'}")
    print(f"[plan] table and method: {out / 'plan.md'}; every candidate: {out / 'plan.json'}")
    return 0


def add_plan_verb(sub) -> None:
    """The `plan` subcommand."""
    p = sub.add_parser("plan", help="pick method and settings for a time/memory budget: estimate, pilot, rank")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="a.b=c overrides of the recipe, applied to every candidate")
    p.add_argument("--time", required=True, help="time budget of the final run, e.g. 30m, 2h, 90s")
    p.add_argument("--memory", default=None, help="memory budget, e.g. 8GB (default: this machine's available memory)")
    p.add_argument("--out", default=None, help="plan folder (default: plans/<recipe stem>)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods or catalog variants (lora,full,dora,...), or `all` "
                        "(default: the recipe's method, lora and full)")
    p.add_argument("--lrs", default=None,
                   help="learning rates, e.g. 1e-4,3e-4, or `default` (each method's usual rate only; "
                        "default: ×1/3, ×1, ×3 the usual rate)")
    p.add_argument("--ranks", default=None, help="ranks for rank-taking methods (LoRA family), e.g. 8,16,32")
    p.add_argument("--batch-tokens", default=None, help="micro-batch sizes in tokens to try, e.g. 2048,4096")
    p.add_argument("--grad-accum", default=None, help="gradient accumulation counts to try, e.g. 1,4")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="compute precision (auto: bf16 where this machine's measured matmul peak says it is faster)")
    p.add_argument("--candidates", default=None, metavar="FILE.yaml",
                   help="plan exactly these candidates: a YAML list of {label, overrides: {key: value}}")
    p.add_argument("--pilot-steps", type=int, default=None,
                   help="steps of the longest pilot (default: what --pilot-time allows, 6 to 40)")
    p.add_argument("--pilot-time", default="5m", help="time all pilots together should take (default 5m)")
    p.add_argument("--no-pilots", action="store_true", help="estimate only: no pilot runs, no loss prediction")
    p.set_defaults(fn=cmd_plan)
