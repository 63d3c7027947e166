"""Constructed languages for the offline translation task: an English grammar, and languages built
from it by deterministic transforms, so translation can be trained and measured with nothing downloaded.

    clause = draw_clause(rng)                 # a sentence as meaning: who does what to whom, when, where
    realize(clause, "en")                     # 'The old farmer carried a red box near the river.'
    realize(clause, "va")                     # the same meaning in Valian
    LANGUAGES["vo"].parent                    # 'va': Volian is Valian's sister (same roots, sound-shifted)

A sentence is generated once as a meaning (a `Clause`) and then *realised* in each language, so any
two languages are parallel (the translation of a clause is its realisation in the other language),
and every direction, en->xx, xx->en or xx->yy, comes from the same sentences. The transforms are
the ones real languages differ by:
- a lexicon: every English lemma has a made-up word, built from the language's own syllables;
- word order: SVO, SOV, VSO; adjectives before or after the noun; pre- or postpositions; where
  the adverb, the place phrase and the negation go;
- morphology: suffixes for plural, definiteness, the object case, past and future;
- a cipher: a fixed letter substitution over the finished sentence (`ci` is English in cipher).

The English-rooted family (Obrish, Irvic, Elsic, Umbric and the low-resource Lunish) keeps English
lemmas (`english_roots`, lightly respelled by `sound_changes`, with their own function words) under
another word order and morphology: languages a small English model can partly read, for
cross-lingual prompting (synth/ldp.py). They stay out of `translate-all`.

A language is fixed: its words do not depend on any seed, so a model that learned Valian under one
task seed knows it under another. A sister language (`parent`) takes the parent's roots through
sound changes, the way related languages share cognates: what is learned on the parent helps.
Bump VERSION when anything here changes what a language says.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

VERSION = 1

# ----------------------------------------------------------------------------- the English side

# (singular, plural)
AGENTS = [("farmer", "farmers"), ("teacher", "teachers"), ("child", "children"), ("doctor", "doctors"),
          ("sailor", "sailors"), ("baker", "bakers"), ("king", "kings"), ("queen", "queens"), ("girl", "girls"),
          ("boy", "boys"), ("woman", "women"), ("man", "men"), ("dog", "dogs"), ("cat", "cats"),
          ("horse", "horses"), ("bird", "birds"), ("wolf", "wolves"), ("merchant", "merchants")]
THINGS = [("book", "books"), ("apple", "apples"), ("letter", "letters"), ("boat", "boats"), ("stone", "stones"),
          ("key", "keys"), ("cup", "cups"), ("song", "songs"), ("door", "doors"), ("basket", "baskets"),
          ("fish", "fish"), ("sword", "swords"), ("ring", "rings"), ("flower", "flowers"), ("box", "boxes"),
          ("lamp", "lamps"), ("coat", "coats"), ("map", "maps")]
PLACES = [("garden", "gardens"), ("market", "markets"), ("forest", "forests"), ("village", "villages"),
          ("kitchen", "kitchens"), ("river", "rivers"), ("field", "fields"), ("school", "schools"),
          ("harbour", "harbours"), ("temple", "temples")]
# (base, third person singular, past)
VERBS = [("see", "sees", "saw"), ("find", "finds", "found"), ("carry", "carries", "carried"),
         ("buy", "buys", "bought"), ("sell", "sells", "sold"), ("take", "takes", "took"),
         ("bring", "brings", "brought"), ("hold", "holds", "held"), ("watch", "watches", "watched"),
         ("open", "opens", "opened"), ("paint", "paints", "painted"), ("want", "wants", "wanted"),
         ("follow", "follows", "followed"), ("call", "calls", "called"), ("help", "helps", "helped"),
         ("hide", "hides", "hid"), ("lose", "loses", "lost"), ("draw", "draws", "drew")]
ADJECTIVES = ["big", "small", "old", "young", "red", "green", "happy", "quiet", "strong", "clever", "dark",
              "bright", "heavy", "new", "tall", "brave"]
ADVERBS = ["quickly", "slowly", "quietly", "carefully", "gladly", "often"]
PREPOSITIONS = ["in", "near", "behind"]
NAMES = ["Anna", "Ben", "Clara", "Hugo", "Iris", "Leo", "Maya", "Omar", "Rosa", "Tomas"]
TENSES = ("present", "past", "future")
FUNCTION_WORDS = ["the", "a", "some", "not"]

NOUNS = {sg: (sg, pl) for sg, pl in AGENTS + THINGS + PLACES}
VERB_FORMS = {v[0]: v for v in VERBS}
LEMMAS = ([sg for sg, _ in AGENTS + THINGS + PLACES] + [v[0] for v in VERBS] + ADJECTIVES + ADVERBS + PREPOSITIONS
          + FUNCTION_WORDS)


@dataclass(frozen=True)
class Phrase:
    """A noun phrase: a name, or a noun with a determiner, an optional adjective and a number."""
    noun: str
    "The noun's singular, or a name."
    definite: bool = True
    plural: bool = False
    adjective: str | None = None
    name: bool = False


@dataclass(frozen=True)
class Clause:
    """The meaning of one sentence: subject, verb, object and optional adverb and place."""
    subject: Phrase
    verb: str
    obj: Phrase
    tense: str = "present"
    negated: bool = False
    adverb: str | None = None
    place: tuple[str, Phrase] | None = None
    "(preposition, place noun phrase)"


def _phrase(rng: random.Random, nouns: list[tuple[str, str]], names: bool) -> Phrase:
    if names and rng.random() < 0.2:
        return Phrase(rng.choice(NAMES), name=True)
    return Phrase(rng.choice(nouns)[0], definite=rng.random() < 0.6, plural=rng.random() < 0.3,
                  adjective=rng.choice(ADJECTIVES) if rng.random() < 0.45 else None)


def draw_clause(rng: random.Random) -> Clause:
    """One random meaning; every word and construction has a fair chance, so a few hundred clauses
    cover the vocabulary."""
    place = None
    if rng.random() < 0.4:
        place = (rng.choice(PREPOSITIONS), _phrase(rng, PLACES, names=False))
    return Clause(subject=_phrase(rng, AGENTS, names=True), verb=rng.choice(VERBS)[0],
                  obj=_phrase(rng, AGENTS + THINGS, names=True), tense=rng.choice(TENSES),
                  negated=rng.random() < 0.2, adverb=rng.choice(ADVERBS) if rng.random() < 0.3 else None,
                  place=place)


def _english_np(p: Phrase) -> list[str]:
    if p.name:
        return [p.noun]
    words = ([p.adjective] if p.adjective else []) + [NOUNS[p.noun][1 if p.plural else 0]]
    if p.definite:
        det = "the"
    elif p.plural:
        det = "some"
    else:
        det = "an" if words[0][0] in "aeiou" else "a"
    return [det] + words


def _english_verb(c: Clause) -> list[str]:
    base, third, past = VERB_FORMS[c.verb]
    singular = c.subject.name or not c.subject.plural
    if c.tense == "future":
        return ["will", "not", base] if c.negated else ["will", base]
    if c.tense == "past":
        return ["did", "not", base] if c.negated else [past]
    if c.negated:
        return ["does" if singular else "do", "not", base]
    return [third if singular else base]


def realize_english(c: Clause) -> str:
    words = _english_np(c.subject) + _english_verb(c) + _english_np(c.obj)
    if c.place:
        words += [c.place[0]] + _english_np(c.place[1])
    if c.adverb:
        words.append(c.adverb)
    return _sentence(words)


def _sentence(words: list[str]) -> str:
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


# ----------------------------------------------------------------------------- constructed languages

@dataclass(frozen=True)
class Language:
    """How a constructed language differs from English. Words come from `onsets`/`vowels`/`codas`
    (or from `parent` through `sound_changes`); grammar from the remaining fields."""
    code: str
    name: str
    order: str = "SVO"
    "Order of subject, verb and object: SVO, SOV, VSO, ..."
    adjective_after: bool = False
    definite: str = "word"
    "`word` (an article before the noun phrase), `suffix` (on the noun), or `none`."
    plural: str = ""
    "Plural suffix of nouns."
    object_case: str = ""
    "Suffix of the object noun (and of a name as object)."
    past: str = ""
    future: str = ""
    negation: str = "before"
    "`before`/`after`: a particle before/after the verb; `prefix`: on the verb."
    postpositions: bool = False
    place_first: bool = False
    "The place phrase opens the sentence (else it follows the clause)."
    adverb: str = "end"
    "`end`, `before_verb` or `after_verb`."
    onsets: tuple[str, ...] = ()
    vowels: tuple[str, ...] = ()
    codas: tuple[str, ...] = ("",)
    parent: str | None = None
    "A language whose roots this one inherits (through `sound_changes`)."
    sound_changes: tuple[tuple[str, str], ...] = ()
    cipher: bool = False
    "English words in English order, every letter substituted (a fixed permutation per language)."
    n_train: int = 1000
    "Training pairs of this language's tasks by default: its resource level."
    lexicon: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    english_roots: bool = False
    "Roots are the English lemmas themselves (through `sound_changes`: a spelling change)."
    words: tuple[tuple[str, str], ...] = ()
    "(lemma, word) pairs that replace the derived word, e.g. the language's own article."
    mixed: bool = True
    "Part of `translate-all` (the English-rooted family stays out, so that task keeps its sentences)."


LANGUAGES: dict[str, Language] = {}


def register_language(lang: Language) -> Language:
    """Add a language (e.g. another sister of Valian for a new low-resource direction); its tasks are
    then `translate-<code>` like the built-in ones. A code names one language for good."""
    if lang.code in LANGUAGES or lang.code == "en" or not lang.code.isalpha():
        raise ValueError(f"language code `{lang.code}` is taken or not letters only")
    if lang.parent and lang.parent not in LANGUAGES:
        raise ValueError(f"language `{lang.code}`: unknown parent `{lang.parent}`")
    LANGUAGES[lang.code] = lang
    return lang


register_language(Language("ci", "Cipherish", cipher=True, n_train=1000))
register_language(Language(
    "va", "Valian", order="SVO", adjective_after=True, definite="word", plural="i", past="ta", future="re",
    negation="before", onsets=("b", "d", "f", "l", "m", "n", "p", "r", "s", "t", "v"), vowels=("a", "e", "i", "o", "u"),
    codas=("", "", "n", "l"), n_train=2000))
register_language(Language(
    "vo", "Volian", order="SOV", adjective_after=True, definite="suffix", plural="ir", object_case="m", past="do",
    future="ro", negation="prefix", parent="va",
    sound_changes=(("a", "o"), ("t", "d"), ("p", "b"), ("u", "y"), ("e", "ei"), ("s", "sh")), n_train=200))
register_language(Language(
    "ka", "Karun", order="VSO", adjective_after=False, definite="suffix", plural="ak", object_case="u", past="ek",
    future="ish", negation="after", postpositions=True, place_first=True, adverb="before_verb",
    onsets=("k", "g", "h", "z", "r", "sh", "kh", "t"), vowels=("a", "u", "i", "aa"), codas=("", "k", "r", "m"),
    n_train=1000))

# The English-rooted family: English lemmas under another grammar (and a light respelling), so a
# small model that reads English can partly read them — the setting of cross-lingual prompting for a
# low-resource language. Four "high-resource" languages and Lunish, a low-resource one (200 pairs).
# They stay out of `translate-all` (`mixed=False`), which keeps that task's sentences as they were.
register_language(Language(
    "ob", "Obrish", order="SOV", definite="word", plural="en", past="de", future="wil", negation="after",
    adverb="before_verb", english_roots=True, words=(("the", "de"), ("some", "sam"), ("not", "nit")),
    n_train=1000, mixed=False))
register_language(Language(
    "ir", "Irvic", order="VSO", adjective_after=True, definite="suffix", plural="i", object_case="o", past="ek",
    future="ul", postpositions=True, place_first=True, english_roots=True,
    sound_changes=(("c", "k"), ("w", "v")), words=(("the", "ta"), ("some", "kai"), ("not", "ni")),
    n_train=1000, mixed=False))
register_language(Language(
    "el", "Elsic", order="SVO", adjective_after=True, definite="word", plural="es", past="ai", future="ra",
    negation="before", adverb="after_verb", english_roots=True, sound_changes=(("th", "z"), ("sh", "ch")),
    words=(("the", "le"), ("some", "des"), ("not", "pas")), n_train=1000, mixed=False))
register_language(Language(
    "um", "Umbric", order="OSV", definite="none", plural="a", object_case="n", past="te", future="ge",
    negation="prefix", place_first=True, english_roots=True, sound_changes=(("ou", "u"), ("y", "i")),
    words=(("some", "sum"), ("not", "un")), n_train=1000, mixed=False))
register_language(Language(
    "lu", "Lunish", order="SOV", adjective_after=True, definite="suffix", plural="er", object_case="m",
    past="ti", future="sa", negation="prefix", postpositions=True, adverb="after_verb", english_roots=True,
    sound_changes=(("w", "v"), ("th", "d"), ("ee", "ie")), words=(("the", "ne"), ("some", "nok"), ("not", "na")),
    n_train=200, mixed=False))


_FUNCTION_ROLES = {"the": "definite article", "a": "indefinite article", "some": "plural indefinite",
                   "not": "negation"}


def _new_word(rng: random.Random, lang: Language, syllables: int) -> str:
    return "".join(rng.choice(lang.onsets) + rng.choice(lang.vowels) + rng.choice(lang.codas)
                   for _ in range(syllables))


def lexicon(code: str) -> dict[str, str]:
    """English lemma -> the language's word (roots without suffixes); built once, deterministic."""
    lang = LANGUAGES[code]
    if lang.lexicon:
        return lang.lexicon
    if lang.cipher:
        words = {w: w for w in LEMMAS}
    elif lang.parent or lang.english_roots:
        words, used = {}, set(dict(lang.words).values())
        roots = {w: w for w in LEMMAS} if lang.english_roots else lexicon(lang.parent)
        for lemma, root in roots.items():
            word = root
            for a, b in lang.sound_changes:
                word = word.replace(a, b)
            while word in used:  # two roots that merged keep apart, as real sound laws leave doublets
                word += word[-1]
            used.add(word)
            words[lemma] = word
    else:
        rng = random.Random(f"translate/lexicon/{code}/{VERSION}")
        words, used = {}, set()
        for lemma in LEMMAS:
            short = lemma in FUNCTION_WORDS or lemma in PREPOSITIONS
            while True:
                word = _new_word(rng, lang, 1 if short else rng.choice((2, 2, 3)))
                if word not in used:
                    break
            used.add(word)
            words[lemma] = word
    lang.lexicon.update(words)
    lang.lexicon.update(lang.words)
    return lang.lexicon


