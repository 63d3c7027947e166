"""SELF-GUIDE (Zhao et al., 2024; methods.md §10): the model writes its own task data, then learns from it.

    tunesmith synth self-guide examples/synth/json.yaml synth.rounds=6 --out runs/self-guide-json

    spec = load_task("examples/synth/json.yaml", ["synth.rounds=6"])   # synth/task_spec.py
    stats = self_guide(spec, "runs/self-guide-json")

From an instruction and ~3 demonstrations (TASK.yaml):
1. inputs: E rounds of `inputs_per_round` samples; each prompt shows the instruction, the gold inputs
   shuffled ("high quality") and 1..10 earlier kept generations ("low quality", for diversity); a
   classification prompt asks for an input of a random target label. Filters (filters.py): empty,
   length outside mean ± 2σ of the gold inputs, template noise, exact duplicates (of gold or kept).
2. outputs: each kept input is answered `samples` times by the same model, prompted exactly as the
   evaluation prompts it with the demonstrations as earlier chat turns (a few-shot prompt); the
   samples pass the output filters (length ± 2σ of the gold outputs for generation tasks, noise; a
   classification output must name a label, vote.map_label) and the self-consistency vote (vote.py:
   the most frequent answer if its share ≥ 20%, ties to the shortest).
3. classification: down-sample to the smallest class; every task: the training chats.
4. fine-tune through the normal harness (LoRA, loss on the answer only), then evaluate on `eval_task`.

The training chats have exactly the shape the evaluation shows the model: `system_prompt` and the
user message `template` with `{instruction}` and `{input}` filled in. For a built-in task the spec
is built from the task itself (its system prompt and prompt text around what varies), and loading
checks that the template reproduces the task's prompts, so training and evaluation cannot drift.

Every stage leaves its file in the output folder and is skipped when run again: `raw/inputs-rNNN.jsonl`
and `raw/outputs.jsonl` (the engine's samples, resumable mid-stage), `inputs.jsonl` (every generated
input with its verdicts), `outputs.jsonl` (every sample with its verdicts and each input's vote),
`train.jsonl`, the fine-tuning run `train/`, `eval.json` and `stats.json` (kept + dropped = generated).

The task file itself (TASK.yaml) is read and checked by synth/task_spec.py.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

from ..config import RecipeError
from ..jsonl import write_json, write_jsonl
from .filters import Verdict, check_input, check_output, first_failure, length_bounds
from .task_spec import SelfGuideError, TaskSpec
from .vote import balance, map_label, normalise, vote


# --------------------------------------------------------------------------------------------------
# stage 1: inputs

MARKERS = ("high-quality", "written earlier", '- "')  # the meta-prompt's own words and list marker


def input_prompt(spec: TaskSpec, gold: list[str], earlier: list[str], label: str | None) -> str:
    """The input-generation meta-prompt: the instruction, the gold inputs ("high quality", already
    shuffled), earlier kept generations ("low quality", for diversity) and, for classification, the
    target label; it ends inside a new list item, which the model completes.

    It is raw text the model continues, not a chat turn: on SmolLM2-135M a list to continue gave
    more new, clean inputs than the paper's chat meta-instruction (benchmarks/synthesis/self_guide).
    """
    lines = [spec.instruction.strip(), "", "High-quality example inputs:", *(f'- "{g}"' for g in gold)]
    if earlier:
        lines += ["", "More example inputs, written earlier (their format may be less accurate):",
                  *(f'- "{e}"' for e in earlier)]
    ask = "A new input, different from all of the above"
    lines += ["", ask + (f', whose correct output is "{label}":' if label is not None else ":"), '- "']
    return "\n".join(lines)


def clean_input(text: str) -> str:
    """A generated input without the closing quote of its list item."""
    text = text.strip()
    return text[:-1].rstrip() if text.endswith('"') else text


def round_jobs(spec: TaskSpec, r: int, kept: list[str]) -> list:
    """The jobs of input round `r` (from 0): each prompt draws its own shuffle, earlier generations and
    target label from a seed of (seed, round, index), so a rerun builds the same jobs."""
    from .engine import Job

    s = spec.synth
    gold = [d.input for d in spec.demonstrations]
    jobs = []
    for i in range(s.inputs_per_round):
        rng = random.Random(f"{s.seed}/inputs/{r}/{i}")
        shuffled = rng.sample(gold, len(gold))
        earlier = rng.sample(kept, rng.randint(1, min(len(kept), s.low_quality))) if kept and s.low_quality else []
        label = rng.choice(spec.labels) if spec.type == "classification" else None
        jobs.append(Job(f"in-{r:03d}-{i:03d}", input_prompt(spec, shuffled, earlier, label),
                        {"round": r, "target_label": label}))
    return jobs


def judge_inputs(spec: TaskSpec, samples: dict, jobs: list, kept: list[str], seen: set[str]) -> list[dict]:
    """The input records of one round with their verdicts; kept texts are appended to `kept`/`seen`."""
    s = spec.synth
    bounds = length_bounds([d.input for d in spec.demonstrations], s.sigmas) if s.input_length_filter else None
    tokens = [*s.noise_tokens, *MARKERS]
    records = []
    for job in jobs:
        for sample in samples.get(job.id, []):
            text = clean_input(sample["text"])
            verdicts = check_input(text, bounds=bounds, tokens=tokens, seen=seen)
            dropped = first_failure(verdicts)
            records.append({"id": f"{job.id}-{sample['sample']}", "round": job.meta["round"], "job": job.id,
                            "sample": sample["sample"], "text": text, "raw": sample["text"],
                            "target_label": job.meta["target_label"], "finish": sample.get("finish"),
                            "verdicts": [v.as_dict() for v in verdicts], "kept": dropped is None,
                            "dropped_by": dropped})
            if dropped is None:
                kept.append(text)
                seen.add(text)
    return records


def synthesize_inputs(spec: TaskSpec, model, tokenizer, folder: Path, progress: bool = True) -> tuple[list, dict]:
    """Stage 1: every round through the engine (each round's file resumes on its own); returns the
    input records and the stage's timing."""
    from .engine import read_samples, synthesize

    s = spec.synth
    kept: list[str] = []
    seen = {d.input.strip() for d in spec.demonstrations}
    records, gen_s, n_samples = [], 0.0, 0
    for r in range(s.rounds):
        jobs = round_jobs(spec, r, kept)
        path = folder / "raw" / f"inputs-r{r:03d}.jsonl"
        st = synthesize(model, tokenizer, jobs, path, n=1, temperature=s.input_temperature, top_k=s.input_top_k,
                        max_new_tokens=s.max_input_tokens, stop=('"\n', '\n-'), batch_size=s.batch_size, seed=s.seed,
                        dedup=False, raw=True, progress=progress)
        gen_s, n_samples = gen_s + st.generation_s, n_samples + st.samples
        records += judge_inputs(spec, read_samples(path), jobs, kept, seen)
    return records, {"generation_s": gen_s, "samples": n_samples}


# --------------------------------------------------------------------------------------------------
# stage 2: outputs


def output_prompt(spec: TaskSpec, text: str) -> list[dict]:
    """The few-shot output prompt: the evaluation's chat with the demonstrations as earlier turns."""
    chat = spec.chat(text)
    shots = [m for d in spec.demonstrations for m in ({"role": "user", "content": spec.user_message(d.input)},
                                                      {"role": "assistant", "content": d.output})]
    return chat[:-1] + shots + chat[-1:]


def judge_sample(spec: TaskSpec, text: str, bounds, tokens) -> tuple[str | None, list[Verdict]]:
    """(the key the vote counts, the verdicts) of one sampled output."""
    verdicts = check_output(text, bounds=bounds, tokens=tokens)
    if spec.type == "classification":
        label = map_label(text, spec.labels)
        verdicts.append(Verdict("label", label is not None, "" if label else "names no label"))
        return label, verdicts
    return normalise(text), verdicts


def judge_outputs(spec: TaskSpec, inputs: list[dict], samples: dict) -> list[dict]:
    """One record per kept input: every sample with its verdicts and key, and the vote."""
    s = spec.synth
    bounds = (length_bounds([d.output for d in spec.demonstrations], s.sigmas)
              if spec.type == "generation" and s.output_length_filter else None)
    tokens = [*s.noise_tokens, *MARKERS]
    records = []
    for rec in inputs:
        rows, candidates = [], []
        for sample in samples.get(rec["id"], []):
            text = sample["text"].strip()
            key, verdicts = judge_sample(spec, text, bounds, tokens)
            passed = first_failure(verdicts) is None
            rows.append({"sample": sample["sample"], "text": text, "key": key, "passed": passed,
                         "dropped_by": first_failure(verdicts), "verdicts": [v.as_dict() for v in verdicts]})
            if passed:
                candidates.append((key, text))
        v = vote(candidates, s.consistency)
        answer = v.key if spec.type == "classification" and v.passed else v.answer
        records.append({"id": rec["id"], "input": rec["text"], "target_label": rec["target_label"],
                        "samples": rows, "vote": {**v.as_dict(), "answer": answer}, "kept": v.passed,
                        "dropped_by": None if v.passed else "consistency"})
    return records


def synthesize_outputs(spec: TaskSpec, model, tokenizer, inputs: list[dict], folder: Path,
                       progress: bool = True) -> tuple[list, dict]:
    """Stage 2: `samples` outputs per kept input through the engine, judged and voted."""
    from .engine import Job, read_samples, synthesize

    s = spec.synth
    kept = [r for r in inputs if r["kept"]]
    jobs = [Job(r["id"], output_prompt(spec, r["text"])) for r in kept]
    path = folder / "raw" / "outputs.jsonl"
    st = synthesize(model, tokenizer, jobs, path, n=s.samples, temperature=s.output_temperature,
                    top_k=s.output_top_k, max_new_tokens=s.max_output_tokens, batch_size=s.batch_size,
                    seed=s.seed + 1, dedup=False, progress=progress)
    return judge_outputs(spec, kept, read_samples(path)), {"generation_s": st.generation_s, "samples": st.samples}


# --------------------------------------------------------------------------------------------------
# stage 3: the training chats


def select(spec: TaskSpec, outputs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the voted records to train on, those dropped by class balancing)."""
    voted = [r for r in outputs if r["kept"]]
    if spec.type != "classification":
        return voted, []
    return balance(voted, lambda r: r["vote"]["answer"], seed=spec.synth.seed)


def train_records(spec: TaskSpec, chosen: list[dict]) -> list[dict]:
    return [{"id": r["id"], "messages": spec.chat(r["input"], r["vote"]["answer"])} for r in chosen]


# --------------------------------------------------------------------------------------------------
# stage 4 and 5: fine-tune, evaluate

# The built-in fine-tuning settings (no `train.recipe`): LoRA on all linear layers, loss on the
# answer only (the recipe default), 3 epochs as in the paper, ~10 chats per step (paper: batch 10).
DEFAULT_TRAIN = ("method.name=lora", "method.lora.rank=16", "method.lora.alpha=32", "train.epochs=3",
                 "train.batch_tokens=1024", "train.lr=1e-3", "train.warmup=0.05", "model.frozen_dtype=bf16")


def train_recipe(spec: TaskSpec, data: Path, folder: Path, model_name: str | None = None,
                 adapter: str | None = None):
    """The recipe that fine-tunes on `data` into `folder/train` (resumable: resume=true)."""
    from ..recipe import load_recipe

    base = [] if spec.train.recipe else list(DEFAULT_TRAIN)
    pinned = [f"data.train={data}", f"output_dir={folder}", "name=train", "resume=true"]
    chosen = [f"model.name={model_name}"] * bool(model_name) + [f"model.adapter={adapter}"] * bool(adapter)
    try:
        return load_recipe(spec.train.recipe, [*base, *chosen, *spec.train.overrides, *pinned])
    except RecipeError as e:
        raise SelfGuideError(f"train: {e}") from None


def fine_tune(spec: TaskSpec, data: Path, folder: Path, model_name=None, adapter=None) -> dict:
    """Stage 4 through the normal harness; returns where the tuned model is and how long it took."""
    from ..train.loop import train

    recipe = train_recipe(spec, data, folder, model_name, adapter)
    t = time.perf_counter()
    run = train(recipe)
    if run.status != "completed":
        raise SelfGuideError(f"training stopped at step {run.step}; run the command again to continue it")
    return {"train_s": time.perf_counter() - t, "steps": run.step, "output": str(run.output),
            "adapter": str(recipe.run_dir / "adapter") if (recipe.run_dir / "adapter").is_dir() else None,
            "model": recipe.model.name}


def evaluate_tuned(spec: TaskSpec, tuned: dict, folder: Path, dtype: str = "fp32", progress: bool = True) -> dict:
    """Stage 5: the tuned model on `eval_task`'s test split, zero-shot (the training chats' shape)."""
    from ..eval.runner import evaluate, get_eval_task, save_result
    from ..infer.generate import load_for_inference

    path = folder / "eval.json"
    if path.is_file():  # measured by an earlier run of this folder
        saved = json.loads(path.read_text())
        return {"task": saved["task"], "split": saved["split"], "metric": saved["metric"],
                "score": saved["summary"][saved["metric"]], "examples": saved["summary"]["examples"]}
    task = get_eval_task(spec.eval_task)
    if tuned["adapter"]:
        model, tokenizer = load_for_inference(tuned["model"], tuned["adapter"], dtype=dtype)
    else:  # full fine-tuning: the saved model folder
        model, tokenizer = load_for_inference(tuned["output"], dtype=dtype)
    result = evaluate(model, tokenizer, task, split="test", limit=spec.eval.limit,
                      max_new_tokens=spec.eval.max_new_tokens, batch_size=spec.eval.batch_size, progress=progress)
    save_result(result, path, model=tuned["model"])
    return {"task": result.task, "split": "test", "metric": result.metric, "score": result.main,
            "examples": result.summary["examples"]}


# --------------------------------------------------------------------------------------------------
# the pipeline




def read_rows(path: Path) -> list[dict]:
    from ..jsonl import read_jsonl

    return [row for _, row in read_jsonl(path, SelfGuideError)]




def _stage(folder: Path, name: str, run) -> list[dict]:
    """Run a synthesis stage unless its file exists; its timing goes to stages.json."""
    path, log = folder / f"{name}.jsonl", folder / "stages.json"
    if path.is_file():
        return read_rows(path)
    rows, timing = run()
    write_jsonl(path, rows)
    stages = json.loads(log.read_text()) if log.is_file() else {}
    write_json(log, {**stages, name: timing})
    return rows


def self_guide(spec: TaskSpec, out: str | Path, *, model_name: str | None = None, adapter: str | None = None,
               dtype: str = "fp32", model=None, tokenizer=None, progress: bool = True) -> dict:
    """Run (or continue) the whole pipeline into `out`; returns stats.json's content.

    `model_name`/`adapter` pick the model that synthesises and is fine-tuned (default: the train
    recipe's model); an already loaded `model`/`tokenizer` may be passed for synthesis instead.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps(spec.model_dump(), indent=1, ensure_ascii=False) + "\n")
    name = model_name or train_recipe(spec, folder / "train.jsonl", folder).model.name

    def loaded():
        nonlocal model, tokenizer
        if model is None:
            from ..infer.generate import load_for_inference

            model, tokenizer = load_for_inference(name, adapter, dtype=dtype)
        return model, tokenizer

    inputs = _stage(folder, "inputs", lambda: synthesize_inputs(spec, *loaded(), folder, progress))
    outputs = _stage(folder, "outputs", lambda: synthesize_outputs(spec, *loaded(), inputs, folder, progress))
    chosen, unbalanced = select(spec, outputs)
    write_jsonl(folder / "train.jsonl", train_records(spec, chosen))
    model = tokenizer = None  # free the synthesis model before training
    tuned, evaluation = None, None
    if spec.train.enabled and chosen:
        done = folder / "tuned.json"
        if not done.is_file():
            write_json(done, fine_tune(spec, folder / "train.jsonl", folder, name, adapter))
        tuned = json.loads(done.read_text())
        if spec.eval_task and spec.eval.limit:
            evaluation = evaluate_tuned(spec, tuned, folder, dtype, progress)
    stats = summarise(spec, inputs, outputs, chosen, unbalanced, folder, tuned, evaluation)
    write_json(folder / "stats.json", stats)
    return stats


def summarise(spec: TaskSpec, inputs, outputs, chosen, unbalanced, folder: Path, tuned, evaluation) -> dict:
    """stats.json: kept + sum(dropped) == generated, every drop counted once, by its first filter."""
    stages = json.loads((folder / "stages.json").read_text())
    dropped: dict[str, int] = {}
    for r in inputs + outputs:
        if r["dropped_by"]:
            dropped[r["dropped_by"]] = dropped.get(r["dropped_by"], 0) + 1
    if unbalanced:
        dropped["balance"] = len(unbalanced)
    sample_drops: dict[str, int] = {}
    for r in outputs:
        for s in r["samples"]:
            if s["dropped_by"]:
                sample_drops[s["dropped_by"]] = sample_drops.get(s["dropped_by"], 0) + 1
    gen_s = sum(t["generation_s"] for t in stages.values())
    n_samples = sum(t["samples"] for t in stages.values())
    voted = [r for r in outputs if r["kept"]]
    stats = {
        "method": "self-guide", "task": spec.eval_task, "type": spec.type,
        "generated": len(inputs), "kept": len(chosen), "dropped": dropped,
        "outputs": {"inputs_answered": len(outputs), "samples": sum(len(r["samples"]) for r in outputs),
                    "samples_dropped": sample_drops, "voted": len(voted),
                    "self_consistency_rate": len(voted) / len(outputs) if outputs else None,
                    "mean_majority_share": (sum(r["vote"]["share"] for r in outputs) / len(outputs)
                                            if outputs else None)},
        "generation_s": gen_s, "samples_per_s": n_samples / gen_s if gen_s else None,
        "input_generation_s": stages.get("inputs", {}).get("generation_s"),
        "output_generation_s": stages.get("outputs", {}).get("generation_s"),
        "train_s": tuned["train_s"] if tuned else None, "train_steps": tuned["steps"] if tuned else None,
        "eval": evaluation, "settings": spec.synth.model_dump(),
    }
    if spec.type == "classification":
        counts = {label: sum(r["vote"]["answer"] == label for r in chosen) for label in spec.labels}
        agree = [r["vote"]["answer"] == r["target_label"] for r in voted]
        stats["labels"] = counts
        stats["target_label_agreement"] = sum(agree) / len(agree) if agree else None
    return stats
