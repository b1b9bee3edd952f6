"""Synthetic tasks of the bundled ``llmir-tiny`` model: generators and the exact prompt formats.

The training script builds its whole corpus from this module, and examples, tests and benchmarks use
the same functions to build prompts, so the model always sees the format it was trained on. Every
generator takes a ``random.Random`` and draws from nothing else: a seed fixes the output.

Formats (``⏎`` is a newline; ``<|endoftext|>`` ends each training document):

1. Extraction (the main task). ``extraction_prompt(text, kind)`` is::

       Text: <text>⏎<Kind> JSON:⏎

   and the model continues with ``format_record(record)`` (one line of compact JSON, keys in the
   order of ``SCHEMAS[kind]["properties"]``, ``separators=(",", ":")``) and then ``<|endoftext|>``.
   Kinds: ``person`` (5 fields), ``product`` (5), ``event`` (6). Texts use several templates per
   field, shuffled sentence order, distractor sentences (some with numbers), and names, cities and
   brands built from syllables, so fresh texts hold values never seen in training: the model must
   copy them from the text.

2. Few-shot Q&A. ``few_shot_prompt(shots, question, facts)`` is::

       [Facts: <facts>⏎]Q: <q1>⏎A: <a1>⏎ ... Q: <question>⏎A:␣

   The answer follows the final space, then a newline. Answers are ``True``, ``False``, ``Unknown``
   or an integer. Kinds (``QA_KINDS``): ``arithmetic`` (a + b, a - b, a times b), ``compare``
   (greater / less / even, True or False) and ``facts`` (statements about people in the facts line:
   True if stated, False if contradicted, Unknown if not stated; "How old is X?" gives an integer).

3. Chat. ``render_chat(messages)`` equals the ``CHAT_TEMPLATE`` Jinja template shipped in the
   tokenizer (ChatML: ``<|im_start|>role⏎content<|im_end|>⏎``; the generation prompt is
   ``<|im_start|>assistant⏎``). Users ask for an extraction (the assistant answers with the JSON),
   an arithmetic or fact question, or make small talk; an optional system message comes first.

The tokenizer isolates every whitespace character and every digit, so splitting a prompt after a
space (``"A: " + answer``) or a newline tokenizes the same as the whole text.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import random
from collections.abc import Sequence
from typing import Any

EXTRACTION_KINDS: tuple[str, ...] = ("person", "product", "event")
QA_KINDS: tuple[str, ...] = ("arithmetic", "compare", "facts")
QA_ANSWER_CHOICES: tuple[str, ...] = ("True", "False", "Unknown")

OCCUPATIONS: tuple[str, ...] = tuple(
    "engineer teacher nurse baker doctor pilot farmer lawyer artist chef writer dentist plumber architect "
    "librarian musician accountant electrician designer mechanic pharmacist carpenter journalist photographer".split()
)
CATEGORIES: tuple[str, ...] = tuple(
    "kitchen garden office toys sports electronics clothing books beauty tools".split()
)


def _object_schema(properties: dict[str, dict[str, Any]]) -> dict[str, Any]:
    # copies, so that a caller editing one schema cannot change another through a shared dict
    return {
        "type": "object",
        "properties": {key: dict(value) for key, value in properties.items()},
        "required": list(properties),
        "additionalProperties": False,
    }


_STR, _INT, _BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
SCHEMAS: dict[str, dict[str, Any]] = {
    "person": _object_schema(
        {"name": _STR, "age": _INT, "city": _STR, "occupation": {"type": "string", "enum": list(OCCUPATIONS)},
         "married": _BOOL}
    ),
    "product": _object_schema(
        {"name": _STR, "category": {"type": "string", "enum": list(CATEGORIES)}, "price": _INT, "rating": _INT,
         "in_stock": _BOOL}
    ),
    "event": _object_schema(
        {"title": _STR, "city": _STR, "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
         "attendees": _INT, "free": _BOOL, "organizer": _STR}
    ),
}  # fmt: skip

# --- values -------------------------------------------------------------------------------------
_ONSETS = tuple("b br c d dr f g gr h j k kl l m n p r s st t tr v w z sh th".split())
_VOWELS = tuple("a e i o u ai ea io ou y".split())
_CODAS = ("", "", "", "", "", "", "n", "r", "l", "s", "th", "m", "x", "nd", "k")
_CITY_SUFFIXES = ("", "", "ton", "vik", "burg", "ford", "dale", "port", "holm", "stad", "field", "wick")
_CITY_PREFIXES = ("New ", "Port ", "San ", "Lake ", "North ", "East ")
_MODELS = tuple("Pro Mini Max Air Plus One Lite Go Prime Flex".split())
_TITLE_STARTS = tuple("Spring Summer Autumn Winter Annual Grand Open Global Little".split())
_TOPICS = tuple(
    "Jazz Robotics Film Book Chess Food Art Science Wine Game Garden Music Startup Poetry Dance".split()
)
_EVENT_TYPES = tuple("Festival Fair Conference Meetup Expo Summit Night Week Market Workshop".split())
_MONTHS = tuple(
    "January February March April May June July August September October November December".split()
)
_HOBBIES = tuple("hiking chess painting cycling cooking gardening swimming reading".split())
_COLORS = tuple("red blue green black white silver yellow".split())


def make_word(rng: random.Random, min_syllables: int = 2, max_syllables: int = 3) -> str:
    """A capitalized pseudo-word of syllables; the space is large, so fresh draws are mostly unseen."""
    # two syllables are most common, as in real names
    n = min_syllables if rng.random() < 0.6 else rng.randint(min_syllables, max_syllables)
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n))
    return word.capitalize()


def make_person_name(rng: random.Random) -> str:
    return f"{make_word(rng)} {make_word(rng)}"


def make_city(rng: random.Random) -> str:
    city = make_word(rng, 1, 2) + rng.choice(_CITY_SUFFIXES)
    if len(city) < 4:
        city += rng.choice(_CITY_SUFFIXES[2:])
    return (rng.choice(_CITY_PREFIXES) + city) if rng.random() < 0.15 else city


def _make_product_name(rng: random.Random) -> str:
    name = f"{make_word(rng)} {rng.choice(_MODELS)}"
    return f"{name} {rng.randint(2, 999)}" if rng.random() < 0.5 else name


def _make_event_title(rng: random.Random) -> str:
    start = rng.choice(_TITLE_STARTS) if rng.random() < 0.5 else make_word(rng, 1, 2)
    return f"{start} {rng.choice(_TOPICS)} {rng.choice(_EVENT_TYPES)}"


def _make_count(rng: random.Random, low: int, high: int) -> int:
    # log-uniform, so small and large numbers are both common
    return min(high, max(low, int(10 ** rng.uniform(math.log10(low), math.log10(high + 1)))))


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _date_text(rng: random.Random, d: _dt.date) -> str:
    month = _MONTHS[d.month - 1]
    return rng.choice(
        (
            f"{month} {d.day}, {d.year}",
            f"{d.day} {month} {d.year}",
            d.isoformat(),
            f"the {_ordinal(d.day)} of {month} {d.year}",
        )
    )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# --- extraction -----------------------------------------------------------------------------------
# Each maker returns (intros, field_sentences, distractors, record): an intro is (sentence, fields it
# states); every field the chosen intro leaves out gets one sentence from its list of alternatives.
_Parts = tuple[list[tuple[str, tuple[str, ...]]], dict[str, list[str]], list[str], dict[str, Any]]


def _person(rng: random.Random) -> _Parts:
    name, age, city = make_person_name(rng), rng.randint(18, 90), make_city(rng)
    job, married = rng.choice(OCCUPATIONS), rng.random() < 0.5
    record = {"name": name, "age": age, "city": city, "occupation": job, "married": married}
    pron, first = rng.choice(("She", "He")), name.split()[0]
    s = [rng.choice((pron, first)) for _ in range(8)]  # subject of each sentence: pronoun or first name
    aj = f"{_article(job)} {job}"
    intros = [
        (f"{name} is a {age}-year-old {job} from {city}.", ("age", "occupation", "city")),
        (f"{name}, {age}, works as {aj} in {city}.", ("age", "occupation", "city")),
        (f"{name} lives in {city}.", ("city",)),
        (f"This is {name}, {aj}.", ("occupation",)),
        (rng.choice((f"Meet {name}.", f"Name: {name}.", f"Our profile today: {name}.")), ()),
    ]
    fields = {
        "age": [f"{s[0]} is {age} years old.", f"{s[0]} turned {age} this year.", f"Age: {age}."],
        "city": [f"{s[1]} lives in {city}.", f"{s[1]} is based in {city}.", f"Home town: {city}.",
                 f"{s[1]} moved to {city} a few years ago."],
        "occupation": [f"{s[2]} works as {aj}.", f"{s[2]} has a job as {aj}.", f"Job: {job}.",
                       f"By trade, {first} is {aj}."],
        "married": [f"{s[3]} is married.", f"{s[3]} got married last year.", "Married: yes."] if married
        else [f"{s[3]} is not married.", f"{s[3]} is single.", "Married: no."],
    }  # fmt: skip
    distractors = [
        f"{s[4]} enjoys {rng.choice(_HOBBIES)} on weekends.",
        f"{s[5]} has {rng.randint(2, 9)} {rng.choice(('cats', 'brothers', 'bikes', 'plants'))}.",
        f"{s[6]} once visited {make_city(rng)}.",
    ]
    return intros, fields, distractors, record


def _product(rng: random.Random) -> _Parts:
    name, cat = _make_product_name(rng), rng.choice(CATEGORIES)
    price, rating, in_stock = _make_count(rng, 2, 2000), rng.randint(1, 5), rng.random() < 0.5
    record = {"name": name, "category": cat, "price": price, "rating": rating, "in_stock": in_stock}
    intros = [
        (f"The {name} is a new {cat} product.", ("category",)),
        (f"The {name} costs {price} dollars.", ("price",)),
        (f"In our {cat} section you will find the {name}.", ("category",)),
        (rng.choice((f"Product: {name}.", f"Check out the {name}.")), ()),
    ]
    fields = {
        "category": [f"It belongs to the {cat} category.", f"Category: {cat}.", f"It is sold in the {cat} section."],
        "price": [f"It costs {price} dollars.", f"Price: ${price}.", f"You can buy it for ${price}.",
                  f"It sells for {price} dollars."],
        "rating": [f"Customers rate it {rating} out of 5.", f"It has a rating of {rating} stars.",
                   f"Rating: {rating}/5."],
        "in_stock": ["It is in stock.", "It is available now.", "In stock: yes."] if in_stock
        else ["It is out of stock.", "It is currently sold out.", "In stock: no."],
    }  # fmt: skip
    distractors = [
        f"It weighs {_make_count(rng, 50, 5000)} grams.",
        f"It comes in {rng.choice(_COLORS)}.",
        f"The box holds {rng.randint(2, 12)} parts.",
        f"It ships from {make_city(rng)}.",
    ]
    return intros, fields, distractors, record


def _event(rng: random.Random) -> _Parts:
    title, city, organizer = _make_event_title(rng), make_city(rng), make_person_name(rng)
    date = _dt.date(2019, 1, 1) + _dt.timedelta(days=rng.randrange(12 * 365))
    attendees, free = _make_count(rng, 10, 20000), rng.random() < 0.5
    record = {"title": title, "city": city, "date": date.isoformat(), "attendees": attendees, "free": free,
              "organizer": organizer}  # fmt: skip
    the = rng.choice(("The ", ""))
    d = [_date_text(rng, date) for _ in range(4)]
    intros = [
        (f"{the}{title} takes place in {city} on {d[0]}.", ("city", "date")),
        (f"{the}{title} comes to {city}.", ("city",)),
        (f"{the}{title} is organized by {organizer}.", ("organizer",)),
        (rng.choice((f"Event: {title}.", f"Save the date for the {title}.")), ()),
    ]
    fields = {
        "city": [f"The venue is in {city}.", f"It takes place in {city}.", f"City: {city}."],
        "date": [f"It happens on {d[1]}.", f"Date: {d[2]}.", f"Mark {d[3]} in your calendar."],
        "attendees": [f"About {attendees} people are expected.", f"Expected attendance: {attendees}.",
                      f"Organizers plan for {attendees} guests."],
        "free": ["Entry is free.", "Admission is free of charge.", "Free entry: yes."] if free
        else [f"Tickets cost {rng.randint(5, 300)} dollars.", "Entry requires a paid ticket.", "Free entry: no."],
        "organizer": [f"It is organized by {organizer}.", f"{organizer} is the organizer.", f"Organizer: {organizer}."],
    }  # fmt: skip
    distractors = [
        f"Doors open at {rng.randint(7, 11)} in the morning.",
        f"Last year {make_person_name(rng)} gave a talk there.",
        f"There will be {rng.randint(2, 40)} stands.",
    ]
    return intros, fields, distractors, record


_MAKERS = {"person": _person, "product": _product, "event": _event}


def make_extraction_example(rng: random.Random, kind: str) -> tuple[str, dict[str, Any]]:
    """One short text about a ``kind`` entity and the record extracted from it.

    Every value of the record appears in the text (dates in one of several spellings, booleans as
    phrases); the record validates against ``SCHEMAS[kind]`` and its keys follow the schema order.
    The intro sentence comes first; the other sentences (one per remaining field, plus 0-2
    distractors) come in random order.
    """
    if kind not in _MAKERS:
        raise ValueError(f"unknown extraction kind {kind!r}; use one of {EXTRACTION_KINDS}")
    intros, fields, distractors, record = _MAKERS[kind](rng)
    first, covered = rng.choice(intros)
    body = [rng.choice(options) for key, options in fields.items() if key not in covered]
    body += rng.sample(distractors, rng.randint(0, 2))
    rng.shuffle(body)
    return " ".join([first, *body]), record


def format_record(record: dict[str, Any]) -> str:
    """The one canonical JSON form used in training: compact, one line, keys in insertion order."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False)


