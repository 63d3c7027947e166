"""The `knowledge` task: answer from the right source — instruction knowledge (a user's assumption) >
context knowledge (passages) > parametric knowledge (what the model knows), as in "Establishing
Knowledge Preference in LMs" (HierPref data). Generated from a seed; nothing is downloaded.

    task = get_task("knowledge")
    ex = task.examples("test")[0]
    ex.prompt     # 'Instruction: Assume that ...\\n\\nContext:\\n[1] ...\\n\\nQuestion: Where was ... born?'
    ex.reference  # the object the hierarchy dictates
    ex.meta       # {"group": "instruction_conflict", "sources": {"instruction": .., "context": .., ...}, ...}

Every example belongs to one condition (`meta["group"]`; `tunesmith eval --task knowledge` reports the
hierarchy-following rate per condition):

  parametric            no instruction, no context: a real fact the model knows (knowledge_data.PARAMETRIC)
  context_support       a passage states a synthetic fact the model cannot know
  context_conflict      a counterfactual passage contradicts a real fact the model knows -> the context
  instruction_conflict  an assumption contradicts the passage (and, on real facts, the model) -> the instruction
  instruction_noisy     an assumption + distractor passages about look-alike subjects (half the time
                        also a conflicting passage) -> the instruction
  context_noisy         the relevant passage among distractor passages -> the context
  multihop_context      two hops, the first overridden by the instruction, the second read from the
                        context ("the founder of X" -> the assumed founder -> the founder's birthplace)
  multihop_parametric   two hops, the first from the instruction or the context (a person born in a
                        real city), the second from the model's knowledge (that city's country)

Scoring (`score`): the answer is the first non-empty line of the output, normalised (accents dropped,
lowercase, every non-alphanumeric run turned into one space), the question's subject taken out (a
restated "Mexico City is in ..." names no country). It is correct when it contains the gold
object (or one of its aliases, e.g. "UK" for United Kingdom) as whole words, and no answer of a
conflicting source. Otherwise the verdict's error says which source the model followed: "followed
context", "followed parametric", "followed noise", "mixed: instruction + context", or "followed no source".

Splits are disjoint in entities and facts: each split builds its own synthetic world from its own
names, and the real facts are divided between the splits by (relation, subject). Validation and
test mix the conditions evenly, in round-robin order (any prefix is balanced); train follows MIX,
the HierPref-style training mix.
"""
from __future__ import annotations

import random
import re
import unicodedata

from . import knowledge_data as kd
from .base import SPLITS, Example, Verdict
from ._common import first_line_end, rng_for

GROUPS = ("parametric", "context_support", "context_conflict", "instruction_conflict", "instruction_noisy",
          "context_noisy", "multihop_context", "multihop_parametric")
MIX = {"parametric": 0.10, "context_support": 0.10, "context_conflict": 0.15, "instruction_conflict": 0.15,
       "instruction_noisy": 0.10, "context_noisy": 0.15, "multihop_context": 0.15, "multihop_parametric": 0.10}
"Share of each condition in the training split (and in `tunesmith synth knowledge` data)."
SHARES = {"train": 0.6, "validation": 0.2, "test": 0.2}
"How the real facts are divided between the splits (each split's synthetic world has names of its own)."
NOISE = 3
"Distractor passages in a noisy context."
PRIORITY = ("instruction", "context", "parametric")
"The knowledge hierarchy, highest first."
"Distractor passages in a noisy context."
SYSTEM = ("Answer the question with a short answer only. Use the sources in this order: an assumption in the "
          "instruction comes first, even when the context or what you know says otherwise; then the context, "
          "even when it contradicts what you know; only when neither answers, use your own knowledge.")

HOPS = {  # (first relation, second relation): question wordings about the first subject
    ("founded_by", "born_in"): ("In which town was the founder of {s} born?",
                                "Where was the person who founded {s} born?"),
    ("invented_by", "born_in"): ("In which town was the inventor of the {s} born?",
                                 "Where was the person who invented the {s} born?"),
    ("born_in", "located_in"): ("In which country was {s} born?", "In which country is the birthplace of {s}?"),
    ("headquartered_in", "located_in"): ("In which country does {s} have its headquarters?",
                                         "In which country are the headquarters of {s}?"),
}


class KnowledgeError(ValueError):
    """A knowledge task option that cannot be used; the message says which."""


