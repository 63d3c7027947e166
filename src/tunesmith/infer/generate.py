"""Generate with a (fine-tuned) causal LM: batched, KV-cached, greedy or seeded sampling.

Prompts go through the tokenizer's chat template with the generation prompt, exactly as chat
samples were rendered for training, so a fine-tuned model sees the format it learned. Batches are
left-padded (every row's last prompt token sits at the same column, where decoding starts) with an
attention mask; generation stops at eos or an end-of-turn token, and optionally where the reply's
text meets a stop string or a task says its answer is complete (see `StopRule`).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from tunesmith.jsonl import read_jsonl
from tunesmith.export.peft_format import adapter_folder
from tunesmith.models.load import DEFAULT_MODEL, load_model


class InferError(ValueError):
    """Bad prompts, settings or input file; the message says which and where."""


# Chat templates close a turn with one of these; generation stops there as well as at eos.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def render_prompt(tokenizer, prompt, system_prompt: str | None = None) -> str:
    """The text the model sees: the chat template with the assistant's turn opened.

    `prompt` is a user message (str) or a list of {"role", "content"} messages. `system_prompt`
    is prepended unless the messages already start with a system message. A tokenizer without a
    chat template takes plain-string prompts as raw text.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        if isinstance(prompt, str) and system_prompt is None:
            return prompt
        raise InferError("this tokenizer has no chat template: give plain-string prompts and no system prompt")
    messages = _messages(prompt)
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if (
        isinstance(prompt, list) and prompt
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt)
    ):
        return list(prompt)
    raise InferError(f"a prompt is a string or a non-empty list of {{role, content}} messages, got {prompt!r:.120}")


def _encode(tokenizer, prompt, system_prompt) -> list[int]:
    text = render_prompt(tokenizer, prompt, system_prompt)
    # The template already writes any BOS; raw text (no template) gets the tokenizer's own.
    templated = getattr(tokenizer, "chat_template", None) is not None
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]


def stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a reply: eos (tokenizer and generation config) and end-of-turn markers."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(i for i in source if isinstance(i, int))
    added = tokenizer.get_added_vocab()
    ids.update(added[t] for t in END_OF_TURN if t in added)
    if not ids:
        raise InferError("the tokenizer has no eos token and no end-of-turn token: cannot tell when a reply ends")
    return sorted(ids)


def _check(max_new_tokens, temperature, top_p, top_k, batch_size=1):
    if max_new_tokens < 1:
        raise InferError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise InferError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise InferError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise InferError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if batch_size < 1:
        raise InferError(f"batch_size must be >= 1, got {batch_size}")


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id prompts padded on the left, so every prompt ends at
    the last column and generation continues all rows in step."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return input_ids, mask


# A task's own stop rule: given a reply's text so far, the index where its answer ends once nothing
# that could follow would change how the reply is scored; None while more text still could.
AnswerEnd = Callable[[str], "int | None"]


