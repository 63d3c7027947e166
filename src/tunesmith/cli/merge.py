"""The `merge` verb: several fine-tunes of one base into one model or LoRA adapter (`export/merge.py`).

    tunesmith merge recipes/merge/ties.yaml
    tunesmith merge recipes/merge/ties.yaml method=dare_ties density=0.3 output=merged-dare
"""
from __future__ import annotations

from pathlib import Path


def add_merge_verb(sub) -> None:
    p = sub.add_parser("merge", help="merge fine-tunes of one base (LoRA adapters or full models): linear, "
                                     "task arithmetic, TIES, DARE, SLERP")
    p.add_argument("recipe", help="a YAML file with a `merge` section (see recipes/merge/ties.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. merge.density=0.3 (or density=0.3)")
    p.set_defaults(fn=cmd_merge)


def load_merge_recipe(path, overrides: list[str]):
    """The MergeSpec of a YAML file plus `key=value` overrides (`merge.` may be left out); mistakes
    name the file and the field."""
    import yaml

    from ..export.merge import read_merge_recipe
    from ..recipe import RecipeError, apply_overrides

    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"merge recipe not found: {p}")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise RecipeError(f"{p}: a merge recipe is a mapping with a `merge` section")
    overrides = [o if o.startswith("merge.") or "=" not in o else f"merge.{o}" for o in overrides]
    apply_overrides(values, overrides)
    return read_merge_recipe(values, where=str(p))


def cmd_merge(args) -> int:
    from ..export.merge import run_merge

    spec = load_merge_recipe(args.recipe, args.overrides)
    result = run_merge(spec)
    print(f"[tunesmith] merged {result.summary}")
    if result.kind == "lora":
        print(f"[tunesmith] use it like any adapter: tunesmith generate --adapter {result.output} ...")
    else:
        print(f"[tunesmith] use it like any model: tunesmith generate --model {result.output} ...")
    return 0
