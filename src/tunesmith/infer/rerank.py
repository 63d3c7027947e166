"""Rerank candidates with a listwise LLM: the whole list in one prompt, or sliding windows.

    results = rerank(model, tokenizer, [(query, passages), ...], mode="full")      # or "window"
    results[0].order                          # indices into passages, best first

Full list (Liu et al., 2025): every candidate in one RankGPT prompt, one greedy answer
"[a] > [b] > ...". Sliding window (Sun et al., 2023, RankGPT): windows of `window` candidates,
`step` apart, from the back of the list to the front; each window is reordered in place, so a
strong candidate is carried forward window after window and the top `window - step` are settled by the
last one. Windows of different queries can run batched, in lockstep (`batch_size`).

Answers are parsed leniently (`parse_ranking`): ids out of range and repeats are dropped, and ids the
model left out follow in their input order, so a weak model degrades towards the input ranking
instead of failing.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable

from tunesmith.data.ranking import PASSAGE_TOKENS, ranking_messages
from tunesmith.infer.generate import InferError, generate

MODES = ("full", "window")
_ID = re.compile(r"\[\s*(\d+)\s*\]")



@dataclass
class WindowAnswer:
    order: list[int]
    "A permutation of range(len(window)), best first."
    tokens: int = 0
    "Tokens generated for it."
    text: str = ""
    complete: bool = True
    "The answer named every candidate exactly once."


# A ranker orders windows: given [(query, passages)], one WindowAnswer each.
Ranker = Callable[[list[tuple[str, list[str]]]], list[WindowAnswer]]


@dataclass
class ParsedRanking:
    order: list[int]
    "A permutation of range(n), best first: the ids as listed, then the missing ones in input order."
    listed: int
    "Distinct valid ids the answer named."
    invalid: int
    "Ids outside 1..n."
    repeated: int
    "Ids named more than once (only the first counts)."

    @property
    def complete(self) -> bool:
        """The answer named every candidate exactly once and nothing else."""
        return self.listed == len(self.order) and not self.invalid and not self.repeated


def parse_ranking(text: str, n: int) -> ParsedRanking:
    """Read "[3] > [1] > [2]" (any text around the bracketed ids is ignored) into 0-based indices."""
    order, seen, invalid, repeated = [], set(), 0, 0
    for m in _ID.finditer(text):
        i = int(m.group(1)) - 1
        if not 0 <= i < n:
            invalid += 1
        elif i in seen:
            repeated += 1
        else:
            seen.add(i)
            order.append(i)
    listed = len(order)
    order += [i for i in range(n) if i not in seen]
    return ParsedRanking(order=order, listed=listed, invalid=invalid, repeated=repeated)


@dataclass
class RerankResult:
    order: list[int]
    "Indices into the query's passages, best first."
    seconds: float = 0.0
    "Wall time spent on this query (its share of each batched generation)."
    generated_tokens: int = 0
    windows: int = 0
    "Prompts the model answered for this query (1 for full-list)."
    complete: int = 0
    "Of those, answers that named every candidate exactly once."
    answers: list[str] = field(default_factory=list)


def window_starts(n: int, window: int, step: int) -> list[int]:
    """Start of each window, back to front: n - window, n - window - step, ..., ending with 0.

    RankGPT's loop stops once the next start falls below 0, which can leave the first candidates out
    of every window (n=25, window 20, step 10: only [5, 25) is ranked); here the last window is
    always the top one."""
    if window < 1 or step < 1:
        raise InferError(f"window and step must be >= 1, got window={window}, step={step}")
    if n <= window:
        return [0]
    starts = list(range(n - window, 0, -step))
    return starts + [0]


def sliding_window(ranker: Ranker, lists: list[tuple[str, list[str]]], *, window: int = 20,
                   step: int = 10, batch_size: int | None = None) -> list[RerankResult]:
    """Rerank each (query, passages) by windows, back to front, reordering each window in place.
    Round j ranks the j-th window of every query (queries with fewer windows drop out), `batch_size`
    queries per call of `ranker` (None: all at once); a window as large as the list is the full-list
    mode. A query's seconds are its share of the calls it was in."""
    results = [RerankResult(order=list(range(len(p)))) for _, p in lists]
    plans = [window_starts(len(p), window, step) for _, p in lists]
    for j in range(max((len(s) for s in plans), default=0)):
        active = [q for q in range(len(lists)) if j < len(plans[q])]
        size = batch_size or len(active)
        for g in range(0, len(active), size):
            _rank_round(ranker, lists, results, active[g:g + size], {q: plans[q][j] for q in active[g:g + size]},
                        window)
    return results


def _rank_round(ranker: Ranker, lists, results: list[RerankResult], group: list[int], starts: dict[int, int],
                window: int) -> None:
    """One ranker call: the window at `starts[q]` of each query q in `group`, reordered in place."""
    spans = {q: (starts[q], min(starts[q] + window, len(lists[q][1]))) for q in group}
    batch = [(lists[q][0], [lists[q][1][i] for i in results[q].order[a:b]]) for q, (a, b) in spans.items()]
    start = time.perf_counter()
    answers = ranker(batch)
    share = (time.perf_counter() - start) / len(group)
    for q, answer in zip(group, answers):
        a, b = spans[q]
        current, r = results[q].order[a:b], results[q]
        if sorted(answer.order) != list(range(b - a)):
            raise InferError(f"the ranker returned {answer.order} for a window of {b - a} candidates")
        r.order[a:b] = [current[i] for i in answer.order]
        r.seconds += share
        r.generated_tokens += answer.tokens
        r.windows += 1
        r.complete += answer.complete
        r.answers.append(answer.text)


class LLMRanker:
    """A `Ranker` backed by a causal LM: RankGPT prompts, greedy answers, lenient parsing."""

    def __init__(self, model, tokenizer, *, passage_tokens: int = PASSAGE_TOKENS):
        self.model, self.tokenizer = model, tokenizer
        self.passage_tokens = passage_tokens

    def __call__(self, batch: list[tuple[str, list[str]]]) -> list[WindowAnswer]:
        prompts = [ranking_messages(self.tokenizer, q, p, self.passage_tokens) for q, p in batch]
        # "[12] > " is at most 5 tokens in common vocabularies; a margin for a preamble, no more,
        # so an untuned model that rambles costs bounded time
        longest = max(len(p) for _, p in batch)
        texts = generate(self.model, self.tokenizer, prompts, max_new_tokens=6 * longest + 16,
                         batch_size=len(prompts))
        out = []
        for text, (_, passages) in zip(texts, batch):
            parsed = parse_ranking(text, len(passages))
            tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + the stop token
            out.append(WindowAnswer(parsed.order, tokens, text, parsed.complete))
        return out


def rerank(model, tokenizer, lists: list[tuple[str, list[str]]], *, mode: str = "full", window: int = 20,
           step: int = 10, passage_tokens: int = PASSAGE_TOKENS, batch_size: int = 1) -> list[RerankResult]:
    """Rerank each (query, passages) with the model; see the module docstring for the two modes.

    Returns one RerankResult per list: the order, seconds, tokens generated (the answer re-tokenized,
    plus its stop token; an answer cut by max_new_tokens counts one too many), windows, complete
    answers and the raw answers."""
    if mode not in MODES:
        raise InferError(f"rerank mode must be one of {', '.join(MODES)}, got {mode!r}")
    ranker = LLMRanker(model, tokenizer, passage_tokens=passage_tokens)
    if mode == "full":
        window = max((len(p) for _, p in lists), default=1)
    return sliding_window(ranker, lists, window=window, step=step, batch_size=batch_size)