def cipher_table(code: str) -> dict[str, str]:
    """The letter permutation of a cipher language (lower and upper case alike)."""
    letters = list("abcdefghijklmnopqrstuvwxyz")
    shuffled = letters[:]
    random.Random(f"translate/cipher/{code}/{VERSION}").shuffle(shuffled)
    table = dict(zip(letters, shuffled))
    table.update({a.upper(): b.upper() for a, b in table.items()})
    return table


def _noun_phrase(p: Phrase, lang: Language, words: dict[str, str], case: str = "") -> list[str]:
    if p.name:
        return [p.noun + case]
    noun = words[p.noun] + (lang.plural if p.plural else "")
    if p.definite and lang.definite == "suffix":
        noun += words["the"]
    noun += case
    out = [noun, words[p.adjective]] if lang.adjective_after and p.adjective else \
        ([words[p.adjective], noun] if p.adjective else [noun])
    if p.definite and lang.definite == "word":
        out.insert(0, words["the"])
    elif not p.definite and p.plural:
        out.insert(0, words["some"])
    return out


def _verb(c: Clause, lang: Language, words: dict[str, str]) -> list[str]:
    verb = words[c.verb] + {"present": "", "past": lang.past, "future": lang.future}[c.tense]
    if not c.negated:
        return [verb]
    if lang.negation == "prefix":
        return [words["not"] + verb]
    return [words["not"], verb] if lang.negation == "before" else [verb, words["not"]]


