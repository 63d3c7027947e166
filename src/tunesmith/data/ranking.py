"""Listwise ranking data: RankGPT-style prompts whose answer is a full order of the candidates.

A ranking record (JSONL, JSON, CSV with JSON cells, parquet; field names fixed):

- `{"query": str, "passages": [...], "ranking": [ids]}`: `ranking` orders every passage, best
  first; or
- `{"query": str, "passages": [...], "relevance": [grades] | {id: grade}}`: the gold order is by grade,
  highest first, ties in the order the passages are given (e.g. BM25's), absent ids grade 0.

A passage is a string (its id is its 1-based position in the list) or `{"id": ..., "text": ...}`.

The prompt (Sun et al., 2023, RankGPT; Liu et al., 2025 for full lists) lists the candidates as lines
"[1] text", each cut to `passage_tokens` tokens, and the answer names them all: "[3] > [1] > [2]".
For training the candidates are shuffled (seeded per record) so the order in the prompt carries no
hint: a model that learnt "keep the input order" would otherwise score well on BM25-sorted lists.

The answer is weighted by `importance_weights` (methods.md §9): each token of the id ranked r weighs
1 + 1/log2(r+1), each separator token (" >") weighs 1, so the top of the list matters most.
"""
from __future__ import annotations

import json
import math
import random
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from ..config import DataConfig
from .errors import DataError
from .formats import Message
from .load import PROGRESS_MIN_RECORDS, admit, finish_split, read_splits
from .render import Renderer, Sample, chat_template
from .skipped import Skipped, announce

SYSTEM_PROMPT = ("You are RankGPT, an intelligent assistant that can rank passages based on their "
                 "relevancy to the query.")
SEPARATOR = " > "
PASSAGE_TOKENS = 100  # Liu et al. (2025) cut every passage to 100 tokens


@dataclass
class RankingItem:
    query: str
    passages: list[str]
    order: list[int]
    "Gold order: indices into `passages`, best first (a permutation of all of them)."


@dataclass
class RankingSplits:
    train: list[Sample]
    val: list[Sample] | None
    stats: dict  # {"train": {...}, "val": {...}}: see `split_stats`
    format: str = "ranking"


# --------------------------------------------------------------------------------------------------
# prompt and answer


def clean_passage(tokenizer, text: str, max_tokens: int) -> str:
    """One line of at most `max_tokens` tokens: whitespace runs become one space (a newline would
    break the "[i] text" layout), then the text is cut after its `max_tokens`-th token (by character
    offsets, so the kept text is exactly the original's prefix)."""
    text = " ".join(text.split())
    if max_tokens <= 0:
        return text
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text if len(offsets) <= max_tokens else text[:offsets[max_tokens - 1][1]].rstrip()


def ranking_prompt(query: str, passages: list[str]) -> str:
    """The user message: the instruction, the query, one "[i] passage" line per candidate (already
    cleaned), and the output format (RankGPT's wording)."""
    n = len(passages)
    lines = "\n".join(f"[{i}] {p}" for i, p in enumerate(passages, start=1))
    return (f"I will provide you with {n} passages, each indicated by a numerical identifier [].\n"
            f"Rank the passages based on their relevance to the search query: {query}\n\n{lines}\n\n"
            f"Search Query: {query}\n"
            f"Rank the {n} passages above based on their relevance to the search query. All the passages "
            "should be included and listed using identifiers, in descending order of relevance. The output "
            "format should be [] > [], e.g., [2] > [1]. Only respond with the ranking results, do not say "
            "any word or explain.")


def ranking_messages(tokenizer, query: str, passages: list[str], passage_tokens: int = PASSAGE_TOKENS) -> list[Message]:
    """System and user messages that ask for an order of `passages` (labelled [1]..[n] as given)."""
    shown = [clean_passage(tokenizer, p, passage_tokens) for p in passages]
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": ranking_prompt(" ".join(query.split()), shown)}]


def answer_text(labels: list[int]) -> str:
    """"[3] > [1] > [2]" for 1-based labels, best first."""
    return SEPARATOR.join(f"[{i}]" for i in labels)


def shuffled_prompt(item: RankingItem, rng: random.Random | None) -> tuple[list[str], list[int]]:
    """(passages in prompt order, gold answer as 1-based prompt labels). With `rng` the prompt order is
    a random permutation; without it the passages keep their given order."""
    n = len(item.passages)
    shown = list(range(n))
    if rng is not None:
        rng.shuffle(shown)
    label = {src: pos + 1 for pos, src in enumerate(shown)}  # passage index -> its "[i]" in the prompt
    return [item.passages[i] for i in shown], [label[i] for i in item.order]