def render(question: str, instruction: str | None = None, passages: list[str] | tuple = ()) -> str:
    """The user message: the instruction's assumption, the numbered context passages, the question."""
    parts = [f"Instruction: {instruction}"] if instruction else []
    if passages:
        parts.append("Context:\n" + "\n".join(f"[{i}] {p}" for i, p in enumerate(passages, 1)))
    parts.append(f"Question: {question}")
    return "\n\n".join(parts)


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def mentions(text: str, obj: str) -> bool:
    """Whether normalised `text` contains `obj` or one of its aliases as whole words."""
    padded = f" {normalise(text)} "
    return any(f" {normalise(a)} " in padded for a in kd.aliases(obj) if normalise(a))


def without_subject(answer: str, subject: str) -> str:
    """`answer` normalised, with the question's subject taken out: restating "Mexico City is in ..."
    names neither Mexico nor any other answer."""
    subject = normalise(subject)
    return f" {normalise(answer)} ".replace(f" {subject} ", " ") if subject else normalise(answer)


def answer_line(prediction: str) -> str:
    return next((line.strip() for line in prediction.splitlines() if line.strip()), "")


class Builder:
    """Draws the examples of one split: its synthetic world, its real facts, a seeded rng."""

    def __init__(self, world: kd.World, real: list[tuple[str, str, str]], rng: random.Random):
        self.world, self.real, self.rng = world, real, rng
        # cities whose name holds no country name (an answer copied from "Mexico City" proves nothing)
        self.cities = [f for f in real if f[0] == "city_country" and not mentions(f[1], f[2])]

    # -------------------------------------------------------------- fact draws
    def synthetic(self, relations=kd.SYNTHETIC_RELATIONS) -> tuple[str, str, str]:
        relation = self.rng.choice(relations)
        subject = self.rng.choice(self.world.subjects(relation))
        return relation, subject, self.world.facts[(relation, subject)]

    def other(self, relation: str, *taken: str) -> str:
        """An object of `relation`'s kind that is none of `taken` (nor an alias of one)."""
        if relation in kd.SYNTHETIC_RELATIONS:
            pool = self.world.objects(kd.RELATIONS[relation].kind)
        else:
            pool = kd.real_objects(relation)
        pool = [o for o in pool if not any(mentions(o, t) or mentions(t, o) for t in taken)]
        return self.rng.choice(pool)

    def distractors(self, relation: str, subject: str, n: int, avoid: tuple[str, ...]) -> tuple[list[str], list[str]]:
        """Up to `n` true passages about other subjects — mostly the same relation (look-alike facts),
        else any — and the objects they name; none names an object in `avoid`."""
        passages, objects = [], []
        facts = {**self.world.facts, **{(r, s): o for r, s, o in self.real}}
        pool = [k for k in facts if k[1] != subject]
        alike = [k for k in pool if k[0] == relation]
        for _ in range(100 * n):
            if len(passages) == n:
                break
            r, s = self.rng.choice(alike if alike and self.rng.random() < 0.6 else pool)
            o = facts[(r, s)]
            text = kd.RELATIONS[r].state(s, o)
            if text in passages or any(mentions(text, a) for a in avoid):
                continue
            passages.append(text)
            objects.append(o)
        return passages, objects

    def fact(self, real_share: float) -> tuple[str, str, str]:
        return self.rng.choice(self.real) if self.real and self.rng.random() < real_share else self.synthetic()

    def question(self, relation: str, subject: str) -> str:
        return kd.RELATIONS[relation].question(subject, self.rng)

    def shuffled(self, passages: list[str]) -> list[str]:
        passages = list(passages)
        self.rng.shuffle(passages)
        return passages

    # -------------------------------------------------------------- conditions
    # Each returns (prompt, meta); meta["sources"] maps a source to the answer it gives (for a
    # multi-hop question: the end of the chain whose first hop comes from that source), "noise" to
    # the objects of the distractor passages. The gold is follow(sources).
    def parametric(self):
        r, s, o = self.rng.choice(self.real)
        return render(self.question(r, s)), {"sources": {"parametric": o}, "fact": [s, r, o]}

    def context_support(self):
        r, s, o = self.synthetic()
        return (render(self.question(r, s), passages=[kd.RELATIONS[r].state(s, o)]),
                {"sources": {"context": o}, "fact": [s, r, o]})

    def context_conflict(self):
        r, s, o = self.rng.choice(self.real)
        cf = self.other(r, o)
        return (render(self.question(r, s), passages=[kd.RELATIONS[r].state(s, cf)]),
                {"sources": {"context": cf, "parametric": o}, "fact": [s, r, o]})

    def instruction_conflict(self):
        r, s, o = self.fact(0.5)
        real = r not in kd.SYNTHETIC_RELATIONS
        ctx = self.other(r, o) if real else o
        inst = self.other(r, o, ctx)
        rel = kd.RELATIONS[r]
        sources = {"instruction": inst, "context": ctx, **({"parametric": o} if real else {})}
        return (render(self.question(r, s), rel.assume(s, inst), [rel.state(s, ctx)]),
                {"sources": sources, "fact": [s, r, o]})

    def instruction_noisy(self):
        r, s, o = self.fact(0.5)
        real = r not in kd.SYNTHETIC_RELATIONS
        rel = kd.RELATIONS[r]
        inst = self.other(r, o)
        sources = {"instruction": inst, **({"parametric": o} if real else {})}
        passages = []
        if self.rng.random() < 0.5:  # the relevant passage too, conflicting with the instruction
            ctx = o if not real else self.other(r, o, inst)
            passages.append(rel.state(s, ctx))
            sources["context"] = ctx
        noise, noise_objects = self.distractors(r, s, NOISE, tuple(sources.values()))
        sources["noise"] = noise_objects
        return (render(self.question(r, s), rel.assume(s, inst), self.shuffled(passages + noise)),
                {"sources": sources, "fact": [s, r, o]})

    def context_noisy(self):
        r, s, o = self.synthetic()
        noise, noise_objects = self.distractors(r, s, NOISE, (o,))
        passages = self.shuffled([kd.RELATIONS[r].state(s, o)] + noise)
        return (render(self.question(r, s), passages=passages),
                {"sources": {"context": o, "noise": noise_objects}, "fact": [s, r, o]})

    def multihop_context(self):
        (r1, r2), wordings = self.rng.choice(list(HOPS.items()))
        facts = self.world.facts
        s, mid = self.rng.choice([(s, o) for (r, s), o in facts.items() if r == r1])
        end = facts[(r2, mid)]
        alt = self.rng.choice([m for m in self.world.objects(kd.RELATIONS[r1].kind)
                               if m != mid and (r2, m) in facts and facts[(r2, m)] != end])
        first, second = kd.RELATIONS[r1], kd.RELATIONS[r2]
        passages = self.shuffled([first.state(s, mid), second.state(mid, end), second.state(alt, facts[(r2, alt)])])
        return (render(self.rng.choice(wordings).format(s=s), first.assume(s, alt), passages),
                {"sources": {"instruction": facts[(r2, alt)], "context": end}, "chain": [r1, r2],
                 "fact": [s, r1, mid]})

    def multihop_parametric(self):
        person = self.rng.choice(self.world.entities["person"])
        _, city, country = self.rng.choice(self.cities)
        rel = kd.RELATIONS["born_in"]
        question = self.rng.choice(HOPS[("born_in", "located_in")]).format(s=person)
        others = [f for f in self.cities if not mentions(f[2], country)]
        if self.rng.random() < 0.5 or not others:  # context hop, then parametric hop
            return (render(question, passages=[rel.state(person, city)]),
                    {"sources": {"context": country}, "chain": ["context", "parametric"],
                     "fact": [person, "born_in", city]})
        _, city2, country2 = self.rng.choice(others)
        return (render(question, rel.assume(person, city2), [rel.state(person, city)]),
                {"sources": {"instruction": country2, "context": country}, "chain": ["instruction", "parametric"],
                 "fact": [person, "born_in", city2]})