class StopRule:
    """Where a reply ends in text: before the earliest stop string, or where `answer_end` says.

    Token-level stops (eos, end-of-turn) cannot express "one line" or "the next few-shot question";
    an instruct model often goes on after its answer (an explanation, the next question), and every
    token of that costs a decoding step. `cut` is applied both while generating (a row that has
    ended stops growing, and a batch ends when all its rows have) and to the returned text, so the
    text is the same whether or not generation actually stopped early.
    """

    def __init__(self, stop: Sequence[str] | None = None, answer_end: AnswerEnd | None = None):
        if isinstance(stop, str):
            stop = [stop]
        stop = list(stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            raise InferError(f"stop strings must be non-empty strings, got {stop!r:.120}")
        if answer_end is not None and not callable(answer_end):
            raise InferError(f"answer_end must be a function of the text, got {answer_end!r:.80}")
        self.stop, self.answer_end = stop, answer_end

    def __bool__(self) -> bool:
        return bool(self.stop) or self.answer_end is not None

    def cut(self, text: str, start: int = 0) -> int | None:
        """Where the reply in `text` ends, or None if it has not ended. Stop strings are looked for
        only where they could end at or after `start` (text before it was searched already)."""
        ends = []
        for s in self.stop:
            i = text.find(s, max(0, start - len(s) + 1))
            if i >= 0:
                ends.append(i)
        if self.answer_end is not None:
            end = self.answer_end(text)
            if end is not None:
                ends.append(max(0, min(end, len(text))))
        return min(ends) if ends else None


def _stop_criteria(tokenizer, rule: StopRule, width: int, stops: set[int], rows: int):
    """A transformers stopping criterion for `rule`: each step it decodes the new tokens of every row
    still running and marks the rows whose text has ended (transformers then pads them and ends the
    batch once every row is done). `ended[r]` is how many new tokens row r kept."""
    from transformers import StoppingCriteria

    class RuleCriteria(StoppingCriteria):
        def __init__(self):
            self.ended: dict[int, int] = {}
            self.checked = [0] * rows

        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            for r, row in enumerate(input_ids[:, width:].tolist()):
                if r in self.ended or (row and row[-1] in stops):
                    self.ended.setdefault(r, len(row))
                    done[r] = True
                    continue
                text = tokenizer.decode(row, skip_special_tokens=True)
                if rule.cut(text, self.checked[r]) is not None:
                    self.ended[r] = len(row)
                    done[r] = True
                # a trailing partial character may still change: search it again next time
                self.checked[r] = len(text.rstrip("\ufffd"))
            return done.to(input_ids.device)

    return RuleCriteria()


def _generate_batch(model, tokenizer, rows: list[list[int]], *, max_new_tokens, temperature, top_p, top_k,
                    seed, streamer=None, rule: StopRule | None = None) -> list[str]:
    """Complete one batch of token-id prompts; return the decoded new text of each row, ended by
    `rule` where it says (rows it ends early stop growing; the batch ends when all have ended)."""
    stops = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    input_ids, mask = left_pad(rows, pad)
    device = next(model.parameters()).device
    settings = dict(max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad, use_cache=True)
    criteria = None
    if rule:
        from transformers import StoppingCriteriaList

        criteria = _stop_criteria(tokenizer, rule, input_ids.shape[1], set(stops), len(rows))
        settings["stopping_criteria"] = StoppingCriteriaList([criteria])
    if temperature > 0:
        settings.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    else:  # greedy; unset the sampling knobs so a model's generation_config cannot warn about them
        settings.update(do_sample=False, temperature=None, top_p=None, top_k=None)

    was_training = model.training
    model.eval()  # no dropout while generating, even if called mid-training
    try:
        with torch.inference_mode(), _seeded(seed, device):
            out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                 streamer=streamer, **settings)
    finally:
        model.train(was_training)
    texts = []
    stop_set = set(stops)
    for r, row in enumerate(out[:, input_ids.shape[1]:].tolist()):
        end = next((j for j, t in enumerate(row) if t in stop_set), len(row))
        if criteria is not None and r in criteria.ended:  # the pads after a rule's stop are not text
            end = min(end, criteria.ended[r])
        text = tokenizer.decode(row[:end], skip_special_tokens=True)
        cut = rule.cut(text) if rule else None
        texts.append(text if cut is None else text[:cut])
    return texts


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Seed torch's RNG for one batch and give the caller's RNG state back afterwards (None: no-op)."""
    if seed is None:
        yield
        return
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _completions(model, tokenizer, prompts, *, max_new_tokens, temperature, top_p, top_k, seed, batch_size,
                 system_prompt, stop=None, answer_end=None):
    """Yield (indices, texts) batch by batch. Prompts are sorted by length (longest first) so a batch
    pads little, and similar questions, whose answers tend to end together, share a batch; batch b
    samples with seed + b, so a batch's output does not depend on the ones before it."""
    _check(max_new_tokens, temperature, top_p, top_k, batch_size)
    rule = StopRule(stop, answer_end)
    encoded = [_encode(tokenizer, p, system_prompt) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    for b, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start:start + batch_size]
        texts = _generate_batch(model, tokenizer, [encoded[i] for i in idx], max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, top_k=top_k, seed=seed + b, rule=rule)
        yield idx, texts


def generate(model, tokenizer, prompts, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int = 0, batch_size: int = 8, system_prompt: str | None = None,
             stop: list[str] | None = None, answer_end: AnswerEnd | None = None) -> list[str]:
    """Complete each prompt; return the new text only (special tokens removed), in prompt order.

    Args:
        prompts: user messages (str) and/or lists of OpenAI-style {"role", "content"} messages.
        temperature: 0 decodes greedily; > 0 samples (with top_p / top_k; top_k=0 is off),
            reproducibly for a given seed, without disturbing the caller's RNG.
        system_prompt: prepended to prompts that have no system message.
        stop: strings that end a reply (besides eos / end-of-turn tokens); the text is cut before
            the first one. Up to there the text is what generation without them gives.
        answer_end: a task's stop rule (see `AnswerEnd`); the text is cut where it says.
    """
    if isinstance(prompts, str):
        raise InferError("prompts is a list; wrap a single prompt as [prompt]")
    prompts = list(prompts)
    results: list[str | None] = [None] * len(prompts)
    for idx, texts in _completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, top_k=top_k, seed=seed, batch_size=batch_size,
                                   system_prompt=system_prompt, stop=stop, answer_end=answer_end):
        for i, t in zip(idx, texts):
            results[i] = t
    return results


