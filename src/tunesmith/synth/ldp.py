"""Linguistically-diverse prompting (LDP) for a low-resource language: no gold pair of the target
language is used, only its monolingual text.

    cfg = LdpConfig(target="lu", high=("ob", "ir", "el", "um"), pool=200, shots=4)
    stats = run_ldp(model, tokenizer, cfg, "runs/ldp-lu", model_name="smollm2-135m-instruct")

1. X -> English: each unlabelled sentence of the target X is put after k exemplars drawn from a
   *diverse* set of high-resource languages (each labelled with its language name, no two in a row
   from the same language where there are enough), and the model translates it; every answer goes
   through the filters (`FILTERS`) and keeps its provenance (prompt, exemplar languages, verdict).
2. Intra-lingual: the kept synthetic (X, English) pairs become exemplars of the target itself —
   `rounds=2` re-translates the pool with k synthetic target pairs in context, and reversed they are
   the English -> X exemplars and training pairs (their X side is real text).
3. Fine-tune: LoRA through the normal harness (`train(load_recipe(...))`) on the kept pairs.

The high-resource exemplars come from the data generator (`translation_data`): they stand in for the
strong high-resource ability of a large model, which the paper uses to make them (a 135M model has
no high-resource language but English). The languages are the English-rooted constructed family:
Obrish, Irvic, Elsic, Umbric (high-resource) and Lunish (the low-resource target).
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from difflib import SequenceMatcher
from pathlib import Path

from ..data.tasks.base import Example
from ..jsonl import write_json, write_jsonl
from ..data.tasks.translation import PROMPT, SYSTEM, clauses, extract_translation
from ..data.tasks.translation_data import LANGUAGES, language_name, realize

HIGH = ("ob", "ir", "el", "um")
TARGET = "lu"
FILTERS = ("empty", "truncated", "copy", "length_ratio")
"Checked in this order; a dropped pair is counted under the first filter it fails."
TRAIN_DEFAULTS = ("method.name=lora", "method.lora.rank=16", "method.lora.alpha=32", "train.lr=1e-3",
                  "data.max_length=256", "train.batch_tokens=2048", "train.warmup=0.05")
"Overrides of the default recipe when no --recipe is given (those of recipes/translation-lora.yaml)."


class LdpError(ValueError):
    """An LDP run that cannot start as asked (unknown language, too few exemplars); says which."""


@dataclass(frozen=True)
class Pair:
    """A sentence of `language` and its English translation (gold or synthetic)."""
    language: str
    text: str
    english: str


@dataclass(frozen=True)
class FilterConfig:
    min_ratio: float = 0.5
    "Smallest allowed len(English) / len(source), in characters."
    max_ratio: float = 2.0
    "Largest allowed len(English) / len(source), in characters."
    copy_similarity: float = 0.9
    "An answer this similar to its source (difflib ratio, case-folded) is a copy, not a translation."
    drop_truncated: bool = True
    "Drop answers cut at the token limit (an unfinished sentence, often a loop)."


@dataclass
class LdpConfig:
    target: str = TARGET
    "The low-resource language: only its monolingual text is used."
    high: tuple[str, ...] = HIGH
    "High-resource languages whose (text, English) pairs make the diverse exemplars."
    pool: int = 200
    "Unlabelled target sentences to translate (training meanings of the task seed)."
    shots: int = 4
    "Exemplars per prompt."
    per_language: int = 40
    "High-resource pairs available per language (exemplars are drawn from these)."
    rounds: int = 1
    "1: LDP prompts only; 2: re-translate the pool with k kept synthetic target pairs in context."
    reverse: bool = True
    "Also train English -> X on the reversed pairs."
    seed: int = 0
    max_new_tokens: int = 48
    temperature: float = 0.0
    batch_size: int = 8
    filters: FilterConfig = field(default_factory=FilterConfig)
    tune: bool = True
    "Fine-tune on the kept pairs (else stop after writing train.jsonl)."
    recipe: str | None = None
    "Recipe for the fine-tuning (default: LoRA with TRAIN_DEFAULTS)."
    overrides: tuple[str, ...] = ()
    "`a.b=c` recipe overrides, applied last."
    progress: bool = True


def check_languages(target: str, high) -> None:
    known = [c for c in LANGUAGES]
    for code in (target, *high):
        if code not in LANGUAGES:
            raise LdpError(f"unknown language `{code}`; constructed languages: {', '.join(known)}")
    if target in high:
        raise LdpError(f"the target `{target}` cannot also be a high-resource language")
    if len(set(high)) < 2:
        raise LdpError(f"LDP needs at least 2 distinct high-resource languages, got {', '.join(high) or 'none'}")


# ----------------------------------------------------------------------------- data the method may see

def unlabelled_pool(target: str, n: int, seed: int = 0) -> list[str]:
    """The target's monolingual text: the first `n` training meanings realised in the target only."""
    return [realize(c, target) for c in clauses("train", n, seed)]