def sub_list(item: RankingItem, rng: random.Random, min_passages: int) -> RankingItem:
    """A random part of the list, from `min_passages` candidates to all of them, always holding the gold
    first: the paper trains on lists of varying length (methods.md §9), and a model that only ever saw
    k candidates keeps writing k ids for a sliding window of fewer."""
    n = len(item.passages)
    m = rng.randint(min(min_passages, n), n)
    keep = {item.order[0], *rng.sample(item.order[1:], m - 1)}
    kept = sorted(keep)  # given order: the tie order of the gold ranking stays
    index = {src: j for j, src in enumerate(kept)}
    return RankingItem(item.query, [item.passages[i] for i in kept], [index[i] for i in item.order if i in keep])


# --------------------------------------------------------------------------------------------------
# importance weights


def rank_weight(r: int) -> float:
    """Weight of the tokens of the id ranked r (1-based): 1 + 1/log2(r + 1), so 2 for the first."""
    return 1.0 + 1.0 / math.log2(r + 1)


def importance_weights(answer: str, spans: list[tuple[int, int]]) -> list[float]:
    """Weights of the tokens of an answer "[a] > [b] > ...", given each token's character span in it.

    A token holding a '>' is a separator: weight 1, and the rank moves on after it. Every other token
    (brackets, digits, spaces) belongs to the id of the current rank r and weighs `rank_weight(r)`.
    This is the reference's rule (fullrank's model.py marks the token "▁>" as separator and weighs all
    other answer tokens by the running rank), read on characters so it holds for any tokenizer.
    """
    weights, r = [], 1
    for start, end in spans:
        if ">" in answer[max(start, 0):max(end, 0)]:
            weights.append(1.0)
            r += 1
        else:
            weights.append(rank_weight(r))
    return weights


def render_ranking(renderer: Renderer, messages: list[Message], answer: str) -> Sample:
    """The chat (prompt + answer) as a Sample whose answer tokens carry the importance weights.

    The renderer decides which tokens train (the answer and its turn terminator), exactly as for SFT;
    the answer's tokens are then re-weighted by their character spans (offset mapping), the
    terminator keeps weight 1 (the reference gives it the last rank's weight, 1 + 1/log2(n+1))."""
    chat = messages + [{"role": "assistant", "content": answer}]
    sample = renderer.chat(chat)
    tokenizer = renderer.tokenizer

    def render(m, generation):
        return tokenizer.apply_chat_template(m, chat_template=chat_template(tokenizer), tokenize=False,
                                             add_generation_prompt=generation)

    full = render(chat, False)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    if enc["input_ids"] != sample["input_ids"]:
        raise DataError("the chat template renders the ranking differently on a second pass")
    prefix = render(messages, True)
    start = full.find(answer, len(prefix) if full.startswith(prefix) else 0)
    if start < 0:
        raise DataError("cannot find the ranking answer in the text the chat template rendered")
    end = start + len(answer)
    offsets = enc["offset_mapping"]
    ends = [e for _, e in offsets]
    first, weights = bisect_left(ends, start + 1), list(sample["weights"])
    inside = [t for t in range(first, len(offsets)) if offsets[t][0] < end and weights[t] > 0]
    spans = [(offsets[t][0] - start, offsets[t][1] - start) for t in inside]
    for t, w in zip(inside, importance_weights(answer, spans)):
        weights[t] = w
    return {"input_ids": sample["input_ids"], "weights": weights}


# --------------------------------------------------------------------------------------------------
# records


def ranking_item(fields: dict[str, Any], where: str) -> RankingItem:
    """Check one raw record and return its query, passage texts and gold order."""
    query = fields.get("query")
    if not isinstance(query, str) or not query.strip():
        state = "missing" if query is None else ("empty" if isinstance(query, str) else type(query).__name__)
        raise DataError(f"{where}: field 'query' is {state}; expected a non-empty string "
                        f"(the record has [{', '.join(map(str, fields))}])")
    passages = _json_cell(fields.get("passages"), where, "passages")
    if not isinstance(passages, list) or not passages:
        raise DataError(f"{where}: field 'passages' must be a non-empty list of strings or {{id, text}} objects")
    ids, texts = _passages(passages, where)
    has_ranking, has_relevance = fields.get("ranking") is not None, fields.get("relevance") is not None
    if has_ranking == has_relevance:
        raise DataError(f"{where}: give exactly one of 'ranking' (every passage id, best first) and "
                        f"'relevance' (a grade per passage)")
    if has_ranking:
        order = _ranking(_json_cell(fields["ranking"], where, "ranking"), ids, where)
    else:
        order = _relevance(_json_cell(fields["relevance"], where, "relevance"), ids, where)
    return RankingItem(query=query, passages=texts, order=order)