def follow(sources: dict) -> str:
    """The answer the hierarchy dictates: the highest-ranked source present (PRIORITY)."""
    for source in PRIORITY:
        if source in sources:
            return sources[source]
    raise KnowledgeError(f"no knowledge source among {sorted(sources)}")


def schedule(n: int, mix: dict[str, float]) -> list[str]:
    """`n` condition names in proportion to `mix`, interleaved (any prefix keeps the proportions)."""
    total = sum(mix.values())
    counts = dict.fromkeys(mix, 0)
    out = []
    for k in range(n):
        group = max(mix, key=lambda g: mix[g] / total * (k + 1) - counts[g])  # largest deficit first
        counts[group] += 1
        out.append(group)
    return out


def divide(items: list, seed: int, label: str) -> dict[str, list]:
    """Each item in one split, by SHARES (every split at least one item when there are three or more)."""
    items = list(items)
    random.Random(f"knowledge/{seed}/divide/{label}").shuffle(items)
    n_val = max(1, round(SHARES["validation"] * len(items))) if len(items) >= 3 else 0
    n_test = max(1, round(SHARES["test"] * len(items))) if len(items) >= 3 else 0
    return {"test": items[:n_test], "validation": items[n_test:n_test + n_val], "train": items[n_test + n_val:]}


