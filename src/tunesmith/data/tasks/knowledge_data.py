"""The `knowledge` task's sources: relations with their wordings, a synthetic world of made-up
entities the model has never seen, and real facts a small instruct model knows.

A fact is (subject, relation, object). Every relation words it three ways: as a question ("In which
town was Dorvan Keltis born?"), as a context sentence ("Dorvan Keltis was born in Vessamere.") and as
a user assumption ("Assume that Dorvan Keltis was born in Vessamere."); the hierarchy is taught and
measured by putting different objects in the three places.

The synthetic world is made of names built from syllables (people, towns, countries, companies,
inventions) linked by born_in, located_in, capital_of, founded_by, headquartered_in and invented_by,
so chains such as company -> founder -> birthplace -> country exist for multi-hop questions. Each
split builds its own world from its own share of the names: no test entity appears in training.

REAL_FACTS lists candidate facts a 135M instruct model might know; PARAMETRIC keeps those that
SmolLM2-135M-Instruct answered correctly when asked with the task's system prompt and no context
(greedy, checked by `python benchmarks/synthesis/knowledge/check_parametric.py`, which prints the
list below). Only those serve as parametric knowledge: a fact the model does not know cannot show
whether a context overrides what it knows.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Relation:
    name: str
    questions: tuple[str, ...]
    "Question wordings, `{s}` = subject."
    statement: str
    "A context sentence, `{s}` and `{o}`."
    kind: str
    "What the object is (town, person, country, ...): counterfactual objects are drawn from the same kind."

    def question(self, subject: str, rng: random.Random) -> str:
        return rng.choice(self.questions).format(s=subject)

    def state(self, subject: str, obj: str) -> str:
        return self.statement.format(s=subject, o=obj)

    def assume(self, subject: str, obj: str) -> str:
        s = self.state(subject, obj)
        return f"Assume that {s[0].lower() + s[1:] if not s.startswith(subject) else s}"


def _rel(name, kind, statement, *questions) -> Relation:
    return Relation(name, questions, statement, kind)


RELATIONS = {r.name: r for r in [
    # the synthetic world
    _rel("born_in", "town", "{s} was born in {o}.",
         "In which town was {s} born?", "Where was {s} born?", "What is the birthplace of {s}?"),
    _rel("located_in", "country", "{s} is a town in {o}.",
         "In which country is {s}?", "Which country is the town of {s} in?", "{s} lies in which country?"),
    _rel("capital_of", "town", "The capital of {s} is {o}.",
         "What is the capital of {s}?", "Which town is the capital of {s}?", "Name the capital of {s}."),
    _rel("founded_by", "person", "{s} was founded by {o}.",
         "Who founded {s}?", "Who is the founder of {s}?", "{s} was founded by whom?"),
    _rel("headquartered_in", "town", "{s} has its headquarters in {o}.",
         "Where is {s} headquartered?", "In which town are the headquarters of {s}?",
         "Where does {s} have its headquarters?"),
    _rel("invented_by", "person", "The {s} was invented by {o}.",
         "Who invented the {s}?", "Who is the inventor of the {s}?", "The {s} was invented by whom?"),
    # real facts
    _rel("capital", "city", "The capital of {s} is {o}.",
         "What is the capital of {s}?", "Which city is the capital of {s}?", "Name the capital city of {s}."),
    _rel("city_country", "real_country", "{s} is a city in {o}.",
         "In which country is the city of {s}?", "Which country is {s} in?", "{s} is a city in which country?"),
    _rel("language", "language", "The official language of {s} is {o}.",
         "What language is spoken in {s}?", "What is the official language of {s}?",
         "Which language do people in {s} speak?"),
    _rel("currency", "currency", "The currency of {s} is the {o}.",
         "What is the currency of {s}?", "Which currency is used in {s}?", "What money is used in {s}?"),
    _rel("continent", "continent", "{s} is a country in {o}.",
         "On which continent is {s}?", "Which continent is {s} in?", "{s} is on which continent?"),
    _rel("author", "writer", "{s} was written by {o}.",
         "Who wrote {s}?", "Who is the author of {s}?", "{s} was written by whom?"),
    _rel("symbol", "symbol", "The chemical symbol of {s} is {o}.",
         "What is the chemical symbol of {s}?", "Which symbol stands for {s} in chemistry?",
         "What is the symbol for the element {s}?"),
]}


# ----------------------------------------------------------------------------- real facts

ALIASES = {
    "the United States": ("USA", "U.S.", "America", "US"),
    "the United Kingdom": ("UK", "Britain", "England"),
    "William Shakespeare": ("Shakespeare",), "Jane Austen": ("Austen",), "George Orwell": ("Orwell",),
    "Mark Twain": ("Twain",), "J.K. Rowling": ("Rowling",), "Charles Dickens": ("Dickens",),
    "Leo Tolstoy": ("Tolstoy",), "Homer": ("Homer",), "Miguel de Cervantes": ("Cervantes",),
    "Mandarin": ("Mandarin", "Chinese"), "Washington, D.C.": ("Washington",), "yen": ("yen",),
    "pound": ("pound", "pound sterling"), "dollar": ("dollar",), "euro": ("euro",), "rupee": ("rupee",),
    "ruble": ("ruble", "rouble"), "yuan": ("yuan", "renminbi"), "peso": ("peso",), "won": ("won",),
}

# (relation, subject, object): candidates; PARAMETRIC below keeps the ones the model knows.
REAL_FACTS = [
    *[("capital", s, o) for s, o in [
        ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
        ("Russia", "Moscow"), ("China", "Beijing"), ("the United Kingdom", "London"), ("Egypt", "Cairo"),
        ("Canada", "Ottawa"), ("Australia", "Canberra"), ("India", "New Delhi"), ("Greece", "Athens"),
        ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
        ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Turkey", "Ankara"), ("South Korea", "Seoul"),
        ("Thailand", "Bangkok"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Cuba", "Havana"),
        ("the United States", "Washington, D.C."), ("Argentina", "Buenos Aires"), ("Denmark", "Copenhagen"),
        ("Finland", "Helsinki"), ("Hungary", "Budapest"), ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels")]],
    *[("city_country", s, o) for s, o in [
        ("Paris", "France"), ("Tokyo", "Japan"), ("Rome", "Italy"), ("Berlin", "Germany"), ("Madrid", "Spain"),
        ("Moscow", "Russia"), ("Beijing", "China"), ("London", "the United Kingdom"), ("Cairo", "Egypt"),
        ("Sydney", "Australia"), ("Toronto", "Canada"), ("Mumbai", "India"), ("Athens", "Greece"),
        ("Istanbul", "Turkey"), ("Amsterdam", "the Netherlands"), ("Chicago", "the United States"), ("Lisbon", "Portugal"),
        ("Dublin", "Ireland"), ("Stockholm", "Sweden"), ("Vienna", "Austria"), ("Seoul", "South Korea"),
        ("Bangkok", "Thailand"), ("Mexico City", "Mexico"), ("Rio de Janeiro", "Brazil"), ("Warsaw", "Poland"),
        ("Oslo", "Norway"), ("Barcelona", "Spain"), ("Milan", "Italy"), ("Munich", "Germany"), ("Osaka", "Japan")]],
    *[("language", s, o) for s, o in [
        ("France", "French"), ("Spain", "Spanish"), ("Germany", "German"), ("Japan", "Japanese"),
        ("Brazil", "Portuguese"), ("Italy", "Italian"), ("China", "Mandarin"), ("Russia", "Russian"),
        ("Greece", "Greek"), ("Mexico", "Spanish"), ("Portugal", "Portuguese"), ("Poland", "Polish"),
        ("Turkey", "Turkish"), ("Sweden", "Swedish"), ("the Netherlands", "Dutch"), ("South Korea", "Korean")]],
    *[("currency", s, o) for s, o in [
        ("Japan", "yen"), ("the United Kingdom", "pound"), ("the United States", "dollar"), ("India", "rupee"),
        ("Russia", "ruble"), ("China", "yuan"), ("Mexico", "peso"), ("Germany", "euro"), ("France", "euro"),
        ("South Korea", "won"), ("Italy", "euro"), ("Canada", "dollar")]],
    *[("continent", s, o) for s, o in [
        ("Kenya", "Africa"), ("Brazil", "South America"), ("Japan", "Asia"), ("France", "Europe"),
        ("Canada", "North America"), ("Egypt", "Africa"), ("India", "Asia"), ("Argentina", "South America"),
        ("Germany", "Europe"), ("Nigeria", "Africa"), ("China", "Asia"), ("Mexico", "North America"),
        ("Italy", "Europe"), ("Peru", "South America"), ("Thailand", "Asia"), ("Spain", "Europe")]],
    *[("author", s, o) for s, o in [
        ("Romeo and Juliet", "William Shakespeare"), ("Hamlet", "William Shakespeare"),
        ("Pride and Prejudice", "Jane Austen"), ("Nineteen Eighty-Four", "George Orwell"),
        ("Adventures of Huckleberry Finn", "Mark Twain"),
        ("Harry Potter and the Philosopher's Stone", "J.K. Rowling"),
        ("Oliver Twist", "Charles Dickens"), ("War and Peace", "Leo Tolstoy"), ("The Odyssey", "Homer"),
        ("Don Quixote", "Miguel de Cervantes")]],
    *[("symbol", s, o) for s, o in [
        ("gold", "Au"), ("silver", "Ag"), ("iron", "Fe"), ("sodium", "Na"), ("helium", "He"), ("copper", "Cu"),
        ("lead", "Pb"), ("potassium", "K"), ("hydrogen", "H"), ("oxygen", "O")]],
]

# Checked: python benchmarks/synthesis/knowledge/check_parametric.py  (SmolLM2-135M-Instruct, greedy, fp32):
# 74 of the 126 candidates, each answered right in all three question wordings.
PARAMETRIC: tuple[tuple[str, str], ...] = (
    *[('capital', s) for s in ('France', 'Japan', 'Italy', 'Germany', 'Spain', 'Russia', 'China',
        'the United Kingdom', 'Egypt', 'Canada', 'Australia', 'Greece', 'Ireland', 'Norway', 'Sweden',
        'South Korea', 'Thailand', 'Peru', 'Hungary', 'the Netherlands')],
    *[('city_country', s) for s in ('Tokyo', 'Rome', 'Madrid', 'Beijing', 'Cairo', 'Sydney', 'Toronto',
        'Lisbon', 'Bangkok', 'Mexico City', 'Rio de Janeiro', 'Warsaw', 'Milan', 'Osaka')],
    *[('language', s) for s in ('France', 'Spain', 'Germany', 'Japan', 'Brazil', 'Italy', 'China', 'Russia',
        'Greece', 'Mexico', 'Portugal', 'Poland', 'Turkey', 'Sweden', 'the Netherlands', 'South Korea')],
    *[('currency', s) for s in ('Japan', 'the United States', 'China', 'Germany')],
    *[('continent', s) for s in ('Kenya', 'Brazil', 'Japan', 'France', 'India', 'Argentina', 'Germany',
        'Nigeria', 'China', 'Italy', 'Peru', 'Spain')],
    *[('author', s) for s in ('Hamlet', 'Nineteen Eighty-Four')],
    *[('symbol', s) for s in ('gold', 'sodium', 'lead', 'potassium', 'hydrogen', 'oxygen')],
)
"(relation, subject) of the REAL_FACTS the model answered correctly with no context."


def parametric_facts() -> list[tuple[str, str, str]]:
    known = set(PARAMETRIC)
    return [f for f in REAL_FACTS if (f[0], f[1]) in known]


def aliases(obj: str) -> tuple[str, ...]:
    """Every accepted way to write `obj` (the object itself first; "the Netherlands" also as "Netherlands")."""
    bare = (obj[4:],) if obj.startswith("the ") else ()
    return (obj, *bare, *(a for a in ALIASES.get(obj, ()) if a != obj))


def real_objects(relation: str) -> list[str]:
    """The objects of `relation` among the real facts: counterfactual values of the same kind."""
    return sorted({o for r, _, o in REAL_FACTS if r == relation})


# ----------------------------------------------------------------------------- the synthetic world

ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "j", "k", "kr", "l", "m", "n", "p", "qu", "r", "s",
          "st", "t", "th", "tr", "v", "w", "z"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "ae"]
CODAS = ["", "l", "n", "r", "s", "th", "m", "v", "x", "nd", "rk"]
TOWN_ENDS = ["mere", "holt", "vale", "brook", "dun", "stead", "wick", "ford", "haven", "moor", "gard", "port"]
COUNTRY_ENDS = ["ia", "and", "ora", "esh", "avia", "enia", "istan", "onia"]
COMPANY_KINDS = ["Works", "Labs", "Industries", "Foundry", "Systems", "Mills", "Instruments", "Dynamics"]
INVENTION_KINDS = ["loom", "lamp", "engine", "compass", "press", "telescope", "pump", "clock", "kiln", "valve"]


def _stem(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables)) + rng.choice(CODAS)
    return word.capitalize()


NAMERS = {
    "person": lambda rng: f"{_stem(rng, rng.choice((1, 2)))} {_stem(rng, 2)}",
    "town": lambda rng: _stem(rng, rng.choice((1, 2))).rstrip("aeiou") + rng.choice(TOWN_ENDS),
    "country": lambda rng: _stem(rng, 2).rstrip("aeiou") + rng.choice(COUNTRY_ENDS),
    "company": lambda rng: f"{_stem(rng, 2)} {rng.choice(COMPANY_KINDS)}",
    "invention": lambda rng: f"{_stem(rng, 2)} {rng.choice(INVENTION_KINDS)}",
}
SIZES = {"country": 6, "town": 30, "person": 40, "company": 20, "invention": 20}
"Entities of each kind in one split's world (every split has a world of this size, from its own names)."


@dataclass
class World:
    """One split's synthetic world: entities by kind and facts[(relation, subject)] = object."""
    entities: dict[str, list[str]]
    facts: dict[tuple[str, str], str]

    def objects(self, kind: str) -> list[str]:
        return self.entities[kind]

    def subjects(self, relation: str) -> list[str]:
        return [s for r, s in self.facts if r == relation]


