"""Synthetic training documents with question/answer structure about invented people.

What it is for: a RETRO model trained on literature and code never sees a neighbour that holds
the answer to a question in another phrasing, so it never learns to *read* one (docs/retrieval.md,
"Training rules compared"). This source supplies such examples as ordinary pretraining data:

- a **fact document** per person, stating a home town, a trade and a favourite colour in each of
  :data:`FACT_TEMPLATES` (version 1 used one of them: with the name three times, the lexical
  ``bag_of_tokens`` retrieval of a question chunk found other people's question documents, which
  share the template words, and only 22% of training answers were in the neighbours they read);
- two **question documents** per person, kept apart from the fact document: one asks the three
  facts by the person's name (the relation in another word order), the other names the person by
  the town (the relation in reverse: town → name, and the person named by a description:
  town → trade, town → colour). Each answers every question once; no question document states
  a fact that a later question of the same document asks, so the answers are not in the
  document's own context: they are in the fact document, which the database built from the
  prepared data holds, and which the question chunks retrieve (it shares the name and town).

People come in pairs that share a first name (like the reading benchmark's distractors), so
a neighbour about the wrong person is common and must be told apart by the surname.

**Disjoint from the benchmark.** Every invented word here (first name, surname, town) starts with
one of :data:`FIRST_ONSETS`, whose initial letters (C, H, J, W, Y) begin no word of the knowledge
benchmarks (``lmforge.eval.facts``: B D F G K L M N P Q R S T V Z), so no benchmark person or
town can occur in this source, whatever the seeds (``tests/test_invented_facts.py`` also checks
it on generated sets). Trades and colours are a common vocabulary (a superset of the benchmark's):
what is new in the benchmark is which person has which.

**Not a copy task.** No answer follows the last word of its question anywhere in the person's
fact document (checked in the tests): answering needs the relation, not the continuation. Some of
the reading benchmark's question templates are used here (:data:`BENCHMARK_TEMPLATES_SEEN`), the
others are held out (:data:`BENCHMARK_TEMPLATES_HELD_OUT`), so the benchmark can report seen and
unseen phrasings apart.

The documents are a pure function of (``seed``, ``people``) and the generator version; they are
shuffled, so that a person's three documents almost always lie far apart in the token stream
(beyond the neighbour exclusion radius, in different training windows).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from lmforge.data.documents import Document

GENERATOR_VERSION = "2"  # part of the source's signature: raise it when the documents change
PEOPLE = 3000            # people per source (1,500 pairs sharing a first name): 9,000 documents
SEED = 0
# First syllable of every invented word: initials that no benchmark word starts with.
FIRST_ONSETS = ["c", "ch", "cl", "cr", "h", "j", "w", "wr", "y"]
ONSETS = ["b", "br", "d", "dr", "f", "g", "k", "kr", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "sk",
          "c", "ch", "h", "j", "w", "y"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ou", "y"]
CODAS = ["", "n", "r", "l", "s", "th", "x", "m", "nd", "rk"]
TRADES = ["baker", "sailor", "weaver", "miner", "potter", "glassblower", "beekeeper", "clockmaker",
          "carpenter", "fisher", "tailor", "smith", "farmer", "cooper", "mason", "shepherd"]
COLOURS = ["crimson", "violet", "amber", "teal", "ochre", "indigo", "scarlet", "emerald",
           "blue", "green", "yellow", "grey", "silver", "golden", "purple", "orange"]

FACT_TEMPLATES = [
    # the reading benchmark's own phrasing of a fact (lmforge.eval.facts_reading.FACT)
    "{name} was born in {town}, a small town by the river. {name} works as a {trade}. "
    "The favourite colour of {name} is {colour}.\n",
    "{name} grew up in {town}. By trade {name} is a {trade}, and the colour {name} loves most is {colour}.\n",
    "In {town} lives {name}, a {trade} who always wears {colour}.\n",
]
# (kind, attribute asked, prompt, answer) like lmforge.eval.facts_reading.READING_QUESTIONS.
# The benchmark's templates marked "seen" are used here; its other three are held out.
QUESTIONS_BY_NAME = {
    "town": [
        "Question: Which town is the birthplace of {name}?\nAnswer: The birthplace of {name} is",  # seen
        "Question: Where does {name} come from?\nAnswer: {name} comes from the town called",
        "Question: What is the home town of {name}?\nAnswer: The home town of {name} is called",
    ],
    "trade": [
        "Question: What work does {name} do?\nAnswer: {name} earns a living as the village",
        "Question: What is the job of {name}?\nAnswer: The job of {name} is that of the town",
    ],
    "colour": [
        "Question: Which colour does {name} like best?\nAnswer: {name} likes best the colour",  # seen
        "Question: What shade does {name} prefer?\nAnswer: {name} prefers the shade",
    ],
}
QUESTIONS_BY_TOWN = {
    "name": [
        "Question: Who comes from {town}?\nAnswer: From {town} comes the one called",
        "Question: Whose home town is {town}?\nAnswer: {town} is the home town of the one called",
    ],
    "trade": [
        "Question: What trade does the person born in {town} follow?\nAnswer: The person from {town} is the local",
        # seen
        "Question: What work does the one from {town} do?\nAnswer: The one from {town} earns a living as the village",
    ],
    "colour": [
        "Question: What shade does the one from {town} prefer?\nAnswer: The one from {town} prefers the shade",
        "Question: Which hue suits the person of {town}?\nAnswer: The person of {town} prefers the hue",
    ],
}
BENCHMARK_TEMPLATES_SEEN = (("reordered", "town"), ("reordered", "colour"), ("description", "trade"))
BENCHMARK_TEMPLATES_HELD_OUT = (("reordered", "trade"), ("reverse", "name"), ("description", "colour"))


def _word(rng: np.random.Generator, syllables: int) -> str:
    parts = [rng.choice(FIRST_ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)]
    parts += [rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables - 1)]
    return "".join(parts).capitalize()


def make_people(people: int = PEOPLE, seed: int = SEED) -> list[dict[str, str]]:
    """``people`` invented people (pairs sharing a first name; names and towns all distinct)."""
    rng = np.random.default_rng([seed, 2020])
    used: set[str] = set()

    def unique(make) -> str:
        while True:
            value = make()
            if value not in used:
                used.add(value)
                return value

    out: list[dict[str, str]] = []
    while len(out) < people:
        first = _word(rng, 2)
        for _ in range(min(2, people - len(out))):
            out.append({"name": unique(lambda: f"{first} {_word(rng, 3)}"), "town": unique(lambda: _word(rng, 3)),
                        "trade": str(rng.choice(TRADES)), "colour": str(rng.choice(COLOURS))})
    return out


def person_documents(person: dict[str, str], rng: np.random.Generator) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(kind, text, [(question prompt, answer)]) of the person's fact document and two question documents."""
    # every phrasing, in a random order: the name recurs often enough that a question document's
    # chunk retrieves its person's fact document rather than another person's question document
    fact = "".join(FACT_TEMPLATES[int(i)].format(**person) for i in rng.permutation(len(FACT_TEMPLATES)))
    by_name = [(str(attr), QUESTIONS_BY_NAME[attr][int(rng.integers(len(QUESTIONS_BY_NAME[attr])))])
               for attr in rng.permutation(list(QUESTIONS_BY_NAME))]
    # "Who comes from T?" first: the name it answers is asked by no later question of the document
    by_town = [(str(attr), QUESTIONS_BY_TOWN[attr][int(rng.integers(len(QUESTIONS_BY_TOWN[attr])))])
               for attr in ["name", *rng.permutation(["trade", "colour"])]]
    out: list[tuple[str, str, list[tuple[str, str]]]] = [("fact", fact, [])]
    for kind, asked in (("questions_by_name", by_name), ("questions_by_town", by_town)):
        pairs = [(template.format(**person), " " + person[attr]) for attr, template in asked]
        out.append((kind, "".join(f"{prompt}{answer}.\n" for prompt, answer in pairs), pairs))
    return out


def document_id(index: int, kind: str) -> str:
    """The ``doc_id`` of person ``index``'s document of ``kind`` ("fact", "questions_by_name", ...)."""
    return f"person{index:05d}:{kind}"


def fact_document_of(doc_id: str) -> str | None:
    """The ``doc_id`` of the fact document whose facts question document ``doc_id`` asks about;
    None for a fact document (or an id this source does not give)."""
    person, _, kind = doc_id.partition(":")
    if not person.startswith("person") or kind not in ("questions_by_name", "questions_by_town"):
        return None
    return f"{person}:fact"


def invented_fact_documents(source: str, people: int = PEOPLE, seed: int = SEED) -> Iterator[Document]:
    """Every person's three documents, shuffled (a pure function of ``people`` and ``seed``)."""
    rng = np.random.default_rng([seed, 2021])
    docs = []
    for index, person in enumerate(make_people(people, seed)):
        for kind, text, _ in person_documents(person, rng):
            docs.append(Document(text=text, source=source, doc_id=document_id(index, kind),
                                 meta={"person": person["name"], "document_kind": kind}))
    for i in rng.permutation(len(docs)):
        yield docs[int(i)]