def realize(c: Clause, code: str) -> str:
    """The sentence that means `c` in language `code` ("en" for English)."""
    if code == "en":
        return realize_english(c)
    lang = LANGUAGES[code]
    if lang.cipher:
        table = cipher_table(code)
        return "".join(table.get(ch, ch) for ch in realize_english(c))
    words = lexicon(code)
    parts = {"S": _noun_phrase(c.subject, lang, words), "V": _verb(c, lang, words),
             "O": _noun_phrase(c.obj, lang, words, lang.object_case)}
    if c.adverb and lang.adverb != "end":
        parts["V"] = [words[c.adverb]] + parts["V"] if lang.adverb == "before_verb" else parts["V"] + [words[c.adverb]]
    out = [w for slot in lang.order for w in parts[slot]]
    if c.place:
        prep, np = words[c.place[0]], _noun_phrase(c.place[1], lang, words)
        pp = np + [prep] if lang.postpositions else [prep] + np
        out = pp + out if lang.place_first else out + pp
    if c.adverb and lang.adverb == "end":
        out.append(words[c.adverb])
    return _sentence(out)


def language_name(code: str) -> str:
    return "English" if code == "en" else LANGUAGES[code].name


def describe_language(code: str) -> str:
    """One line on how a language is built (for docs and the data report)."""
    lang = LANGUAGES[code]
    if lang.cipher:
        return f"{lang.name} ({code}): English with every letter substituted"
    if lang.english_roots:
        origin = "English roots" + (" respelled" if lang.sound_changes else "")
    else:
        origin = f"roots of {LANGUAGES[lang.parent].name} sound-shifted" if lang.parent else "own lexicon"
    return (f"{lang.name} ({code}): {origin}, {lang.order}, adjective {'after' if lang.adjective_after else 'before'} "
            f"the noun, {'postpositions' if lang.postpositions else 'prepositions'}, {lang.n_train} training pairs")