def generate_file(model, tokenizer, in_path, out_path, **kw) -> Path:
    """Complete every record of a JSONL file into another JSONL file; return `out_path`.

    Each line is an object with `prompt` (a string; used if present) or `messages` (a list of
    {role, content}); its other fields are copied, and `completion` is added. The whole file is
    checked before any generation; a bad line raises InferError naming `file:line`. `kw` are
    `generate`'s keyword arguments. The output appears all at once (written aside, then renamed).
    """
    from tqdm.auto import tqdm

    settings = _generate_kwargs(kw)
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise InferError(f"input file not found: {in_path}")
    records, prompts = [], []
    for where, rec in read_jsonl(in_path, InferError):
        if not isinstance(rec, dict):
            raise InferError(f"{where}: expected a JSON object with `prompt` or `messages`")
        if "prompt" in rec:
            prompt = rec["prompt"]
            if not isinstance(prompt, str):
                raise InferError(f"{where}: `prompt` must be a string, got {type(prompt).__name__}")
        elif "messages" in rec:
            try:
                if not isinstance(rec["messages"], list):
                    raise InferError(f"expected a list of {{role, content}}, got {rec['messages']!r:.80}")
                prompt = _messages(rec["messages"])
            except InferError as e:
                raise InferError(f"{where}: `messages`: {e}") from None
        else:
            raise InferError(f"{where}: needs `prompt` (a string) or `messages` (a list of {{role, content}})")
        records.append(rec)
        prompts.append(prompt)

    completions: list[str | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc="generate", unit="prompt") as bar:
        for idx, texts in _completions(model, tokenizer, prompts, **settings):
            for i, t in zip(idx, texts):
                completions[i] = t
            bar.update(len(idx))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for rec, text in zip(records, completions):
                f.write(json.dumps({**rec, "completion": text}, ensure_ascii=False) + "\n")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def _generate_kwargs(kw: dict) -> dict:
    """`kw` completed with `generate`'s own defaults (its keyword-only parameters)."""
    defaults = {name: p.default for name, p in inspect.signature(generate).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = set(kw) - set(defaults)
    if unknown:
        raise InferError(f"unknown generation option(s): {', '.join(sorted(unknown))}; valid: {', '.join(defaults)}")
    return {**defaults, **kw}


class _Streamer:
    """transformers' streamer protocol (put/end): hand each new piece of the reply to `write`."""

    def __init__(self, tokenizer, write):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.shown = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:  # a character split across tokens: wait for the rest
            return
        if len(text) > len(self.shown):
            self.write(text[len(self.shown):])
            self.shown = text


def chat(model, tokenizer, *, system_prompt: str | None = None, max_new_tokens: int = 512, temperature: float = 0.7,
         input_fn=input, output_fn=print) -> list[dict]:
    """An interactive multi-turn chat; returns the conversation when it ends.

    Every turn renders the whole history through the chat template. `/reset` clears the history,
    `/exit` or end of input (Ctrl-D) quits, Ctrl-C during a reply drops that turn. The reply
    streams through `output_fn`, called like print (`output_fn(piece, end="", flush=True)`).
    """
    _check(max_new_tokens, temperature, 1.0, 0)
    history: list[dict] = []
    output_fn("(chat: /reset clears the history, /exit or Ctrl-D quits)")
    while True:
        try:
            line = input_fn("> ")
        except (EOFError, KeyboardInterrupt):
            output_fn("")
            return history
        command = line.strip()
        if not command:
            continue
        if command == "/exit":
            return history
        if command == "/reset":
            history = []
            output_fn("(history cleared)")
            continue
        history.append({"role": "user", "content": line})
        rows = [_encode(tokenizer, history, system_prompt)]
        streamer = _Streamer(tokenizer, lambda piece: output_fn(piece, end="", flush=True))
        try:
            reply = _generate_batch(model, tokenizer, rows, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=1.0, top_k=0, seed=None, streamer=streamer)[0]
        except KeyboardInterrupt:
            history.pop()
            output_fn("\n(interrupted; turn dropped)")
            continue
        output_fn("")
        history.append({"role": "assistant", "content": reply})


def base_model_for(adapter) -> str:
    """The base model an adapter was trained on (`base_model_name_or_path` in its description)."""
    from tunesmith.export.tuned import read_method

    _, meta = read_method(adapter)
    base = meta.get("base_model_name_or_path")
    if not base:
        raise InferError(f"{adapter_folder(adapter)}: the adapter names no base model; pass --model")
    return base


def load_for_inference(model: str | None = None, adapter: str | None = None, dtype: str = "fp32",
                       merge: bool = True):
    """Load a model (and optionally a LoRA adapter) ready to generate; return (model, tokenizer).

    `adapter` is a PEFT adapter folder or a tunesmith run folder (its `adapter/` is used); with no
    `model`, the base named in the adapter is loaded (else the embedded default). A full-fine-tuning
    run folder works as `model` (its `model/` is used). With `merge`, the adapter is folded into the
    weights, so generation runs at the base model's speed.
    """
    if model is None:
        model = base_model_for(adapter) if adapter is not None else DEFAULT_MODEL
    elif (Path(model) / "model" / "config.json").is_file():
        model = str(Path(model) / "model")
    m, tokenizer = load_model(model, dtype)
    if adapter is not None:
        from tunesmith.export.tuned import load_tuned

        method, _ = load_tuned(m, adapter)
        if merge and method.mergeable:
            method.merge(m)
    m.eval()
    m.requires_grad_(False)
    return m, tokenizer