def high_resource_pairs(high, per_language: int, seed: int = 0, skip: int = 0) -> dict[str, list[Pair]]:
    """(text, English) pairs of each high-resource language, from training meanings after the first
    `skip` (the pool's), each language its own meanings: from the generator, standing in for the
    pairs a large model makes well in high-resource languages."""
    meanings = clauses("train", skip + per_language * len(high), seed)[skip:]
    return {code: [Pair(code, realize(c, code), realize(c, "en"))
                   for c in meanings[i * per_language:(i + 1) * per_language]] for i, code in enumerate(high)}


def pick_diverse(pairs: dict[str, list[Pair]], k: int, rng: random.Random) -> list[Pair]:
    """k exemplars, languages taken in turn from a shuffled order (so k >= 2 spans >= 2 languages)."""
    order = list(pairs)
    rng.shuffle(order)
    picked = []
    for i in range(k):
        options = [p for p in pairs[order[i % len(order)]] if p not in picked]
        if not options:
            raise LdpError(f"not enough exemplars of {language_name(order[i % len(order)])} for {k} shots")
        picked.append(rng.choice(options))
    return picked


def exemplar_turns(pairs: list[Pair], to_english: bool = True) -> list[dict]:
    """Solved translations as earlier chat turns, each labelled with its language's name."""
    turns = []
    for p in pairs:
        src, tgt = (p.language, "en") if to_english else ("en", p.language)
        text, answer = (p.text, p.english) if to_english else (p.english, p.text)
        turns += [{"role": "user", "content": translation_prompt(src, tgt, text)},
                  {"role": "assistant", "content": answer}]
    return turns


def translation_prompt(src: str, tgt: str, text: str) -> str:
    return PROMPT.format(src=language_name(src), tgt=language_name(tgt), text=text)


def prompt_messages(exemplars: list[Pair], text: str, src: str, tgt: str = "en") -> list[dict]:
    """The chat that asks for one translation after the exemplars (as the eval runner builds it)."""
    return ([{"role": "system", "content": SYSTEM}] + exemplar_turns(exemplars, to_english=tgt == "en")
            + [{"role": "user", "content": translation_prompt(src, tgt, text)}])


def as_examples(pairs: list[Pair], to_english: bool = True) -> list[Example]:
    """Pairs as task examples, e.g. the `train` split of `ShotsTask` (the shots of `evaluate`)."""
    out = []
    for i, p in enumerate(pairs):
        src, tgt = (p.language, "en") if to_english else ("en", p.language)
        text, ref = (p.text, p.english) if to_english else (p.english, p.text)
        out.append(Example(f"shot-{i}", translation_prompt(src, tgt, text), ref,
                           {"source": src, "target": tgt, "source_text": text}))
    return out


class ShotsTask:
    """A task whose training split is the given exemplars: `evaluate(ShotsTask(task, ex), shots=k)`
    prompts every question with them (LDP's diverse or intra-lingual exemplars)."""

    def __init__(self, task, shots: list[Example]):
        self.task, self.shots = task, list(shots)

    def examples(self, split: str) -> list[Example]:
        return list(self.shots) if split == "train" else self.task.examples(split)

    def __getattr__(self, name):
        return getattr(self.task, name)


# ----------------------------------------------------------------------------- filters

def _norm(text: str) -> str:
    return " ".join("".join(ch for ch in text.casefold() if ch.isalnum() or ch.isspace()).split())


def verdict(source: str, english: str, finish: str = "stop", cfg: FilterConfig = FilterConfig()) -> str:
    """`kept`, or the first filter the synthetic pair fails: `empty` (nothing extracted), `truncated`
    (cut at the token limit), `copy` (the source repeated: equal or near-equal after case-folding),
    `length_ratio` (English length / source length in characters outside [min_ratio, max_ratio])."""
    if not _norm(english):
        return "empty"
    if finish == "length" and cfg.drop_truncated:
        return "truncated"
    a, b = _norm(source), _norm(english)
    if a == b or SequenceMatcher(None, a, b).ratio() >= cfg.copy_similarity:
        return "copy"
    ratio = len(english) / max(1, len(source))
    if not cfg.min_ratio <= ratio <= cfg.max_ratio:
        return "length_ratio"
    return "kept"


# ----------------------------------------------------------------------------- the pipeline

def x2en_jobs(pool: list[str], cfg: LdpConfig, exemplars: dict[str, list[Pair]], round_: int = 0) -> list:
    """One engine job per unlabelled sentence. Round 0: k exemplars from the diverse high-resource
    languages; later rounds: k kept synthetic pairs of the target itself (never the sentence's own)."""
    from .engine import Job

    jobs = []
    for i, text in enumerate(pool):
        rng = random.Random(f"ldp/{cfg.seed}/{round_}/{i}")
        if round_ == 0:
            shots = pick_diverse(exemplars, cfg.shots, rng)
        else:
            others = [p for p in exemplars[cfg.target] if p.text != text]
            shots = rng.sample(others, min(cfg.shots, len(others)))
        jobs.append(Job(f"x2en-r{round_}-{i:05d}", prompt_messages(shots, text, cfg.target),
                        {"index": i, "round": round_, "source": text, "source_language": cfg.target,
                         "exemplar_languages": [p.language for p in shots]}))
    return jobs


