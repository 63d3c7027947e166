"""A sampling engine for data synthesis: many samples per prompt, stop strings, dedup, resumable JSONL
with provenance.

How it decodes. Jobs (prompts) are sorted by token length and cut into groups of
`max(1, batch_size // n)` prompts. A group is prefilled once, left-padded together (`left_pad`),
and each prompt's n samples decode from copies of its KV cache (rows of the prefilled cache selected
`n` times), so a prompt's tokens go through the model once however many samples it gets; when
`n > batch_size` one prefill serves several near-equal chunks of at most `batch_size` rows.
Finished rows leave the batch (their cache rows are dropped), so the batch shrinks as samples end.
Positions are per row (the count of real tokens before it), so a row's rotary positions do not
depend on the padding in front of it. Different prompts that share a prefix (few-shot
demonstrations) are each prefilled in full: sharing the prefix across prompts is not done.

Randomness. Sample i of job j draws from its own `torch.Generator`, seeded with
`job_seed(seed, j.id) + i` (a stable hash, not Python's salted `hash`), and only that row's draws
advance it. What a sample is therefore does not depend on the batch, the group or the order of the
jobs, up to float rounding: padding and batch shape change the logits in the last bits, which can
flip a draw only when two tokens are tied to that precision (practically never; the tests check
equal texts across batch sizes). Greedy decoding (temperature 0) gives one answer per prompt, so
with n > 1 it warns and decodes n = 1.

Records. `text` is the decoded completion without special tokens, cut before the first stop
string; `tokens` and `logprob` cover every token decoded, the one that ended the sample included (an
eos or end-of-turn token, or the token that completed a stop string), so `logprob` is the model's
log-probability (untempered, before top-k/top-p) of the sample as it was drawn.

Resuming. Records are appended and fsynced group by group. Calling `synthesize` again with the same
jobs and file keeps the jobs that have their `done` line, drops a partial trailing line and the
samples of unfinished jobs (the file is rewritten aside and renamed), and regenerates the rest.
Groups are a function of the whole job list, and a group with unfinished jobs is decoded whole
(only its unfinished jobs are written), so every job is computed exactly as in an uninterrupted run
and the resumed file equals it byte for byte (same settings, batch size and machine). The settings
are not written to the file: resuming with other settings (save a different n, which is checked)
mixes them.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from transformers import DynamicCache

from tunesmith.infer.generate import InferError, left_pad, render_prompt, stop_ids, _check
from tunesmith.infer.sampling import next_tokens
from tunesmith.jsonl import read_jsonl


class SynthError(ValueError):
    """Bad jobs, settings or output file; the message says which and where."""


@dataclass
class Job:
    """One prompt to sample from: `id` is unique within a job list (the resume key); `prompt` is a
    user message or chat messages (rendered with the chat template), or raw text when `raw=True`;
    `meta` is copied into every output record."""

    id: str
    prompt: str | list[dict]
    meta: dict = field(default_factory=dict)


@dataclass
class SynthStats:
    """What one `synthesize` call did: `jobs` in the list, `skipped_jobs` already done in the file,
    `samples` and `tokens` generated now, in `generation_s` seconds."""

    jobs: int
    samples: int
    skipped_jobs: int
    generation_s: float
    samples_per_s: float
    tokens_per_s: float
    tokens: int = 0


def job_seed(seed: int, job_id: str) -> int:
    """The seed of a job's samples: a stable 63-bit hash of (seed, job id); sample i uses this + i."""
    digest = hashlib.blake2b(f"{seed}\x00{job_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def normalise(text: str) -> str:
    """The text as dedup compares it: case-folded, whitespace runs collapsed, ends stripped."""
    return " ".join(text.casefold().split())


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest occurrence of any stop string, and whether one occurred."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


def duplicates(texts: Sequence[str]) -> list[int | None]:
    """For each text, the index of the first earlier text equal after `normalise`, else None."""
    first: dict[str, int] = {}
    out: list[int | None] = []
    for i, t in enumerate(texts):
        key = normalise(t)
        out.append(first.get(key))
        first.setdefault(key, i)
    return out


def read_jobs(path) -> list[Job]:
    """Jobs from a JSONL file: per line `{"id"?: str, "prompt": str | "messages": [...], ...}`; the
    other fields become `meta`; a line without `id` gets its record number (0-based) as a string.
    A bad line raises SynthError naming file:line and the field."""
    path = Path(path)
    if not path.is_file():
        raise SynthError(f"prompts file not found: {path}")
    jobs: list[Job] = []
    seen: dict[str, str] = {}
    for where, rec in read_jsonl(path, SynthError):
        if not isinstance(rec, dict):
            raise SynthError(f"{where}: expected a JSON object with `prompt` or `messages`")
        rec = dict(rec)
        job_id = rec.pop("id", str(len(jobs)))
        if not isinstance(job_id, str) or not job_id:
            raise SynthError(f"{where}: `id` must be a non-empty string, got {job_id!r}")
        if job_id in seen:
            raise SynthError(f"{where}: `id` {job_id!r} repeats the one at {seen[job_id]}")
        if "prompt" in rec:
            prompt = rec.pop("prompt")
            if not isinstance(prompt, str):
                raise SynthError(f"{where}: `prompt` must be a string, got {type(prompt).__name__}")
        elif "messages" in rec:
            prompt = rec.pop("messages")
            ok = isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt)
            if not ok:
                raise SynthError(f"{where}: `messages` must be a non-empty list of {{role, content}} strings")
        else:
            raise SynthError(f"{where}: needs `prompt` (a string) or `messages` (a list of {{role, content}})")
        seen[job_id] = where
        jobs.append(Job(job_id, prompt, rec))
    return jobs


