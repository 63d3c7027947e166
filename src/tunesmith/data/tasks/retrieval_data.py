"""The `retrieval` task's vocabulary: four domains of entities, their attributes, and two wordings of
every attribute value, one for documents and one for queries.

The wordings are chosen so a query shares few words with its document: a document says "renewable
energy company ... headquartered in Lisbon ... founded in 1987", the query asks for "a clean power
producer based in Portugal that was set up in the late eighties". Matching them takes knowing that
Lisbon is in Portugal and that 1987 is late in the eighties, which is what an embedding model can
learn and a bag of words cannot.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ._common import CITIES, FIRST_NAMES, LAST_NAMES

COUNTRY = {
    "Oslo": "Norway", "Bergen": "Norway", "Lisbon": "Portugal", "Porto": "Portugal", "Madrid": "Spain",
    "Seville": "Spain", "Valencia": "Spain", "Vienna": "Austria", "Salzburg": "Austria", "Prague": "Czechia",
    "Dublin": "Ireland", "Berlin": "Germany", "Munich": "Germany", "Hamburg": "Germany", "Paris": "France",
    "Lyon": "France", "Rome": "Italy", "Milan": "Italy", "Turin": "Italy", "Warsaw": "Poland",
    "Krakow": "Poland", "Athens": "Greece", "Zurich": "Switzerland", "Geneva": "Switzerland", "Ghent": "Belgium",
    "Bruges": "Belgium", "Antwerp": "Belgium", "Gothenburg": "Sweden", "Tallinn": "Estonia", "Riga": "Latvia",
    "Ljubljana": "Slovenia", "Bratislava": "Slovakia",
}
assert set(COUNTRY) == set(CITIES)

DECADE_WORDS = {1900: "1900s", 1910: "1910s", 1920: "twenties", 1930: "thirties", 1940: "forties",
                1950: "fifties", 1960: "sixties", 1970: "seventies", 1980: "eighties", 1990: "nineties",
                2000: "2000s", 2010: "2010s", 2020: "2020s"}


def article(phrase: str) -> str:
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


# ----------------------------------------------------------------------------- attributes
# Every attribute draws a value, writes it for a document, and mentions it in a query. A mention
# has a level: "exact" (the document's own wording: the city, the year) or "coarse" (the country,
# the part of the decade, a size band); documents match a mention when their value has the same
# key at that level.

@dataclass(frozen=True)
class Choice:
    """A categorical attribute: value i has document wordings and query wordings."""
    name: str
    values: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]

    def draw(self, rng: random.Random) -> int:
        return rng.randrange(len(self.values))

    def key(self, value: int, level: str):
        return value

    def doc(self, value: int, rng: random.Random) -> str:
        return rng.choice(self.values[value][0])

    def mention(self, value: int, rng: random.Random, literal: bool) -> tuple[str, str]:
        return rng.choice(self.values[value][0 if literal else 1]), "exact"


@dataclass(frozen=True)
class City:
    name: str

    def draw(self, rng):
        return rng.choice(CITIES)

    def key(self, value: str, level: str):
        return value if level == "exact" else COUNTRY[value]

    def doc(self, value, rng):
        return value

    def mention(self, value, rng, literal):
        return (value, "exact") if literal else (COUNTRY[value], "coarse")


@dataclass(frozen=True)
class Year:
    name: str
    lo: int
    hi: int

    def draw(self, rng):
        return rng.randint(self.lo, self.hi)

    def key(self, value: int, level: str):
        if level == "exact":
            return value
        return value // 10, 0 if value % 10 <= 3 else 1 if value % 10 <= 6 else 2

    def doc(self, value, rng):
        return f"in {value}"

    def mention(self, value, rng, literal):
        if literal:
            return f"in {value}", "exact"
        decade, part = value // 10 * 10, self.key(value, "coarse")[1]
        word = rng.choice([f"{decade}s", DECADE_WORDS[decade]])
        return rng.choice([
            f"in the {('early', 'mid', 'late')[part]} {word}",
            f"{('at the start', 'in the middle', 'towards the end')[part]} of the {word}",
        ]), "coarse"


@dataclass(frozen=True)
class Amount:
    """A number shown exactly in documents and as a band ("a few hundred") in queries."""
    name: str
    lo: int
    hi: int
    bands: tuple[tuple[int, tuple[str, ...]], ...]  # (lower bound, query wordings), ascending
    unit: str = ""

    def draw(self, rng):
        # Log-uniform, so every band gets its share.
        import math

        return int(round(math.exp(rng.uniform(math.log(self.lo), math.log(self.hi)))))

    def key(self, value, level):
        return max(i for i, (low, _) in enumerate(self.bands) if value >= low)

    def doc(self, value, rng):
        return f"{value:,}"

    def mention(self, value, rng, literal):
        return rng.choice(self.bands[self.key(value, "coarse")][1]), "coarse"


@dataclass(frozen=True)
class Domain:
    name: str
    kind: Choice
    "The entity's type; every query names it (as a noun phrase)."
    attrs: tuple
    "The other attributes a query may mention."
    intro: tuple[str, ...]
    "Document opening sentences: {name}, {a_kind}."
    doc_patterns: dict
    "attribute -> document sentences with {v} (and {name}, {first})."
    query_patterns: dict
    "attribute -> query clauses with {q}."
    extra: tuple[str, ...] = ()
    "Sentences with no queried fact ({person}, {company}): words a bag-of-words model must ignore."


# ----------------------------------------------------------------------------- the four domains

SECTOR = Choice("sector", (
    (("renewable energy company", "wind and solar power company"), ("green electricity business", "clean power producer")),
    (("shipping company", "container freight carrier"), ("maritime cargo business", "ocean transport firm")),
    (("industrial bakery", "bread and pastry maker"), ("baked goods producer", "loaf and cake manufacturer")),
    (("software company", "developer of business software"), ("computer program vendor", "maker of enterprise apps")),
    (("pharmaceutical company", "drug manufacturer"), ("medicine maker", "producer of prescription medication")),
    (("brewery", "beer producer"), ("maker of lager and ale", "brewing house")),
    (("steel mill", "metal foundry"), ("ironworks", "alloy producer")),
    (("airline", "passenger air carrier"), ("aviation business", "firm that flies travellers")),
    (("textile manufacturer", "fabric mill"), ("cloth producer", "maker of woven materials")),
    (("insurance company", "insurer"), ("policy underwriter", "firm selling risk cover")),
    (("toy maker", "manufacturer of children's games"), ("playthings producer", "firm making things kids play with")),
    (("construction company", "building contractor"), ("builder of houses and offices", "property developer")),
    (("robotics company", "maker of industrial robots"), ("automation machinery firm", "producer of mechanical arms")),
    (("coffee roaster", "coffee importer and roaster"), ("bean roasting business", "espresso supplier")),
    (("bank", "savings bank"), ("lender", "financial institution holding deposits")),
    (("video game studio", "games developer"), ("studio making console titles", "interactive entertainment outfit")),
))

PROFESSION = Choice("profession", (
    (("marine biologist", "oceanographer who studies sea life"), ("scientist researching ocean creatures", "expert on underwater wildlife")),
    (("violinist", "concert violin player"), ("musician on a bowed string instrument", "fiddle performer")),
    (("architect", "architect of public buildings"), ("person who draws up plans for structures", "designer of houses and towers")),
    (("pastry chef", "patissier"), ("dessert cook", "baker of cakes and tarts")),
    (("novelist", "author of fiction"), ("writer of long stories", "storyteller who publishes books")),
    (("surgeon", "heart surgeon"), ("doctor who operates on patients", "physician performing operations")),
    (("astronomer", "astrophysicist"), ("stargazing scientist", "researcher of planets and galaxies")),
    (("photographer", "photojournalist"), ("person who takes pictures for a living", "camera artist")),
    (("lawyer", "attorney"), ("legal counsel", "advocate in court")),
    (("sculptor", "stone carver"), ("artist making statues", "maker of three-dimensional artworks")),
    (("economist", "researcher of markets"), ("expert on money and trade", "scholar of finance")),
    (("airline pilot", "aviator"), ("person who flies planes", "cockpit captain")),
    (("chemist", "chemical engineer"), ("scientist working with molecules", "lab expert on compounds")),
    (("football coach", "soccer manager"), ("trainer of a sports team", "person leading a ball club")),
))

HOBBY = Choice("hobby", (
    (("climbs mountains", "goes mountaineering"), ("loves alpine ascents", "spends weekends scaling summits")),
    (("plays chess", "competes in chess tournaments"), ("enjoys a board game of kings and pawns", "is into checkmates")),
    (("sails", "goes sailing"), ("enjoys yachting", "likes being out on a boat")),
    (("grows vegetables", "tends a large garden"), ("has a green thumb", "enjoys planting and weeding")),
    (("watches birds", "goes birdwatching"), ("is an avid birder", "likes spotting feathered wildlife")),
    (("runs marathons", "trains for marathons"), ("does long-distance races", "is a 42-kilometre runner")),
    (("paints watercolours", "paints landscapes"), ("enjoys brush and canvas", "is an amateur artist")),
    (("cooks elaborate dinners", "experiments in the kitchen"), ("is a home gourmet", "enjoys preparing meals")),
    (("cycles long distances", "rides a road bike"), ("is a keen bicyclist", "enjoys pedalling tours")),
    (("plays the piano", "plays jazz piano"), ("tinkles the ivories", "is an amateur keyboard player")),
    (("goes fishing", "fishes for trout"), ("is an angler", "enjoys casting a rod")),
    (("makes pottery", "throws pots"), ("enjoys ceramics", "works with clay on a wheel")),
))

CATEGORY = Choice("category", (
    (("electric kettle", "cordless kettle"), ("appliance for boiling water", "water heating jug")),
    (("pair of noise-cancelling headphones", "set of wireless headphones"), ("headset that blocks outside sound", "over-ear audio gear")),
    (("electric bicycle", "e-bike"), ("battery-assisted cycle", "pedal-assist two-wheeler")),
    (("espresso machine", "coffee maker"), ("appliance that brews strong coffee", "barista device")),
    (("camera drone", "quadcopter"), ("flying camera", "remote-controlled aircraft")),
    (("robot vacuum cleaner", "robotic vacuum"), ("self-driving floor cleaner", "automatic dust sucker")),
    (("smartwatch", "fitness watch"), ("wrist computer", "wearable that tracks workouts")),
    (("camping tent", "four-person tent"), ("outdoor shelter for campers", "portable shelter")),
    (("blender", "countertop blender"), ("appliance for smoothies", "kitchen mixer with blades")),
    (("e-reader", "electronic book reader"), ("digital book device", "tablet for novels")),
    (("lawn mower", "cordless mower"), ("grass cutting machine", "garden trimmer for turf")),
    (("office chair", "ergonomic desk chair"), ("seat for working at a desk", "swivel seat")),
    (("bluetooth speaker", "portable speaker"), ("wireless sound box", "pocket audio player")),
    (("air purifier", "HEPA air cleaner"), ("device that filters indoor pollution", "room air scrubber")),
))

COLOR = Choice("color", (
    (("red", "crimson"), ("cherry", "scarlet")), (("blue", "navy"), ("cobalt", "sky-coloured")),
    (("green", "olive"), ("emerald", "sage")), (("black", "charcoal"), ("jet", "midnight-dark")),
    (("white", "ivory"), ("snow-coloured", "pearl")), (("yellow", "mustard"), ("lemon", "golden")),
    (("grey", "slate"), ("silver", "ash-coloured")), (("orange", "amber"), ("tangerine", "copper-toned")),
    (("pink", "rose"), ("blush", "salmon")), (("purple", "violet"), ("lilac", "plum")),
))

PRODUCT_FEATURE = Choice("feature", (
    (("is waterproof to ten metres", "carries an IP68 water-resistance rating"), ("survives being submerged", "can go under water")),
    (("charges from a built-in solar panel", "has a solar charging panel"), ("recharges in sunlight", "is powered by the sun")),
    (("responds to voice commands", "has voice control"), ("can be operated by speaking to it", "works with spoken instructions")),
    (("folds flat for storage", "has a folding frame"), ("collapses to save space", "packs down small")),
    (("runs for 40 hours on one charge", "has a battery that lasts two days"), ("offers very long endurance between charges", "goes ages without plugging in")),
    (("pairs with a smartphone app", "is controlled through an app"), ("is operated from your phone", "connects to a mobile application")),
    (("is made from recycled plastic", "has a recycled-plastic shell"), ("uses reclaimed materials", "is built from salvaged resin")),
    (("operates at under 40 decibels", "has a low-noise motor"), ("is almost silent", "makes hardly any sound")),
    (("weighs less than a kilogram", "is very light"), ("is featherweight", "is easy to carry around")),
    (("comes with a ten-year warranty", "is covered by a ten-year warranty"), ("is guaranteed for a decade", "has a long guarantee period")),
))

VENUE_KIND = Choice("kind", (
    (("seafood restaurant", "fish restaurant"), ("place to eat oysters and prawns", "eatery serving the catch of the day")),
    (("jazz club", "live jazz bar"), ("venue for improvised music", "spot for saxophone nights")),
    (("art museum", "gallery of modern art"), ("place exhibiting paintings", "collection of artworks open to visitors")),
    (("boutique hotel", "small hotel"), ("intimate place to stay overnight", "guesthouse with character")),
    (("bakery", "bakery and café"), ("shop selling fresh bread", "place for croissants")),
    (("climbing gym", "bouldering hall"), ("indoor rock wall", "place to practise scaling walls")),
    (("cinema", "independent movie theatre"), ("film house", "place that screens films")),
    (("bookshop", "independent bookstore"), ("place to buy novels", "literature retailer")),
    (("vegetarian restaurant", "meat-free restaurant"), ("plant-based eatery", "veggie diner")),
    (("brewpub", "pub with its own brewery"), ("bar that brews on site", "craft ale tavern")),
    (("concert hall", "symphony hall"), ("orchestra venue", "auditorium for classical performances")),
    (("science museum", "science centre"), ("hands-on discovery venue", "place with interactive experiments")),
))

VENUE_FEATURE = Choice("feature", (
    (("has a rooftop terrace", "has a terrace on the roof"), ("offers seating up top with a view", "lets guests sit outside above the street")),
    (("has a courtyard garden", "has a walled garden"), ("has greenery out back", "has an open-air patio with plants")),
    (("overlooks the river", "sits on the riverbank"), ("looks out over the water", "is by the waterfront")),
    (("is housed in a former railway station", "occupies an old railway station"), ("occupies a converted train depot", "is set in a disused rail terminal")),
    (("is housed in a former factory", "occupies an old factory"), ("is set in a converted industrial plant", "occupies a disused works")),
    (("stays open until 2 a.m.", "closes at 2 a.m."), ("is open late into the night", "welcomes night owls")),
    (("welcomes dogs", "lets dogs in"), ("allows pets", "is fine with bringing your pup")),
    (("is fully wheelchair accessible", "has step-free access throughout"), ("suits visitors with reduced mobility", "has ramps and lifts everywhere")),
    (("charges no admission", "has no entry fee"), ("is free to enter", "costs nothing to get in")),
))

DOMAINS = (
    Domain(
        "company", SECTOR,
        (City("city"), Year("founded", 1950, 2019),
         Amount("staff", 8, 30000, ((0, ("has fewer than a hundred staff", "is a small outfit")),
                                    (100, ("has a few hundred people on its payroll", "is mid-sized")),
                                    (1000, ("has thousands of workers", "is a large employer")),
                                    (10000, ("has a workforce above ten thousand", "is a giant employer"))))),
        ("{name} is {a_kind}.", "{name} is {a_kind} with a long track record.", "Meet {name}, {a_kind}."),
        {"city": ("Its headquarters are in {v}.", "The head office is located in {v}.", "{name} is based in {v}."),
         "founded": ("It was founded {v}.", "The company dates back to its founding {v}.", "{name} opened for business {v}."),
         "staff": ("It employs {v} people.", "Its staff numbers {v}.", "The payroll counts {v} employees.")},
        {"city": ("is based in {q}", "has its head office in {q}", "operates out of {q}"),
         "founded": ("was set up {q}", "started out {q}", "was established {q}"),
         "staff": ("{q}",)},
        ("It was started by {person}.", "The chief executive is {person}.", "Its largest customer is {company}."),
    ),
    Domain(
        "person", PROFESSION,
        (City("birthplace"), Year("born", 1940, 1999), HOBBY),
        ("{name} is {a_kind}.", "{name} works as {a_kind}.", "{name} is a well-known {kind}."),
        {"birthplace": ("{first} grew up in {v}.", "{first} is a native of {v}.", "{first}'s hometown is {v}."),
         "born": ("{first} was born {v}.", "{first} was born {v} into a family of teachers.", "Born {v}, {first} started working young."),
         "hobby": ("In spare time, {first} {v}.", "Away from work, {first} {v}.", "Friends know that {first} {v}.")},
        {"birthplace": ("comes from {q}", "grew up in {q}", "was raised in {q}"),
         "born": ("was born {q}", "came into the world {q}"),
         "hobby": ("{q}",)},
        ("{first} works with {company}.", "{first} once shared a flat with {person}.", "{first} is represented by {company}."),
    ),
    Domain(
        "product", CATEGORY,
        (COLOR, Year("released", 2001, 2024),
         Amount("price", 12, 2500, ((0, ("costs under fifty euros", "is cheap")),
                                    (50, ("is moderately priced", "costs between fifty and two hundred euros")),
                                    (200, ("sits in the upper mid-range on price", "costs a few hundred euros")),
                                    (800, ("is a luxury purchase", "costs upwards of eight hundred euros"))), "euros"),
         PRODUCT_FEATURE),
        ("The {name} is {a_kind}.", "{name}: {a_kind}.", "The {name} is {a_kind} sold across Europe."),
        {"color": ("It comes in {v}.", "The housing is {v}.", "The only finish offered is {v}."),
         "released": ("It was released {v}.", "It went on sale {v}.", "The first units shipped {v}."),
         "price": ("It retails for {v} euros.", "The list price is {v} euros.", "Shops sell it for {v} euros."),
         "feature": ("It {v}.", "Reviewers note that it {v}.", "Its selling point: it {v}.")},
        {"color": ("is sold in a {q} finish", "has a {q} body", "comes in {q}"),
         "released": ("came out {q}", "hit the shelves {q}", "launched {q}"),
         "price": ("{q}",), "feature": ("{q}",)},
        ("It is made by {company}.", "It is assembled by {company}.", "The design team was led by {person}."),
    ),
    Domain(
        "venue", VENUE_KIND,
        (City("city"), Year("opened", 1900, 2019),
         Amount("capacity", 15, 2500, ((0, ("has room for fewer than fifty guests", "is tiny")),
                                       (50, ("holds around a hundred people", "has a modest capacity")),
                                       (200, ("holds several hundred", "has space for hundreds of visitors")),
                                       (1000, ("can take more than a thousand visitors", "is enormous")))), VENUE_FEATURE),
        ("{name} is {a_kind}.", "{name} is {a_kind} popular with locals.", "Visitors know {name} as {a_kind}."),
        {"city": ("It is located in {v}.", "You will find it in {v}.", "{name} is in central {v}."),
         "opened": ("It opened {v}.", "Its doors first opened {v}.", "It has welcomed guests since it opened {v}."),
         "capacity": ("It seats {v}.", "There is room for {v} guests.", "Its capacity is {v}."),
         "feature": ("It {v}.", "Regulars like that it {v}.", "One thing stands out: it {v}.")},
        {"city": ("is in {q}", "can be found in {q}", "is located in {q}"),
         "opened": ("opened {q}", "first welcomed guests {q}"),
         "capacity": ("{q}",), "feature": ("{q}",)},
        ("It is run by {person}.", "The owner is {person}.", "Its coffee comes from {company}."),
    ),
)

QUERY_FRAMES = (
    "Which {kind} {clauses}?",
    "Looking for {a_kind} that {clauses}.",
    "Name the {kind} that {clauses}.",
    "what {kind} {clauses}",
    "I need to find {a_kind} which {clauses}.",
    "Find me {a_kind} that {clauses}.",
    "Is there {a_kind} that {clauses}?",
    "Tell me about the {kind} that {clauses}.",
)

# ----------------------------------------------------------------------------- names

_PREFIX = ("Vel", "Nor", "Kal", "Bren", "Tor", "Mar", "Sol", "Lun", "Zen", "Quar", "Fal", "Dor", "Hal", "Ser",
           "Vin", "Ost", "Ari", "Cor", "Del", "Eri", "Gal", "Jor", "Kes", "Lor", "Mir", "Nex", "Pel", "Rav",
           "Sten", "Tal", "Ulm", "Var", "Wex", "Yar", "Zor", "Bel", "Cav", "Dun", "Fen", "Hav")
_SUFFIX = ("ora", "vik", "ant", "ex", "ion", "ara", "eno", "ix", "um", "is", "ova", "ent", "ano", "ela", "or")
_COMPANY_TAIL = ("Systems", "Labs", "Group", "Works", "Industries", "Partners", "Holdings", "& Co.", "Collective",
                 "Enterprises")
_VENUE_ADJ = ("Blue", "Golden", "Old", "Silver", "Quiet", "Little", "Red", "Green", "Velvet", "Copper", "Hidden",
              "Northern", "Crooked", "Salty", "Amber", "Iron", "Wild", "Lucky", "Sleepy", "Bright")
_VENUE_NOUN = ("Anchor", "Lantern", "Fox", "Owl", "Harbour", "Oak", "Lark", "Heron", "Compass", "Kettle", "Mill",
               "Orchard", "Pigeon", "Barrel", "Whale", "Garden", "Bell", "Crown", "Ferry", "Bridge")
_VENUE_TAIL = ("", " House", " Hall", " Room", " Corner")


def company_name(rng: random.Random) -> str:
    return f"{rng.choice(_PREFIX)}{rng.choice(_SUFFIX)} {rng.choice(_COMPANY_TAIL)}"


def person_name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice('ABCDEFGHJKLMNPRSTVW')}. {rng.choice(LAST_NAMES)}"


def entity_name(domain: str, rng: random.Random) -> str:
    """A name for a new entity of `domain` (names carry no attribute: a query never names its target)."""
    if domain == "company":
        return company_name(rng)
    if domain == "person":
        return person_name(rng)
    if domain == "product":
        brand = f"{rng.choice(_PREFIX)}{rng.choice(_SUFFIX)}"
        return f"{brand} {rng.choice('AKMQRSTVXZ')}{rng.randint(1, 9)}{rng.randint(0, 9)}{rng.choice(('0', '5', '0 Pro', '0 Mini'))}"
    head = f"The {rng.choice(_VENUE_ADJ)}" if rng.random() < 0.4 else f"{rng.choice(LAST_NAMES)}'s"
    return f"{head} {rng.choice(_VENUE_NOUN)}{rng.choice(_VENUE_TAIL)}"