def translate_pool(model, tokenizer, jobs: list, path: Path, cfg: LdpConfig) -> tuple[list[dict], dict]:
    """Run the jobs through the engine (resumable) and judge every answer: one row per sentence with
    its provenance and verdict, and the engine's timing."""
    from .engine import read_samples, synthesize

    stats = synthesize(model, tokenizer, jobs, path, n=1, temperature=cfg.temperature,
                       max_new_tokens=cfg.max_new_tokens, stop=("\n",), batch_size=cfg.batch_size, seed=cfg.seed,
                       progress=cfg.progress)
    samples = read_samples(path)
    rows = []
    for job in jobs:
        s = samples[job.id][0]
        english = extract_translation(s["text"], "en")
        rows.append({"job": job.id, **job.meta, "raw": s["text"], "english": english, "finish": s["finish"],
                     "logprob": s["logprob"],
                     "verdict": verdict(job.meta["source"], english, s["finish"], cfg.filters)})
    return rows, {"generation_s": stats.generation_s, "samples": stats.samples}


def training_records(pairs: list[Pair], reverse: bool) -> list[dict]:
    """Chat records for SFT: X -> English on every kept pair (and English -> X reversed)."""
    out = []
    for p in pairs:
        for to_english in (True, False) if reverse else (True,):
            ex = as_examples([p], to_english)[0]
            out.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ex.prompt},
                                     {"role": "assistant", "content": ex.reference}]})
    return out


def fine_tune(train_path: Path, out_dir: Path, model_name: str, cfg: LdpConfig) -> tuple[str, float]:
    """LoRA (or the recipe's method) on the synthetic pairs through the normal harness; returns the
    saved output folder and the training seconds."""
    from ..recipe import load_recipe
    from ..train.loop import train

    base = () if cfg.recipe else TRAIN_DEFAULTS
    recipe = load_recipe(cfg.recipe, [*base, f"model.name={model_name}", f"data.train={train_path}",
                                      f"output_dir={out_dir}", "name=tuned", *cfg.overrides])
    start = time.perf_counter()
    result = train(recipe)
    if result.output is None:
        raise LdpError(f"fine-tuning stopped ({result.status}) before saving; see {result.run_dir}")
    return str(result.output), time.perf_counter() - start


def run_ldp(model, tokenizer, cfg: LdpConfig, out_dir, *, model_name: str | None = None) -> dict:
    """The whole method into `out_dir`: x2en.jsonl (engine records, per round x2en-rN.jsonl),
    pairs.jsonl (one row per pool sentence: provenance and verdict), train.jsonl, the tuned run under
    tuned/ and stats.json (`generated`/`kept`/`dropped` count the last round's candidate pairs,
    `rounds` each round's). Rerunning continues an interrupted synthesis."""
    check_languages(cfg.target, cfg.high)
    if cfg.shots < 1 or cfg.pool < 1 or cfg.rounds < 1:
        raise LdpError(f"shots, pool and rounds must be >= 1 (got {cfg.shots}, {cfg.pool}, {cfg.rounds})")
    if cfg.tune and not model_name:
        raise LdpError("fine-tuning needs the base model's name or folder (model_name)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pool = unlabelled_pool(cfg.target, cfg.pool, cfg.seed)
    exemplars = high_resource_pairs(cfg.high, cfg.per_language, cfg.seed, skip=cfg.pool)
    gen_s, generated, rounds = 0.0, 0, []  # generated: samples decoded by this call (not resumed ones)
    for r in range(cfg.rounds):
        jobs = x2en_jobs(pool, cfg, exemplars, r)
        path = out / ("x2en.jsonl" if r == 0 else f"x2en-r{r}.jsonl")
        rows, timing = translate_pool(model, tokenizer, jobs, path, cfg)
        gen_s, generated = gen_s + timing["generation_s"], generated + timing["samples"]
        kept = [Pair(cfg.target, row["source"], row["english"]) for row in rows if row["verdict"] == "kept"]
        rounds.append({"round": r, "kept": len(kept), "generated": len(rows)})
        if r + 1 < cfg.rounds and len(kept) <= cfg.shots:
            raise LdpError(f"round {r}: only {len(kept)} pairs kept; intra-lingual rounds need more than {cfg.shots}")
        exemplars = {cfg.target: kept}
    write_jsonl(out / "pairs.jsonl", rows)
    write_jsonl(out / "train.jsonl", training_records(kept, cfg.reverse))
    output, train_s = (fine_tune(out / "train.jsonl", out, model_name, cfg) if cfg.tune and kept else (None, None))
    dropped = {name: sum(row["verdict"] == name for row in rows) for name in FILTERS}
    stats = {"method": "ldp", "target": cfg.target, "high": list(cfg.high), "generated": len(rows), "kept": len(kept),
             "dropped": dropped, "generation_s": gen_s,
             "samples_per_s": generated / gen_s if generated and gen_s else None,
             "train_s": train_s, "train_records": len(kept) * (2 if cfg.reverse else 1), "output": output,
             "rounds": rounds, "config": {k: v for k, v in asdict(cfg).items() if k != "progress"}}
    write_json(out / "stats.json", stats)
    return stats