def name_pool(seed: int, kind: str, n: int) -> list[str]:
    """`n` distinct made-up names of `kind`, no name a word-prefix of another (so scoring by containment
    cannot confuse two of them), deterministic for the seed."""
    rng = random.Random(f"knowledge/{seed}/names/{kind}")
    out: list[str] = []
    seen_words: set[str] = set()
    while len(out) < n:
        name = NAMERS[kind](rng)
        words = {w.lower() for w in name.split() if w not in COMPANY_KINDS and w not in INVENTION_KINDS}
        if words & seen_words:
            continue
        seen_words |= words
        out.append(name)
    return out


def build_world(names: dict[str, list[str]], rng: random.Random) -> World:
    """Link the given entities: every town in a country, every country a capital among its towns, every
    person a birthplace, every company a founder and a seat, every invention an inventor."""
    towns, countries, people = names["town"], names["country"], names["person"]
    facts: dict[tuple[str, str], str] = {}
    for i, town in enumerate(towns):
        facts[("located_in", town)] = countries[i % len(countries)]
    for country in countries:
        facts[("capital_of", country)] = rng.choice([t for t in towns if facts[("located_in", t)] == country])
    for person in people:
        facts[("born_in", person)] = rng.choice(towns)
    for company in names["company"]:
        facts[("founded_by", company)] = rng.choice(people)
        facts[("headquartered_in", company)] = rng.choice(towns)
    for invention in names["invention"]:
        facts[("invented_by", invention)] = rng.choice(people)
    return World(dict(names), facts)


SYNTHETIC_RELATIONS = ("born_in", "located_in", "capital_of", "founded_by", "headquartered_in", "invented_by")
KIND_OF_SUBJECT = {"born_in": "person", "located_in": "town", "capital_of": "country", "founded_by": "company",
                   "headquartered_in": "company", "invented_by": "invention"}
