"""`tunesmith synth`: the model makes its own training data (synth/)."""
from __future__ import annotations

from . import synth_generate, synth_guide, synth_knowledge, synth_ldp, synth_train

MODULES = (synth_generate, synth_guide, synth_train, synth_knowledge, synth_ldp)
SYNTH_ERRORS = tuple(e for m in MODULES for e in m.SYNTH_ERRORS)


def add_synth_verb(sub, model_args) -> None:
    p = sub.add_parser("synth", help="the model makes its own training data: generate, self-guide, self-train, "
                                     "knowledge, ldp")
    verbs = p.add_subparsers(dest="synth_verb", required=True)
    for module in MODULES:
        module.add(verbs, model_args)