def extraction_prompt(text: str, kind: str) -> str:
    """The exact text before the JSON; the model continues with ``format_record(record)``."""
    return f"Text: {text}\n{kind.capitalize()} JSON:\n"


def extraction_items(
    n: int, seed: int, kinds: Sequence[str] = EXTRACTION_KINDS
) -> list[tuple[str, str, dict[str, Any]]]:
    """``n`` fresh ``(kind, prompt, record)`` triples, the kinds taken in turn, from one seeded
    generator (what tests and benchmarks extract from)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        text, record = make_extraction_example(rng, kind)
        out.append((kind, extraction_prompt(text, kind), record))
    return out


# --- few-shot Q&A ---------------------------------------------------------------------------------
def few_shot_prompt(shots: Sequence[tuple[str, str]], question: str, facts: str | None = None) -> str:
    """``[Facts: ...⏎]`` then ``Q: ...⏎A: ...⏎`` per shot, then ``Q: question⏎A: `` (trailing space).
    ``question`` and ``facts`` are joined with ``+``, not formatted, so a DSL program traced with
    them as parameters keeps them as IR parameters (the result is then a DSL concatenation)."""
    head = "Facts: " + facts + "\n" if facts else ""
    return head + "".join(f"Q: {q}\nA: {a}\n" for q, a in shots) + "Q: " + question + "\nA: "


def _arithmetic_pair(rng: random.Random) -> tuple[str, str]:
    op = rng.randrange(3)
    if op == 0:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"What is {a} + {b}?", str(a + b)
    if op == 1:
        a = rng.randint(0, 99)
        b = rng.randint(0, a)
        return f"What is {a} - {b}?", str(a - b)
    a, b = rng.randint(1, 12), rng.randint(1, 12)
    return f"What is {a} times {b}?", str(a * b)


def _compare_pair(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    op = rng.randrange(3)
    if op == 0:
        return f"Is {a} greater than {b}?", str(a > b)
    if op == 1:
        return f"Is {a} less than {b}?", str(a < b)
    return f"Is {a} an even number?", str(a % 2 == 0)


def make_facts(rng: random.Random, n_people: int) -> tuple[str, list[dict[str, Any]]]:
    """A facts line about ``n_people`` people; each person gets a random subset of city/age/job."""
    people, sentences = [], []
    for _ in range(n_people):
        p: dict[str, Any] = {"name": make_person_name(rng)}
        for attr in rng.sample(("city", "age", "occupation"), rng.randint(1, 3)):
            p[attr] = {"city": make_city, "age": lambda r: r.randint(18, 90), "occupation": lambda r: r.choice(OCCUPATIONS)}[attr](rng)  # fmt: skip
            v = p[attr]
            sentences.append(
                {
                    "city": f"{p['name']} lives in {v}.",
                    "age": f"{p['name']} is {v} years old.",
                    "occupation": f"{p['name']} is {_article(str(v))} {v}.",
                }[attr]  # fmt: skip
            )
        people.append(p)
    rng.shuffle(sentences)
    return " ".join(sentences), people


def _facts_pair(rng: random.Random, people: list[dict[str, Any]]) -> tuple[str, str]:
    p = rng.choice(people) if rng.random() < 0.85 else {"name": make_person_name(rng)}
    name = p["name"]
    if "age" in p and rng.random() < 0.3:
        return f"How old is {name}?", str(p["age"])
    attr = rng.choice(("city", "age", "occupation"))
    truth = rng.random() < 0.5
    if attr == "city":
        value = p["city"] if attr in p and truth else make_city(rng)
        q = f"Does {name} live in {value}?"
    elif attr == "age":
        value = p["age"] if attr in p and truth else rng.randint(18, 90)
        q = f"Is {name} {value} years old?"
    else:
        value = p["occupation"] if attr in p and truth else rng.choice(OCCUPATIONS)
        q = f"Is {name} {_article(str(value))} {value}?"
    if attr not in p:
        return q, "Unknown"
    return q, str(p[attr] == value)


def make_qa_set(rng: random.Random, kind: str, n: int) -> tuple[str | None, list[tuple[str, str]]]:
    """``(facts, [(question, answer), ...])`` of one Q&A kind; facts is None except for ``facts``."""
    if kind == "arithmetic":
        return None, [_arithmetic_pair(rng) for _ in range(n)]
    if kind == "compare":
        return None, [_compare_pair(rng) for _ in range(n)]
    if kind == "facts":
        facts, people = make_facts(rng, rng.randint(2, 4))
        return facts, [_facts_pair(rng, people) for _ in range(n)]
    raise ValueError(f"unknown Q&A kind {kind!r}; use one of {QA_KINDS}")


# --- chat -----------------------------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are llmir-tiny, a small assistant.",
    "Answer briefly.",
)
_SMALL_TALK = (
    ("Hello!", "Hello! How can I help you?"),
    ("Hi", "Hi! What can I do for you?"),
    ("What is your name?", "I am llmir-tiny, a small language model."),
    ("Thank you!", "You are welcome."),
    ("Who made you?", "I was trained by the llmir_lang project."),
)


def render_chat(messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The text ``CHAT_TEMPLATE`` renders for ``messages`` (kept equal to it by a test)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def make_chat_turn(rng: random.Random) -> tuple[str, str]:
    """One ``(user, assistant)`` exchange: extraction, arithmetic, a fact check or small talk."""
    r = rng.random()
    if r < 0.45:
        kind = rng.choice(EXTRACTION_KINDS)
        text, record = make_extraction_example(rng, kind)
        return f"Extract the {kind} record from this text as JSON.\n{text}", format_record(record)
    if r < 0.65:
        return _arithmetic_pair(rng)
    if r < 0.9:
        facts, people = make_facts(rng, rng.randint(1, 3))
        q, a = _facts_pair(rng, people)
        if not a.isdigit():
            q += " Answer True, False or Unknown."
        return f"{facts}\n{q}", a
    return rng.choice(_SMALL_TALK)


def make_chat_example(rng: random.Random) -> list[dict[str, str]]:
    """A conversation of an optional system message and 1-3 user/assistant exchanges."""
    msgs = [{"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        user, assistant = make_chat_turn(rng)
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return msgs


# --- training documents ---------------------------------------------------------------------------
def make_training_document(rng: random.Random) -> str:
    """One training document (without the end-of-text token): extraction 50%, Q&A 30%, chat 20%."""
    r = rng.random()
    if r < 0.5:
        kind = rng.choice(EXTRACTION_KINDS)
        text, record = make_extraction_example(rng, kind)
        return extraction_prompt(text, kind) + format_record(record)
    if r < 0.8:
        facts, pairs = make_qa_set(rng, rng.choice(QA_KINDS), rng.randint(3, 8))
        head = f"Facts: {facts}\n" if facts else ""
        return head + "".join(f"Q: {q}\nA: {a}\n" for q, a in pairs)
    return render_chat(make_chat_example(rng))