def worlds(seed: int) -> dict[str, kd.World]:
    """The three splits' synthetic worlds, each from its own share of the names."""
    names: dict[str, dict] = {split: {} for split in SPLITS}
    for kind, size in kd.SIZES.items():
        pool = kd.name_pool(seed, kind, size * len(SPLITS))
        for k, split in enumerate(SPLITS):
            names[split][kind] = pool[k * size:(k + 1) * size]
    return {split: kd.build_world(names[split], rng_for("knowledge", seed, "world", split)) for split in SPLITS}


def real_splits(seed: int, facts: list[tuple[str, str, str]] | None = None) -> dict[str, list]:
    """The known real facts divided between the splits, relation by relation."""
    facts = kd.parametric_facts() if facts is None else facts
    out: dict[str, list] = {s: [] for s in SPLITS}
    for relation in sorted({f[0] for f in facts}):
        for split, part in divide([f for f in facts if f[0] == relation], seed, relation).items():
            out[split] += part
    return out


class KnowledgeTask:
    """The knowledge-preference benchmark; see the module docstring."""
    name = "knowledge"
    metric = "accuracy"
    system_prompt = SYSTEM
    answer_end = staticmethod(first_line_end)  # the scorer reads the first non-blank line only

    def __init__(self, seed: int = 0, n_train: int = 800, n_validation: int = 80, n_test: int = 160,
                 mix: dict[str, float] | None = None, real_facts: list | None = None, draw: int = 0):
        mix = dict(MIX if mix is None else mix)
        unknown = set(mix) - set(GROUPS)
        if unknown:
            raise KnowledgeError(f"unknown condition(s) {', '.join(sorted(unknown))}; choose from {', '.join(GROUPS)}")
        self.seed, self.mix = seed, {g: w for g, w in mix.items() if w > 0}
        self.sizes = {"train": n_train, "validation": n_validation, "test": n_test}
        self.real_facts = real_facts
        self.draw = draw
        "Seed of the example draws alone: other questions from the same worlds and splits."
        self._splits: dict[str, list[Example]] = {}

    def examples(self, split: str) -> list[Example]:
        if split not in SPLITS:
            raise ValueError(f"unknown split `{split}`; choose one of {', '.join(SPLITS)}")
        if split not in self._splits:
            self._splits[split] = self._generate(split)
        return list(self._splits[split])

    def score(self, prediction: str, example: Example) -> Verdict:
        """See the module docstring: gold contained, no conflicting source's answer contained."""
        answer = answer_line(prediction)
        text = without_subject(answer, example.meta.get("fact", [""])[0])
        followed = [src for src, obj in self._answers(example) if mentions(text, obj)]
        rivals = [src for src, obj in self._answers(example)
                  if not mentions(obj, example.reference) and mentions(text, obj)]
        if mentions(text, example.reference) and not rivals:
            return Verdict(True, 1.0, None, answer)
        if not followed:
            return Verdict(False, 0.0, "followed no source", answer)
        names = list(dict.fromkeys(followed))
        what = names[0] if len(names) == 1 else " + ".join(names)
        return Verdict(False, 0.0, f"followed {what}" if len(names) == 1 else f"mixed: {what}", answer)

    @staticmethod
    def _answers(example: Example) -> list[tuple[str, str]]:
        out = []
        for src, obj in example.meta["sources"].items():
            out += [(src, o) for o in (obj if isinstance(obj, list) else [obj])]
        return out

    def _generate(self, split: str) -> list[Example]:
        world = worlds(self.seed)[split]
        real = real_splits(self.seed, self.real_facts)[split]
        draw = [self.draw] if self.draw else []
        builder = Builder(world, real, rng_for("knowledge", self.seed, "examples", split, *draw))
        mix = self.mix if split == "train" else dict.fromkeys(self.mix, 1.0)
        if not real:  # no known real fact in this split: the conditions that need one cannot be built
            mix = {g: w for g, w in mix.items() if g not in ("parametric", "context_conflict", "multihop_parametric")}
        elif not builder.cities:
            mix.pop("multihop_parametric", None)
        if not mix:
            raise KnowledgeError(f"no condition can be built for split {split}")
        out, seen = [], set()
        for k, group in enumerate(schedule(self.sizes[split], mix)):
            for _ in range(50):  # a repeated prompt is drawn again
                prompt, meta = getattr(builder, group)()
                if prompt not in seen:
                    break
            seen.add(prompt)
            out.append(Example(f"knowledge-{split}-{k:04d}", prompt, follow(meta["sources"]), {"group": group, **meta}))
        return out
