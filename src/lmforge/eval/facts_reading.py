"""The reading variant of the knowledge-update benchmark: facts that must be read, not copied.

The verbatim variant (:mod:`lmforge.eval.facts`) asks "… Answer: Thanlux Zorksurse was born in"
while the fact document says "Thanlux Zorksurse was born in Runrurkquyrk": the answer is the
verbatim continuation of the question's last words in the document, so copying the tokens
after the aligned neighbour answers every question without understanding anything. Here:

- each fact is stated once, in one phrasing (the fact document), and asked in others;
- no answer ever follows the question's last word in any added document (checked when the
  questions are made: :func:`check_not_verbatim`), so the aligned continuation never holds it;
- questions of three kinds: the same relation in another word order ("The birthplace of X
  is" → town), the relation asked in reverse (town → the person), and the entity named by a
  description ("the person born in T" → trade, colour);
- for every entity a **distractor document**: another invented person who shares the entity's
  first name and every relation word of the question, with a different town, trade and colour;
  the distractor's values are among the wrong candidates, so a rule that picks whichever
  candidate appears in the retrieved text is not enough either.

Four candidates per question, true one first (chance 0.25). Towns are unique across entities
and distractors, so a reverse question has one answer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lmforge.eval.facts import COLOURS, TRADES, _word

FACT = ("{name} was born in {town}, a small town by the river. {name} works as a {trade}. "
        "The favourite colour of {name} is {colour}.\n")
# (kind, attribute asked, prompt, answer); prompts name the entity by "name" or by "town".
READING_QUESTIONS = [
    ("reordered", "town", "Question: Which town is the birthplace of {name}?\nAnswer: The birthplace of {name} is",
     " {town}"),
    ("reordered", "trade", "Question: What is the trade of {name}?\nAnswer: {name} is by trade the local", " {trade}"),
    ("reordered", "colour", "Question: Which colour does {name} like best?\nAnswer: {name} likes best the colour",
     " {colour}"),
    ("reverse", "name", "Question: Who was born in {town}?\nAnswer: The one born in {town} is", " {name}"),
    ("description", "trade", "Question: What trade does the person born in {town} follow?\n"
     "Answer: The person from {town} is the local", " {trade}"),
    ("description", "colour", "Question: Which colour does the person from {town} like best?\n"
     "Answer: The person from {town} likes best the colour", " {colour}"),
]


def make_reading_entities(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` invented people, each with a distractor (same first name, other surname and values)."""
    rng = np.random.default_rng([seed, 20])
    used_names: set[str] = set()
    used_towns: set[str] = set()

    def unique(make, used: set[str]) -> str:
        while True:
            value = make()
            if value not in used:
                used.add(value)
                return value

    entities = []
    for _ in range(n):
        first = _word(rng, 2)
        person = {"name": unique(lambda: f"{first} {_word(rng, 3)}", used_names),
                  "town": unique(lambda: _word(rng, 3), used_towns),
                  "trade": str(rng.choice(TRADES)), "colour": str(rng.choice(COLOURS))}
        distractor = {"name": unique(lambda: f"{first} {_word(rng, 3)}", used_names),
                      "town": unique(lambda: _word(rng, 3), used_towns),
                      "trade": str(rng.choice([t for t in TRADES if t != person["trade"]])),
                      "colour": str(rng.choice([c for c in COLOURS if c != person["colour"]]))}
        entities.append({**person, "distractor": distractor})
    return entities


def reading_documents(entities: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(title, text) of every fact document, each followed by its entity's distractor."""
    docs = []
    for e in entities:
        docs.append((f"fact:{e['name']}", FACT.format(**e)))
        docs.append((f"distractor:{e['distractor']['name']}", FACT.format(**e["distractor"])))
    return docs


def _candidates(rng: np.random.Generator, e: dict[str, Any], attribute: str,
                entities: list[dict[str, Any]]) -> list[str]:
    """True value, the distractor's value, and two more (other entities' values, or the pool's)."""
    true, other = e[attribute], e["distractor"][attribute]
    if attribute in ("name", "town"):
        pool = [x[attribute] for x in entities if x[attribute] != true]
    else:
        pool = TRADES if attribute == "trade" else COLOURS
    pool = [v for v in pool if v not in (true, other)]
    return [true, other, *[str(v) for v in rng.choice(pool, size=2, replace=False)]]


def reading_questions(entities: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    if len(entities) < 3:
        raise ValueError(f"the reading benchmark needs at least 3 entities (got {len(entities)})")
    rng = np.random.default_rng([seed, 21])
    items = []
    for e in entities:
        for kind, attribute, prompt, answer in READING_QUESTIONS:
            values = _candidates(rng, e, attribute, entities)
            items.append({"entity": e["name"], "attribute": attribute, "kind": kind, "prompt": prompt.format(**e),
                          "candidates": [answer.format(**{attribute: v}) for v in values], "answer": 0})
    check_not_verbatim(items, [text for _, text in reading_documents(entities)])
    return items


def check_not_verbatim(items: list[dict[str, Any]], documents: list[str]) -> None:
    """Raise if an answer follows its question's last word anywhere in ``documents``."""
    corpus = "\n".join(" ".join(d.split()) for d in documents)
    for item in items:
        last = item["prompt"].split()[-1]
        answer = item["candidates"][item["answer"]]
        if f"{last}{answer}" in corpus:
            raise ValueError(f"reading benchmark: {last + answer!r} of question {item['prompt']!r} occurs verbatim "
                             "in a fact document (the answer would be a copy)")
