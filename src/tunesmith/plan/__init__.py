"""`tunesmith plan`: pick a method and its settings for a time and memory budget.

    tunesmith plan recipes/lora-sft.yaml --time 30m --memory 8GB

Candidates (methods × learning rates, optionally ranks and batch sizes; candidates.py) are
estimated without loading weights and those over the memory budget dropped; the rest run short
pilots in successive halving (pilots.py), each pilot's loss curve is extrapolated to the final
run's step count (predict.py), and the ranked table and the winner's recipe are written
(report.py). The whole plan is resumable from its plan.json (planner.py).
"""
from .candidates import Candidate, PlanError, enumerate_candidates, parse_memory, parse_time
from .pilots import PlanInterrupted
from .planner import PlanSettings, make_plan
from .predict import fit_power_law, predict_final

__all__ = ["Candidate", "PlanError", "PlanInterrupted", "PlanSettings", "make_plan", "enumerate_candidates",
           "parse_memory", "parse_time", "fit_power_law", "predict_final"]
