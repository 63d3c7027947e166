"""The `retrieval` task: find the one document, in a corpus of look-alikes, that a paraphrased
question describes. Generated from a seed; nothing is downloaded.

    task = RetrievalTask(seed=0)
    corpus, queries, qrels = task.beir("test")    # BEIR shapes: {id: {"title","text"}}, {id: text}, {qid: {id: 1}}
    task.records("train")                         # [{"query", "positive", "negatives": [...], "domain"}]
    # also as training data: data.train=task:retrieval/train

Each query describes an entity (a company, person, product or venue) by its type and two or three
attributes, in words the document does not use (see retrieval_data): "Which clean power producer
based in Portugal was set up in the late eighties?" for a document about a renewable energy company
headquartered in Lisbon, founded 1987. Every query comes with `distractors` hard negatives: entities
of the same type that share all but one of the queried attributes, so the type alone or any two
attributes never single out the answer. Any other document that happens to fit the whole query is
judged relevant too.

Splits are disjoint in queries and in documents (each entity name belongs to one split, so no test
document is ever trained on) and in question frames (two frames are seen only in test). Attribute
wordings are shared: learning that Lisbon is in Portugal is the skill being trained.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from .base import SPLITS, Example
from ._common import rng_for
from .retrieval_data import DOMAINS, QUERY_FRAMES, Domain, article, company_name, entity_name, person_name

VERSION = 1
NAME_SHARE = {"train": (0, 70), "validation": (70, 80), "test": (80, 100)}
"Percent ranges of a name's hash: the split each entity name belongs to."


@dataclass
class Entity:
    domain: Domain
    name: str
    values: dict


@dataclass
class Mention:
    attr: object
    level: str
    text: str

    def fits(self, entity: Entity, target: Entity) -> bool:
        name = self.attr.name
        return self.attr.key(entity.values[name], self.level) == self.attr.key(target.values[name], self.level)


class RetrievalTask:
    """The built-in retrieval benchmark; see the module docstring. Sizes count queries; each query
    brings its positive and `distractors` documents to its split's corpus."""
    name = "retrieval"
    metric = "ndcg@10"
    system_prompt = None

    def __init__(self, seed: int = 0, n_train: int = 2000, n_validation: int = 100, n_test: int = 300,
                 distractors: int = 4, literal: float = 0.6):
        self.seed = seed
        self.sizes = {"train": n_train, "validation": n_validation, "test": n_test}
        self.distractors = distractors
        self.literal = literal
        "Chance that a query uses the document's own wording for an attribute (a city, an exact year)."
        frames = list(range(len(QUERY_FRAMES)))
        rng_for("retrieval", seed, "frames").shuffle(frames)
        self.frames = {"test": frames[:2], "validation": frames[2:3], "train": frames[3:]}
        self._splits: dict[str, dict] = {}

    # ------------------------------------------------------------------ public views

    def beir(self, split: str = "test") -> tuple[dict, dict, dict]:
        """(corpus, queries, qrels) of `split`, in the shapes eval.retrieval and data.beir use."""
        s = self._split(split)
        return dict(s["corpus"]), dict(s["queries"]), {q: dict(r) for q, r in s["qrels"].items()}

    def records(self, split: str) -> list[dict]:
        """Training rows: query, positive text, its distractors as hard negatives, and the domain."""
        return [dict(r, negatives=list(r["negatives"])) for r in self._split(split)["records"]]

    def examples(self, split: str) -> list[Example]:
        """The queries as Examples (prompt = query, reference = the positive document's text)."""
        s = self._split(split)
        return [Example(qid, r["query"], r["positive"], {"domain": r["domain"], "positive_id": pid})
                for qid, r, pid in zip(s["queries"], s["records"], s["positive_ids"])]

    def domains(self, split: str) -> dict[str, str]:
        """Document id -> domain (company, person, product, venue)."""
        return dict(self._split(split)["doc_domain"])

    # ------------------------------------------------------------------ generation

    def _split(self, split: str) -> dict:
        if split not in SPLITS:
            raise ValueError(f"unknown split `{split}`; choose one of {', '.join(SPLITS)}")
        if split not in self._splits:
            self._splits[split] = self._generate(split)
        return self._splits[split]

    def _owns(self, split: str, name: str) -> bool:
        digest = hashlib.sha256(f"retrieval/{self.seed}/{name}".encode()).digest()
        lo, hi = NAME_SHARE[split]
        return lo <= int.from_bytes(digest[:4], "big") % 100 < hi

    def _entity(self, domain: Domain, rng: random.Random, split: str, used: set, values: dict | None = None) -> Entity:
        """A new entity of `domain` with a name of `split` not used yet; `values` fixes some attributes."""
        while True:
            name = entity_name(domain.name, rng)
            if name not in used and self._owns(split, name):
                used.add(name)
                break
        drawn = {a.name: a.draw(rng) for a in (domain.kind, *domain.attrs)}
        return Entity(domain, name, {**drawn, **(values or {})})

    def _sibling(self, pos: Entity, mentions: list[Mention], changed: Mention, rng, split, used) -> Entity:
        """A hard negative: fits every mention of the query but `changed`, which it must miss."""
        keep = {m.attr.name: pos.values[m.attr.name] for m in mentions if m is not changed}
        while True:
            sib = self._entity(pos.domain, rng, split, used, keep)
            if not changed.fits(sib, pos):
                return sib
            used.discard(sib.name)

    def _query(self, pos: Entity, rng: random.Random, split: str) -> tuple[str, list[Mention]]:
        domain = pos.domain
        picked = [domain.kind, *rng.sample(domain.attrs, 3 if rng.random() < 0.3 else 2)]
        mentions = []
        for attr in picked:
            text, level = attr.mention(pos.values[attr.name], rng, rng.random() < self.literal)
            mentions.append(Mention(attr, level, text))
        clauses = [rng.choice(domain.query_patterns[m.attr.name]).format(q=m.text) for m in mentions[1:]]
        joined = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]
        frame = QUERY_FRAMES[rng.choice(self.frames[split])]
        kind = mentions[0].text
        query = frame.format(kind=kind, a_kind=article(kind), clauses=joined)
        return query[0].upper() + query[1:] if frame[0].isupper() else query, mentions

    def _document(self, e: Entity, rng: random.Random) -> dict:
        d = e.domain
        first = e.name.split()[0] if d.name == "person" else e.name
        kind = d.kind.doc(e.values[d.kind.name], rng)
        sentences = [rng.choice(d.doc_patterns[a.name]).format(v=a.doc(e.values[a.name], rng), name=e.name,
                                                                first=first) for a in d.attrs]
        rng.shuffle(sentences)
        extra = rng.choice(d.extra).format(person=person_name(rng), company=company_name(rng), first=first)
        sentences.insert(rng.randrange(len(sentences) + 1), extra)
        intro = rng.choice(d.intro).format(name=e.name, kind=kind, a_kind=article(kind))
        return {"title": e.name, "text": " ".join([intro, *sentences])}

    def _generate(self, split: str) -> dict:
        rng = rng_for("retrieval", self.seed, VERSION, split)
        used: set[str] = set()
        clusters = []
        for i in range(self.sizes[split]):
            pos = self._entity(DOMAINS[i % len(DOMAINS)], rng, split, used)
            query, mentions = self._query(pos, rng, split)
            sibs = [self._sibling(pos, mentions, mentions[j % len(mentions)], rng, split, used)
                    for j in range(self.distractors)]
            clusters.append((query, mentions, pos, sibs))
        entities = [e for _, _, pos, sibs in clusters for e in (pos, *sibs)]
        order = list(range(len(entities)))
        rng.shuffle(order)  # ids carry no hint of which document is the positive
        ids = {id(entities[j]): f"{split}-d{k:05d}" for k, j in enumerate(order)}
        docs = {id(e): self._document(e, rng) for e in entities}
        by_kind: dict[tuple, list[Entity]] = {}
        for e in entities:
            by_kind.setdefault((e.domain.name, e.values[e.domain.kind.name]), []).append(e)
        out = {"corpus": {}, "queries": {}, "qrels": {}, "records": [], "doc_domain": {}, "positive_ids": []}
        for j in sorted(order, key=lambda j: ids[id(entities[j])]):
            e = entities[j]
            out["corpus"][ids[id(e)]] = docs[id(e)]
            out["doc_domain"][ids[id(e)]] = e.domain.name
        for k, (query, mentions, pos, sibs) in enumerate(clusters):
            qid = f"{split}-q{k:05d}"
            fitting = [e for e in by_kind[(pos.domain.name, pos.values[pos.domain.kind.name])]
                       if all(m.fits(e, pos) for m in mentions)]
            out["queries"][qid] = query
            out["qrels"][qid] = {ids[id(e)]: 1 for e in fitting}
            out["records"].append({"query": query, "positive": _text(docs[id(pos)]),
                                   "negatives": [_text(docs[id(s)]) for s in sibs], "domain": pos.domain.name})
            out["positive_ids"].append(ids[id(pos)])
        return out


def _text(doc: dict) -> str:
    return f"{doc['title']} {doc['text']}".strip()