def _json_cell(value: Any, where: str, name: str) -> Any:
    """A list/dict field, parsed from JSON text when it comes from a CSV cell."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: field '{name}' is a string but not valid JSON ({e.msg})") from None
    return value


def _passages(passages: list, where: str) -> tuple[list, list[str]]:
    """(ids, texts): ids are the `id` fields, or 1-based positions for plain strings."""
    ids, texts = [], []
    for i, p in enumerate(passages):
        if isinstance(p, str):
            ids.append(i + 1)
            texts.append(p)
        elif isinstance(p, dict) and isinstance(p.get("text"), str) and p.get("id") is not None:
            ids.append(p["id"])
            texts.append(p["text"])
        else:
            what = "an object without a string 'text' and an 'id'" if isinstance(p, dict) else type(p).__name__
            raise DataError(f"{where}: passages[{i}] is {what}; expected a string or {{\"id\": ..., \"text\": str}}")
    first: dict[str, int] = {}
    for k, x in enumerate(ids):  # ids compare as text: 1 and "1" are one id, as in a JSON object's keys
        j = first.setdefault(str(x), k)
        if j != k:
            raise DataError(f"{where}: passages[{k}].id {str(x)!r} is the id of passages[{j}] too")
    return ids, texts


def _ranking(ranking: Any, ids: list, where: str) -> list[int]:
    if not isinstance(ranking, list):
        raise DataError(f"{where}: field 'ranking' is {type(ranking).__name__}; expected a list of passage ids")
    index = {str(x): i for i, x in enumerate(ids)}
    order, seen = [], set()
    for k, x in enumerate(ranking):
        i = index.get(str(x))
        if i is None:
            raise DataError(f"{where}: ranking[{k}] = {x!r} is not a passage id (ids: "
                            f"{', '.join(map(str, ids[:8]))}{', ...' if len(ids) > 8 else ''})")
        if i in seen:
            raise DataError(f"{where}: ranking[{k}] = {x!r} appears twice")
        seen.add(i)
        order.append(i)
    if len(order) != len(ids):
        raise DataError(f"{where}: field 'ranking' orders {len(order)} of {len(ids)} passages; it must list "
                        "them all (or give 'relevance' grades instead)")
    return order


def _relevance(relevance: Any, ids: list, where: str) -> list[int]:
    if isinstance(relevance, dict):
        index = {str(x): i for i, x in enumerate(ids)}
        unknown = [k for k in relevance if str(k) not in index]
        if unknown:
            raise DataError(f"{where}: relevance names {unknown[0]!r}, which is not a passage id")
        grades = [relevance.get(str(x), relevance.get(x, 0)) for x in ids]
    elif isinstance(relevance, list):
        if len(relevance) != len(ids):
            raise DataError(f"{where}: field 'relevance' has {len(relevance)} grades for {len(ids)} passages")
        grades = relevance
    else:
        raise DataError(f"{where}: field 'relevance' is {type(relevance).__name__}; expected a list of grades "
                        "or {id: grade}")
    for k, g in enumerate(grades):
        if isinstance(g, bool) or not isinstance(g, (int, float)):
            raise DataError(f"{where}: relevance grade of passage {ids[k]!r} is {g!r}; expected a number")
    return sorted(range(len(ids)), key=lambda i: -grades[i])  # stable: ties keep the given order


# --------------------------------------------------------------------------------------------------
# loading


def load_rankings(cfg: DataConfig, tokenizer, *, passage_tokens: int = PASSAGE_TOKENS, shuffle: bool = True,
                  importance: bool = True, min_passages: int | None = None, seed: int = 0,
                  report: bool = True) -> RankingSplits:
    """Read, split and render ranking records into weighted Samples; the split rules of `load_data`.
    With `min_passages`, each training record shows a random part of its list (`sub_list`).

    Record i of a split is shown in a prompt order drawn from (`seed`, split, i): the same order on
    every run and rank. `importance=False` weighs every answer token 1 (plain SFT on the answer).

    Raises:
        DataError: a missing file, a bad record (the message names it and the field), or a split left
        with no usable sample.
    """
    if cfg.format != "auto":
        raise DataError(f"data.format={cfg.format} cannot feed the listwise objective; ranking records are "
                        "{query, passages, ranking|relevance} (leave data.format=auto)")
    records, val_records, val_name = read_splits(cfg, seed)
    renderer = Renderer(tokenizer, assistant_turns="last")
    opts = dict(passage_tokens=passage_tokens, shuffle=shuffle, importance=importance, seed=seed)
    train, train_stats = _build(records, cfg, renderer, cfg.train, "train", min_passages=min_passages, **opts)
    stats, val = {"train": train_stats}, None
    if val_records is not None:  # validation lists stay whole
        val, stats["val"] = _build(val_records, cfg, renderer, val_name, "val", min_passages=None, **opts)
    if report:
        announce(stats, cfg.max_length)
    return RankingSplits(train=train, val=val, stats=stats)


def ranking_sample(renderer: Renderer, item: RankingItem, *, passage_tokens: int = PASSAGE_TOKENS,
                   rng: random.Random | None = None, importance: bool = True) -> Sample:
    """One training Sample of an item: its (shuffled, with `rng`) prompt and weighted gold answer."""
    passages, labels = shuffled_prompt(item, rng)
    messages = ranking_messages(renderer.tokenizer, item.query, passages, passage_tokens)
    answer = answer_text(labels)
    if importance:
        return render_ranking(renderer, messages, answer)
    return renderer.chat(messages + [{"role": "assistant", "content": answer}])


def _build(records, cfg: DataConfig, renderer: Renderer, name: str, split: str, *, passage_tokens: int,
           shuffle: bool, importance: bool, seed: int, min_passages: int | None):
    samples: list[Sample] = []
    skipped = Skipped()
    bar = tqdm(records, desc=f"tokenizing {name}", unit=" records", disable=len(records) < PROGRESS_MIN_RECORDS)
    for i, record in enumerate(bar):
        item = ranking_item(record.fields, record.where)
        if min_passages:
            item = sub_list(item, random.Random(f"tunesmith-sublist:{seed}:{split}:{i}"), min_passages)
        rng = random.Random(f"tunesmith-rank:{seed}:{split}:{i}") if shuffle else None
        try:
            sample = ranking_sample(renderer, item, passage_tokens=passage_tokens, rng=rng, importance=importance)
        except DataError as e:
            raise DataError(f"{record.where}: {e}") from None
        admit(sample, record.where, cfg, skipped, samples)
    return finish_split(samples, len(records), skipped, cfg, name, "ranking samples")


# --------------------------------------------------------------------------------------------------
# candidate lists from a retrieval run


def candidate_order(scores: dict[str, float]) -> list[str]:
    """Document ids of one query's run, best first; equal scores in ascending id order (the rule of
    eval.retrieval.ranked, so "the BM25 order" means one thing everywhere)."""
    return [d for d, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))]


def ranking_records(corpus: dict, queries: dict[str, str], qrels: dict[str, dict[str, int]],
                    run: dict[str, dict[str, float]], *, k: int = 20, require_relevant: bool = True,
                    add_relevant: bool = False) -> list[dict]:
    """Raw ranking records from a first-stage run (e.g. `data.mining.bm25_search`): each judged
    query's top `k` candidates in run order, with their qrels grades as `relevance` (unjudged: 0),
    so the gold order is relevant first, then the rest in run order.

    `add_relevant` (for training lists) puts the query's best judged document in place of the k-th
    candidate when the run missed every relevant one: the model then learns from hard negatives
    around a known positive, as rerankers are usually trained. Otherwise `require_relevant` leaves
    such queries out: their gold order would only be the run's own order, which a shuffled prompt
    cannot reveal."""
    from .mining import doc_text

    records = []
    for qid, judged in qrels.items():
        if qid not in queries or qid not in run:
            continue
        top = candidate_order(run[qid])[:k]
        grades = {d: judged[d] for d in top if judged.get(d, 0) > 0}
        if not grades and add_relevant:
            best = max((d for d in judged if judged[d] > 0 and d in corpus), key=lambda d: judged[d], default=None)
            if best is not None:
                top = top[:k - 1] + [best]
                grades = {best: judged[best]}
        if require_relevant and not grades:
            continue
        records.append({"qid": qid, "query": queries[qid],
                        "passages": [{"id": d, "text": doc_text(corpus[d])} for d in top],
                        "relevance": grades})
    return records
