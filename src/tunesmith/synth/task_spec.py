"""A SELF-GUIDE task file (TASK.yaml): an instruction, about three demonstrations, the prompt shape
the evaluation uses, and the synthesis, training and evaluation settings (synth/self_guide.py runs it).

    spec = load_task("examples/synth/json.yaml", ["synth.rounds=6"])
    spec.chat("A customer named ...")      # the chat the model trains on and is evaluated with
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..config import Config, RecipeError, invalid
from ..recipe import _where, apply_overrides, read_mapping
from .filters import NOISE

class SelfGuideError(ValueError):
    """A mistake in a TASK.yaml, its overrides or the output folder; the message says where."""


# --------------------------------------------------------------------------------------------------
# TASK.yaml


class Demo(Config):
    input: str
    "An example input, as the user would give it."
    output: str
    "Its gold output (a label for classification)."


class SynthSettings(Config):
    rounds: int = Field(40, gt=0)
    "Input-generation rounds E (paper: 40; a CPU run uses a handful)."
    inputs_per_round: int = Field(10, gt=0)
    "Inputs sampled per round, each from its own prompt (paper: 10)."
    input_temperature: float = Field(0.7, ge=0)
    "Sampling temperature of the inputs (paper: 0.7)."
    input_top_k: int = Field(40, ge=0)
    "top-k of the inputs (paper: 40; 0 = off)."
    low_quality: int = Field(10, ge=0)
    "Earlier kept inputs shown as low-quality exemplars: 1..this many, drawn per prompt (paper: 10)."
    input_length_filter: bool = True
    "Drop inputs whose length lies outside mean ± `sigmas`·σ of the gold inputs."
    max_input_tokens: int = Field(200, gt=0)
    "Longest generated input in tokens (paper: 500)."
    samples: int = Field(10, gt=0)
    "Outputs sampled per input for the vote (paper: n = 10)."
    output_temperature: float = Field(0.2, ge=0)
    "Sampling temperature of the outputs (paper: 0.2)."
    output_top_k: int = Field(10, ge=0)
    "top-k of the outputs (paper: 10)."
    consistency: float = Field(0.2, ge=0, le=1)
    "Keep the majority answer if its share of the counted samples is at least this (paper: 0.2)."
    output_length_filter: bool = True
    "Drop outputs (generation tasks) whose length lies outside mean ± `sigmas`·σ of the gold outputs."
    max_output_tokens: int = Field(500, gt=0)
    "Longest sampled output in tokens (paper: 500)."
    sigmas: float = Field(2.0, gt=0)
    "Width of the length filters in standard deviations of the gold lengths (paper: 2)."
    noise_tokens: list[str] = Field(default_factory=lambda: list(NOISE))
    "Template tokens that mark a generation as noise (case-insensitive); the meta-prompt's markers are added."
    batch_size: int = Field(8, gt=0)
    "Prompts per generation batch."
    seed: int = 0
    "Seed of the prompts' random choices, the samples and the class balancing."


class TrainSpec(Config):
    enabled: bool = True
    "Fine-tune on the synthetic data (false: stop after writing train.jsonl)."
    recipe: str | None = None
    "A recipe file; unset: LoRA on the model with the built-in SELF-GUIDE settings (DEFAULT_TRAIN)."
    overrides: list[str] = Field(default_factory=list)
    "Recipe overrides (`train.steps=30`), applied after the recipe or the built-in settings."


class EvalSpec(Config):
    limit: int = Field(50, ge=0)
    "Test examples of `eval_task` measured after fine-tuning (0 = no evaluation)."
    max_new_tokens: int = Field(128, gt=0)
    "Longest answer in the evaluation."
    batch_size: int = Field(16, gt=0)
    "Evaluation batch size."


class TaskSpec(Config):
    instruction: str = Field(min_length=1)
    "What the task asks, in words (shown in every synthesis prompt)."
    demonstrations: list[Demo] = Field(min_length=1)
    "About three solved examples: [{input, output}]."
    type: Literal["generation", "classification"] = "generation"
    "generation (outputs are free text) or classification (outputs are one of `labels`)."
    labels: list[str] = Field(default_factory=list)
    "The label strings of a classification task."
    system_prompt: str | None = None
    "The system message of the training chats (and the evaluation's); a built-in task's own."
    template: str = "{instruction}\n\n{input}"
    "The user message of a training chat: `{instruction}` and `{input}` are filled in."
    eval_task: str | None = None
    "A built-in task to evaluate on (json, intent, sql, ...); the template must reproduce its prompts."
    synth: SynthSettings = Field(default_factory=SynthSettings)
    "Synthesis settings (defaults: the paper's)."
    train: TrainSpec = Field(default_factory=TrainSpec)
    "Fine-tuning."
    eval: EvalSpec = Field(default_factory=EvalSpec)
    "Evaluation after fine-tuning."

    @model_validator(mode="after")
    def _consistent(self):
        if "{input}" not in self.template:
            raise invalid("must contain `{input}`", "template")
        if self.type == "classification":
            if len(self.labels) < 2:
                raise invalid("a classification task names at least two labels", "labels")
            for i, d in enumerate(self.demonstrations):
                if d.output not in self.labels:
                    raise invalid(f"demonstration {i}: output {d.output!r} is not one of the labels", "demonstrations")
        elif self.labels:
            raise invalid("labels are for `type: classification`", "labels")
        return self

    def user_message(self, text: str) -> str:
        """The user turn for one input (replace, not format: templates may hold JSON braces)."""
        return self.template.replace("{instruction}", self.instruction).replace("{input}", text)

    def chat(self, text: str, answer: str | None = None) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        turns = [{"role": "user", "content": self.user_message(text)}]
        return system + turns + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def load_task(path: str | Path, overrides: list[str] | None = None) -> TaskSpec:
    """Read and check a TASK.yaml (with `a.b=c` overrides); a mistake names file:line and the field."""
    path, overrides = Path(path), list(overrides or [])
    values, text = read_mapping(path, SelfGuideError, "task", "(instruction, demonstrations, type, ...)")
    try:
        apply_overrides(values, overrides)
        spec = TaskSpec.build(values)
        if spec.eval_task:
            check_prompt_shape(spec)
    except RecipeError as e:
        where = _where(path, text, e, overrides) if e.loc else str(path)
        raise SelfGuideError(f"{where}: {str(e).replace('unknown recipe key', 'unknown key')}") from None
    return spec


def check_prompt_shape(spec: TaskSpec, task=None) -> None:
    """The training chats must look like what `eval_task` shows the model: the same system prompt
    and user messages the template can produce. Raises RecipeError naming the field that differs."""
    from ..eval.runner import get_eval_task

    if task is None:
        try:
            task = get_eval_task(spec.eval_task)
        except ValueError as e:
            raise RecipeError(f"eval_task: {e}", ("eval_task",)) from None
    if (getattr(task, "system_prompt", None) or None) != spec.system_prompt:
        raise RecipeError(f"system_prompt: must be task {task.name}'s own, {task.system_prompt!r}",
                          ("system_prompt",))
    shape = template_pattern(spec)
    for ex in task.examples("test")[:20]:
        if not shape.fullmatch(ex.prompt):
            raise RecipeError(f"template: does not produce task {task.name}'s prompts, e.g. {ex.prompt!r:.120}",
                              ("template",))
    if spec.type == "classification" and getattr(task, "labels", None) is not None \
            and set(task.labels) != set(spec.labels):
        raise RecipeError(f"labels: must be task {task.name}'s labels {list(task.labels)}", ("labels",))


def template_pattern(spec: TaskSpec) -> re.Pattern:
    """A regex matching the user messages of the template; group 1 is the input."""
    before, after = spec.template.replace("{instruction}", spec.instruction).split("{input}", 1)
    return re.compile(re.escape(before) + "(.+)" + re.escape(after), re.DOTALL)