# --------------------------------------------------------------------------------------------------
# the output file: reading finished jobs, and cleaning up after an interrupted run


def read_samples(out_path) -> dict[str, list[dict]]:
    """The finished jobs' sample records, by job id, in sample order (a malformed line raises
    SynthError naming file:line)."""
    samples: dict[str, list[dict]] = {}
    done: set[str] = set()
    for where, rec in read_jsonl(out_path, SynthError):
        if not isinstance(rec, dict) or not isinstance(rec.get("job"), str):
            raise SynthError(f"{where}: expected a synthesis record with a string `job`")
        if rec.get("done"):
            done.add(rec["job"])
        elif isinstance(rec.get("sample"), int):
            samples.setdefault(rec["job"], []).append(rec)
        else:
            raise SynthError(f"{where}: a record needs an integer `sample` or `done: true`")
    return {j: sorted(samples.get(j, []), key=lambda r: r["sample"]) for j in sorted(done)}


def _finished_jobs(path: Path, n: int) -> set[str]:
    """Job ids whose `done` line is in `path`; rewrites the file without a partial trailing line
    and without the records of unfinished jobs (aside, then renamed)."""
    if not path.is_file():
        return set()
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    partial = lines.pop()  # b"" when the file ends with a newline; otherwise a line cut short
    parsed: list[tuple[bytes, dict]] = []
    for no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SynthError(f"{path}:{no}: not a valid JSON record; not a synthesis output file?") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("job"), str):
            raise SynthError(f"{path}:{no}: expected a synthesis record with a string `job`")
        if rec.get("done") and rec.get("n") != n:
            raise SynthError(f"{path}:{no}: job {rec['job']!r} was written with n={rec.get('n')}, this run asks "
                             f"n={n}: write to another file")
        parsed.append((line, rec))
    done = {rec["job"] for _, rec in parsed if rec.get("done")}
    kept = [line for line, rec in parsed if rec["job"] in done]
    if partial or len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with tmp.open("wb") as f:
                f.write(b"".join(line + b"\n" for line in kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return done


# --------------------------------------------------------------------------------------------------
# decoding


@dataclass
class _Row:
    """One sample being decoded: its job (position in the group), index, generator and tokens."""

    prompt: int
    sample: int
    seed: int
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    logprob: float = 0.0
    text: str = ""
    finish: str | None = None


def _encode(tokenizer, job: Job, system_prompt, raw) -> list[int]:
    if raw:
        if not isinstance(job.prompt, str):
            raise SynthError(f"job {job.id!r}: raw=True takes a string prompt, got {type(job.prompt).__name__}")
        return tokenizer(job.prompt, add_special_tokens=True)["input_ids"]
    try:
        text = render_prompt(tokenizer, job.prompt, system_prompt)
    except InferError as e:
        raise SynthError(f"job {job.id!r}: {e}") from None
    # The template already writes any BOS; raw text (no template) gets the tokenizer's own.
    templated = getattr(tokenizer, "chat_template", None) is not None
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]


class _Decoder:
    """The model, its stop tokens and the sampling settings: decodes one group of prompts."""

    def __init__(self, model, tokenizer, *, temperature, top_k, top_p, max_new_tokens, stop):
        if any(DynamicCache(config=model.config).is_sliding):
            # a sliding-window cache drops old columns itself, which the padded batch's mask cannot follow
            raise SynthError(f"{type(model).__name__} uses sliding-window attention: the synthesis engine "
                             "cannot batch it (use tunesmith generate)")
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.max_new_tokens, self.stop = max_new_tokens, tuple(s for s in stop if s)
        self.stops = stop_ids(model, tokenizer)
        self.stop_set = set(self.stops)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stops[0]
        self.device = next(model.parameters()).device
        # transformers renamed `past_key_values` to `cache` (5.x); the cache object is updated in place either way
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def _forward(self, input_ids, mask, positions, cache) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self.cache_arg: cache})
        return out.logits[:, -1].float()

    def prefill(self, prompts: list[list[int]]):
        """Run the prompts (left-padded together); their last logits (P, V), cache, mask and next positions."""
        input_ids, mask = left_pad(prompts, self.pad)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(input_ids, mask, positions, cache)
        return logits, cache, mask, mask.sum(-1)

    def decode(self, prefilled, rows: list[_Row], bar=None) -> None:
        """Decode `rows` (each continues its prompt's prefilled cache) until every one has finished."""
        logits, cache, mask, positions = prefilled
        idx = torch.tensor([r.prompt for r in rows], dtype=torch.long, device=self.device)
        cache = DynamicCache(ddp_cache_data=[(layer.keys[idx], layer.values[idx]) for layer in cache.layers],
                             config=self.model.config)
        logits, mask, positions = logits[idx], mask[idx], positions[idx]
        active = list(rows)
        while True:
            chosen = self._choose(logits, active)
            logprobs = torch.log_softmax(logits, -1).gather(1, chosen[:, None])[:, 0].tolist()
            for row, tok, lp in zip(active, chosen.tolist(), logprobs):
                self._advance(row, tok, lp)
            keep = [i for i, r in enumerate(active) if r.finish is None]
            if bar is not None:
                bar.update(len(active) - len(keep))
            if not keep:
                return
            if len(keep) < len(active):
                sel = torch.tensor(keep, dtype=torch.long, device=self.device)
                cache.batch_select_indices(sel)
                mask, positions, chosen = mask[sel], positions[sel], chosen[sel]
                active = [active[i] for i in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            logits = self._forward(chosen[:, None], mask, positions[:, None], cache)
            positions = positions + 1

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        if not self.temperature:
            return next_tokens(logits, None)
        # one draw per row from the row's own generator: a sample does not depend on its batch-mates
        return torch.cat([next_tokens(logits[i:i + 1], self.temperature, self.top_p, self.top_k, generator=r.generator)
                          for i, r in enumerate(rows)])

    def _advance(self, row: _Row, tok: int, logprob: float) -> None:
        row.ids.append(tok)
        row.logprob += logprob
        if tok in self.stop_set:
            row.text = self.tokenizer.decode(row.ids[:-1], skip_special_tokens=True)
            row.finish = "stop"
            return
        if self.stop:
            row.text, hit = cut_at_stop(self.tokenizer.decode(row.ids, skip_special_tokens=True), self.stop)
            if hit:
                row.finish = "stop"
                return
        if len(row.ids) >= self.max_new_tokens:
            row.text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
            row.finish = "length"


def _groups(lengths: list[int], per_group: int) -> list[list[int]]:
    """Job indices, longest first (a group pads little), cut into groups of `per_group`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + per_group] for s in range(0, len(order), per_group)]


def _sample_group(decoder: _Decoder, prompts: list[list[int]], seeds: list[int], n: int, batch_size: int,
                  bar=None) -> list[list[_Row]]:
    """The n samples of each prompt of a group (prefilled once; rows decode in chunks of batch_size)."""
    was_training = decoder.model.training
    decoder.model.eval()  # no dropout while generating, even if called mid-training
    try:
        with torch.inference_mode():
            prefilled = decoder.prefill(prompts)
            rows = []
            for p, base in enumerate(seeds):
                for i in range(n):
                    gen = None
                    if decoder.temperature:
                        gen = torch.Generator(device=decoder.device).manual_seed(base + i)
                    rows.append(_Row(prompt=p, sample=i, seed=base + i, generator=gen))
            chunks = -(-len(rows) // batch_size)  # n > batch_size: near-equal chunks (10 rows by 8: 5 + 5)
            size = -(-len(rows) // chunks)
            for start in range(0, len(rows), size):
                decoder.decode(prefilled, rows[start:start + size], bar)
    finally:
        decoder.model.train(was_training)
    return [rows[p * n:(p + 1) * n] for p in range(len(prompts))]


def _records(job: Job, rows: list[_Row], n: int, dedup: bool) -> list[str]:
    dups = duplicates([r.text for r in rows]) if dedup else [None] * len(rows)
    lines = [{"job": job.id, "sample": r.sample, "prompt": job.prompt, "text": r.text, "finish": r.finish,
              "logprob": r.logprob, "tokens": len(r.ids), "seed": r.seed, "duplicate_of": d, "meta": job.meta}
             for r, d in zip(rows, dups)]
    lines.append({"job": job.id, "done": True, "n": n})
    return [json.dumps(x, ensure_ascii=False) + "\n" for x in lines]


def _check_jobs(jobs) -> list[Job]:
    jobs = list(jobs)
    seen: set[str] = set()
    for k, job in enumerate(jobs):
        if not isinstance(job, Job):
            raise SynthError(f"job {k}: expected a Job, got {type(job).__name__}")
        if not isinstance(job.id, str) or not job.id:
            raise SynthError(f"job {k}: `id` must be a non-empty string, got {job.id!r}")
        if job.id in seen:
            raise SynthError(f"job {k}: duplicate id {job.id!r} (ids are the resume key: make them unique)")
        if not isinstance(job.meta, dict):
            raise SynthError(f"job {job.id!r}: `meta` must be a dict, got {type(job.meta).__name__}")
        seen.add(job.id)
    return jobs


def synthesize(model, tokenizer, jobs: list[Job], out_path, *, n: int = 1, temperature: float = 0.7,
               top_k: int = 0, top_p: float = 1.0, max_new_tokens: int = 256, stop: Sequence[str] = (),
               batch_size: int = 8, seed: int = 0, dedup: bool = True, system_prompt: str | None = None,
               raw: bool = False, progress: bool = True) -> SynthStats:
    """Sample `n` completions of every job into `out_path` (JSONL, appended group by group); resumable.

    Args:
        jobs: unique ids; each job's prompt is rendered like `infer.generate` (or taken as raw text).
        n: samples per job. With temperature 0 (greedy) every sample would be the same: n becomes 1
            (with a warning).
        temperature, top_k, top_p: as in `infer.sampling.next_tokens` (top_k 0 = off).
        stop: strings that end a sample (the text is cut before the first one); eos and end-of-turn
            tokens always end one.
        batch_size: sequences decoding together; a group holds `max(1, batch_size // n)` prompts.
        seed: with a job's id, seeds its samples (`job_seed`): a job's samples do not depend on the
            other jobs or the batching.
        dedup: mark a sample whose normalised text equals an earlier sample's of the same job
            (`duplicate_of` = that sample's index; the record is still written).
    Returns:
        SynthStats of this call (jobs already done in the file are skipped and counted).
    """
    try:
        _check(max_new_tokens, temperature, top_p, top_k, batch_size)
    except InferError as e:
        raise SynthError(str(e)) from None
    if n < 1:
        raise SynthError(f"n must be >= 1, got {n}")
    if isinstance(stop, str):
        stop = (stop,)
    if not all(isinstance(s, str) for s in stop):
        raise SynthError(f"stop strings must be strings, got {list(stop)!r:.120}")
    if raw and system_prompt is not None:
        raise SynthError("raw=True takes the prompt text as is: no system_prompt")
    if temperature == 0 and n > 1:
        warnings.warn(f"temperature 0 decodes greedily: all {n} samples would be equal, so n=1", stacklevel=2)
        n = 1
    jobs = _check_jobs(jobs)
    out_path = Path(out_path)
    encoded = [_encode(tokenizer, job, system_prompt, raw) for job in jobs]
    done = _finished_jobs(out_path, n)
    decoder = _Decoder(model, tokenizer, temperature=temperature, top_k=top_k, top_p=top_p,
                       max_new_tokens=max_new_tokens, stop=stop)
    return _run(decoder, jobs, encoded, done, out_path, n=n, batch_size=batch_size, seed=seed, dedup=dedup,
                progress=progress)


def _run(decoder, jobs, encoded, done, out_path, *, n, batch_size, seed, dedup, progress) -> SynthStats:
    from tqdm.auto import tqdm

    groups = [g for g in _groups([len(e) for e in encoded], max(1, batch_size // n))
              if any(jobs[k].id not in done for k in g)]
    skipped = sum(job.id in done for job in jobs)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    samples = tokens = 0
    start = time.perf_counter()
    with tqdm(total=sum(len(g) for g in groups) * n, desc="synthesize", unit="sample", disable=not progress) as bar, \
            out_path.open("a", encoding="utf-8") as f:
        for group in groups:
            rows = _sample_group(decoder, [encoded[k] for k in group], [job_seed(seed, jobs[k].id) for k in group],
                                 n, batch_size, bar)
            for k, job_rows in zip(group, rows):
                if jobs[k].id in done:
                    continue  # decoded again only so that the group computes exactly as the first time
                f.writelines(_records(jobs[k], job_rows, n, dedup))
                samples += n
                tokens += sum(len(r.ids) for r in job_rows)
            f.flush()
            os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    return SynthStats(jobs=len(jobs), samples=samples, skipped_jobs=skipped, generation_s=seconds,
                      samples_per_s=samples / seconds if seconds > 0 else 0.0,
                      tokens_per_s=tokens / seconds if seconds > 0 else 0.0, tokens=tokens)
