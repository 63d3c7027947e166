"""The `intent` task: name the intent of a short assistant request, one of eight labels.

    task = IntentTask(seed=0)
    ex = task.examples("test")[1]
    ex.prompt      # 'Request: Alarm at 6:15 pm on Wednesday morning'
    ex.reference   # 'alarm'
    task.labels    # ('weather', 'alarm', 'music', 'timer', 'shopping', 'translate', 'call', 'reminder')

Each intent is a template family of seven phrasings (some name the intent, some do not: "Will I
need an umbrella in Oslo?"); as for `sql` and `json`, one phrasing per intent is held out for
validation and one for test, and every slot value (city, time, song genre, item, ...) belongs to
one split only. Every split interleaves the intents (weather, alarm, ..., weather, ...), so any
prefix of it is class-balanced: the first k training examples are the k-shot demonstrations, the
first 48 test examples a balanced test set, and the whole train split, references ignored, serves
as an unlabelled pool.

Scoring: the answer is lower-cased, and the label is the label word (or one of its few plain
synonyms, e.g. "shopping list" -> shopping, "phone" -> call) that occurs earliest as a whole word;
correct iff that label is the gold one. An answer with no label word is wrong ("no label").
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .base import Example, Verdict
from ._common import CITIES, FIRST_NAMES, LAST_NAMES, GeneratedTask, ValueSplit, generate_splits, rng_for

LABELS = ("weather", "alarm", "music", "timer", "shopping", "translate", "call", "reminder")
# Words an answer may use for a label; each maps to exactly one label.
SYNONYMS = {"shopping list": "shopping", "translation": "translate", "phone": "call", "remind": "reminder",
            "song": "music", "forecast": "weather"}
SYSTEM_PROMPT = ("Classify the user's request into exactly one intent: " + ", ".join(LABELS) + ". "
                 "Answer with the intent word only.")
PROMPT = "Request: {text}"

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
DAYS = ["today", "tomorrow", "tonight", "this weekend", "next week", "tomorrow morning", "this evening"] + \
       [f"on {d}{part}" for d in WEEKDAYS for part in ("", " morning", " evening")]
TIMES = [f"{h}:{m:02d} {ap}" for ap in ("am", "pm") for h in range(1, 13) for m in (0, 15, 20, 30, 40, 45)]
GENRES = ["jazz", "classical music", "rock", "hip hop", "reggae", "country", "blues", "techno", "lo-fi beats",
          "piano music", "salsa", "opera", "punk", "folk songs", "disco", "soul", "bossa nova", "metal",
          "ambient", "k-pop", "gospel", "funk", "grunge", "flamenco", "tango", "swing", "chill house",
          "movie soundtracks", "eighties pop", "indie rock", "bluegrass", "samba"]
PLACES = ["in the kitchen", "in the living room", "on the speaker", "in the car", "in the bedroom",
          "in the garden", "in the bathroom", "in the office", "on my headphones", "in the study",
          "in the hallway", "on the tv", "in the garage", "on the patio", "in the dining room", "upstairs",
          "downstairs", "in the basement", "in the attic", "on the balcony", "in the nursery", "in the gym",
          "on the laptop", "in the guest room", "by the pool", "on the terrace", "in the workshop"]
DURATIONS = [f"{n} minutes" for n in range(2, 91)] + [f"{n} seconds" for n in (20, 30, 45, 90)] + \
            ["an hour", "two hours", "half an hour", "a quarter of an hour"]
PURPOSES = ["the pasta", "the eggs", "the laundry", "my workout", "the oven", "the tea", "a nap", "the rice",
            "my break", "the bread", "the pizza", "the plank", "the meeting", "homework"]
ITEMS = ["milk", "eggs", "bread", "butter", "apples", "bananas", "rice", "pasta", "tomatoes", "onions",
         "cheese", "yogurt", "coffee", "tea", "olive oil", "flour", "sugar", "carrots", "potatoes", "lemons",
         "chicken", "salmon", "oranges", "garlic", "spinach", "honey", "cereal", "toilet paper", "soap",
         "dish soap", "batteries", "cucumbers", "peppers", "mushrooms", "oats", "beans", "lettuce", "grapes",
         "ham", "tofu", "ketchup", "mustard", "vinegar", "noodles", "pears", "avocados", "broccoli", "ginger",
         "cream", "jam", "crackers", "juice", "napkins", "shampoo", "toothpaste", "sponges", "foil", "salt",
         "pepper", "basil"]
LANGUAGES = ["French", "German", "Spanish", "Italian", "Portuguese", "Dutch", "Swedish", "Polish",
             "Japanese", "Greek", "Turkish", "Finnish", "Czech", "Korean", "Danish", "Norwegian", "Hungarian",
             "Romanian", "Arabic", "Hindi", "Chinese", "Russian", "Thai", "Vietnamese", "Hebrew", "Irish",
             "Welsh", "Icelandic"]
PHRASES = ["good morning", "thank you very much", "where is the station", "how much does this cost",
           "I am lost", "see you tomorrow", "the bill please", "nice to meet you", "I need a doctor",
           "what time is it", "happy birthday", "excuse me", "where is the toilet", "I love you",
           "good night", "one coffee please", "how are you", "I don't understand", "where is the beach",
           "I am vegetarian", "can you help me", "a table for two", "is this seat free", "what is your name",
           "the water is cold", "I am very tired", "open the window", "the museum is closed",
           "my bag is gone", "we are friends", "it is raining", "the food was great", "turn left here",
           "how far is the airport", "I speak a little", "congratulations", "good luck", "welcome home",
           "I am sorry", "two tickets please"]
CHORES = ["pay the rent", "water the plants", "pick up the kids", "take my medicine", "send the report",
          "buy a gift for mom", "book the dentist", "renew my passport", "feed the cat", "return the library books",
          "call the bank", "walk the dog", "charge the car", "back up my laptop", "cancel the gym membership",
          "submit the tax form", "clean the fridge", "order new glasses", "check the mail", "wash the car",
          "bake the cake", "pack my suitcase", "print the tickets", "email the landlord", "fix the bike",
          "vote", "defrost the freezer", "mow the lawn", "buy stamps", "visit grandpa", "change the sheets",
          "update my phone", "repaint the fence", "refill the printer", "call the plumber", "sign the lease",
          "take out the trash", "move the car", "study for the exam", "stretch"]
RELATIONS = ["mom", "dad", "my sister", "my brother", "grandma", "my boss", "the office", "my doctor"]


@dataclass(frozen=True)
class Family:
    name: str  # the label
    phrasings: tuple[str, ...]


FAMILIES = [
    Family("weather", (
        "What's the weather in {city} {day}?", "Will I need an umbrella in {city} {day}?",
        "How hot will it be in {city} {day}?", "Is it going to snow in {city} {day}?",
        "Give me the forecast for {city} {day}", "Should I bring a jacket to {city} {day}?",
        "Tell me if it rains in {city} {day}")),
    Family("alarm", (
        "Set an alarm for {time}", "Wake me up at {time} please", "I need to get up at {time}",
        "Alarm at {time} {day}", "Make sure I'm awake by {time} {day}", "Can you ring at {time} to wake me",
        "Please set my wake-up alarm to {time}")),
    Family("music", (
        "Play some {genre} {place}", "Put on {genre} {place} please", "I want to listen to {genre} {place}",
        "Start a {genre} playlist {place}", "Could you play {genre} {place}", "Shuffle my {genre} songs {place}",
        "Music {place}: {genre}")),
    Family("timer", (
        "Set a timer for {duration} for {purpose}", "Count down {duration} for {purpose}",
        "Start a {duration} timer for {purpose}", "Let me know in {duration}, it's for {purpose}",
        "Time {duration} for {purpose}", "Beep after {duration}, {purpose} is on",
        "Countdown of {duration} please, for {purpose}")),
    Family("shopping", (
        "Add {item} and {item2} to my shopping list", "Put {item} and {item2} on the list",
        "We're out of {item} and {item2}", "Remember to buy {item} and {item2}",
        "I need {item} and {item2} from the store", "Add {item}, {item2} to the grocery list",
        "Don't let me forget {item} or {item2} at the supermarket")),
    Family("translate", (
        "How do you say '{phrase}' in {language}?", "Translate '{phrase}' into {language}",
        "What is '{phrase}' in {language}?", "Say '{phrase}' in {language}",
        "I need '{phrase}' in {language}", "Give me the {language} for '{phrase}'",
        "Convert '{phrase}' to {language}")),
    Family("call", (
        "Call {name}", "Phone {name} please", "Ring {name} on speaker", "Dial {name}'s number",
        "Get {name} on the line", "I want to talk to {name} now", "Make a call to {name}")),
    Family("reminder", (
        "Remind me to {chore} {day}", "Don't let me forget to {chore} {day}",
        "Set a reminder to {chore} at {time}", "I have to {chore} {day}, remind me",
        "Note for {day}: {chore}", "At {time} remind me to {chore}", "Ping me {day} about: {chore}")),
]
assert [f.name for f in FAMILIES] == list(LABELS)

_LABEL_WORDS = sorted({**{label: label for label in LABELS}, **SYNONYMS}.items(), key=lambda kv: -len(kv[0]))
_LABEL_OF = dict(_LABEL_WORDS)
_LONGEST_LABEL = len(_LABEL_WORDS[0][0])
_LABEL_RE = re.compile(r"(?<![a-z])(" + "|".join(re.escape(w) for w, _ in _LABEL_WORDS) + r")(?![a-z])")


def extract_label(text: str) -> str | None:
    """The label named earliest in `text` (label words and SYNONYMS, whole words, any case), or None.
    'Music.' -> music; 'It is an alarm, not a timer' -> alarm; 'shopping list' -> shopping."""
    m = _LABEL_RE.search(text.lower())
    return None if m is None else _LABEL_OF[m.group(1)]


def label_answer_end(text: str) -> int | None:
    """The `intent` task's stop rule: stop (without cutting) once the earliest label word is settled,
    i.e. the text runs past it by more than the longest label word, so that no longer word at the same
    place, no following letter and no earlier match can still appear. None before."""
    lowered = text.lower()
    if len(lowered) != len(text):  # a character whose lower case is longer: positions differ, keep going
        return None
    m = _LABEL_RE.search(lowered)
    return len(text) if m is not None and len(text) > m.start() + _LONGEST_LABEL else None


def _slots(rng, pools, split: str) -> dict[str, str]:
    pick = lambda kind: rng.choice(pools[kind][split])  # noqa: E731
    items = rng.sample(pools["item"][split], 2)
    name = rng.choice([pick("first"), f"{pick('first')} {pick('last')}", pick("relation")])
    return {"city": pick("city"), "day": pick("day"), "time": pick("time"), "genre": pick("genre"),
            "place": pick("place"), "duration": pick("duration"), "purpose": pick("purpose"), "item": items[0],
            "item2": items[1], "language": pick("language"), "phrase": pick("phrase"), "name": name,
            "chore": pick("chore")}


class IntentTask(GeneratedTask):
    """Intent classification of assistant requests; see the module docstring."""
    name = "intent"
    metric = "accuracy"
    system_prompt = SYSTEM_PROMPT
    labels = LABELS
    answer_end = staticmethod(label_answer_end)

    def __init__(self, seed: int = 0, n_train: int = 1000, n_validation: int = 80, n_test: int = 160):
        super().__init__(seed, n_train, n_validation, n_test)

    def score(self, prediction: str, example: Example) -> Verdict:
        """Correct iff the earliest label word in the answer names the gold label."""
        label = extract_label(prediction)
        if label is None:
            return Verdict(False, 0.0, "no label in the answer", None)
        ok = label == example.reference
        return Verdict(ok, float(ok), None if ok else f"wrong label {label}", label)

    def _generate(self) -> dict[str, list[Example]]:
        values = ValueSplit(rng_for("intent", self.seed, "values"))
        for kind, domain in [("city", CITIES), ("day", DAYS), ("time", TIMES), ("genre", GENRES), ("place", PLACES),
                             ("duration", DURATIONS), ("purpose", PURPOSES), ("item", ITEMS),
                             ("language", LANGUAGES), ("phrase", PHRASES), ("first", FIRST_NAMES),
                             ("last", LAST_NAMES), ("relation", RELATIONS), ("chore", CHORES)]:
            values.add(kind, domain)

        def draw_for(split, rng):
            def draw(t):
                template_id, family, i = t
                slots = _slots(rng, values.pools, split)
                phrasing = family.phrasings[i]
                text = phrasing.format(**slots)
                text = text[0].upper() + text[1:]
                used = [v for k, v in slots.items() if "{" + k + "}" in phrasing]
                meta = {"template": template_id, "family": family.name, "values": used}
                return text, (PROMPT.format(text=text), family.name, meta)
            return draw

        splits = generate_splits("intent", self.seed, FAMILIES, self.sizes, draw_for)
        return {s: _interleave(ex, s) for s, ex in splits.items()}


def _interleave(examples: list[Example], split: str) -> list[Example]:
    """Round-robin over the labels in LABELS order, so every prefix is class-balanced; ids renumbered."""
    by_label = {label: [e for e in examples if e.reference == label] for label in LABELS}
    out = []
    while any(by_label.values()):
        out += [by_label[label].pop(0) for label in LABELS if by_label[label]]
    return [Example(f"intent-{split}-{k:04d}", e.prompt, e.reference, e.meta) for k, e in enumerate(out)]

