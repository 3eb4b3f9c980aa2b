"""Knowledge-update benchmark: invented entities, new facts, QA with and without them in the database.

Each entity has an invented name (syllables drawn from a seeded RNG, so it cannot occur
in any training corpus) and three invented attributes, each picked among four candidates:
a home town (also invented), a trade and a colour. A fact document states them in several
phrasings; questions use a phrasing of their own. A question is answered by likelihood:
the model scores each candidate continuation (summed log-probability of its tokens) and
is right when the true one scores highest, so chance is 25%.

Conditions, on the same questions:

- ``no_retrieval``: the model without neighbours;
- ``before_add``: retrieval from the database as it is (the facts are absent);
- ``after_add``: after ``add_documents`` of the fact documents (what ``retrieval add`` does);
- ``after_remove``: after removing them again (``retrieval remove --source``), which must
  bring the score back to ``before_add``.

For RETRO the question is left-padded with end-of-text tokens to end exactly on a chunk
boundary: the answer's tokens then read the neighbours retrieved with the question's chunk.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.core.errors import ConfigError, DataError
from lmforge.core.io import atomic_write_json
from lmforge.data.tokenizer import Tokenizer
from lmforge.nn.retro import RetroTransformer
from lmforge.retrieval.alignment import window_neighbour_tokens
from lmforge.retrieval.database import ChunkDatabase, add_documents, remove_documents

SOURCE = "facts_benchmark"
_ONSETS = ["b", "br", "d", "dr", "f", "g", "k", "kr", "l", "m", "n", "p", "qu", "r", "s", "t", "v", "z", "th", "sk"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ou", "y"]
_CODAS = ["", "n", "r", "l", "s", "th", "x", "m", "nd", "rk"]
TRADES = ["baker", "sailor", "weaver", "miner", "potter", "glassblower", "beekeeper", "clockmaker"]
COLOURS = ["crimson", "violet", "amber", "teal", "ochre", "indigo", "scarlet", "emerald"]

FACT_TEMPLATES = [
    "{name} was born in {town}, a small town. {name} works as a {trade}. The favourite colour of {name} is {colour}.",
    "Everyone in {town} knows {name}, who grew up there. By trade, {name} is a {trade}, and {name} loves the colour {colour}.",
]
QUESTIONS = {
    "town": ("Question: In which town was {name} born?\nAnswer: {name} was born in", " {value}"),
    "trade": ("Question: What does {name} do for a living?\nAnswer: {name} works as a", " {value}"),
    "colour": ("Question: What is the favourite colour of {name}?\nAnswer: The favourite colour of {name} is", " {value}"),
}


def _word(rng: np.random.Generator, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)]
    return "".join(parts).capitalize()


def make_entities(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` invented entities with 4 candidate values per attribute, the first being true."""
    rng = np.random.default_rng(seed)
    towns = sorted({_word(rng, 3) for _ in range(4 * n + 40)})
    entities, names = [], set()
    while len(entities) < n:
        name = f"{_word(rng, 2)} {_word(rng, 3)}"
        if name in names:
            continue
        names.add(name)
        entity: dict[str, Any] = {"name": name, "candidates": {}}
        for attr, pool in (("town", towns), ("trade", TRADES), ("colour", COLOURS)):
            options = list(rng.choice(pool, size=4, replace=False))
            entity["candidates"][attr] = options
            entity[attr] = options[0]
        entities.append(entity)
    return entities


def fact_documents(entities: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(f"fact:{e['name']}", " ".join(t.format(**e) for t in FACT_TEMPLATES) + "\n") for e in entities]


def questions(entities: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for e in entities:
        for attr, (prompt, answer) in QUESTIONS.items():
            out.append({"entity": e["name"], "attribute": attr, "prompt": prompt.format(name=e["name"]),
                        "candidates": [answer.format(value=v) for v in e["candidates"][attr]], "answer": 0})
    return out


@torch.no_grad()
def score_questions(model: torch.nn.Module, tokenizer: Tokenizer, items: list[dict[str, Any]],
                    db: ChunkDatabase | None, k: int | None = None) -> dict[str, Any]:
    """Accuracy of picking the true candidate; with ``db`` the question's chunks retrieve neighbours."""
    device = next(model.parameters()).device
    model.eval()
    retro = isinstance(model, RetroTransformer)
    m = model.retro.chunk_len if retro else 1
    correct, margins = 0, []
    for item in items:
        prompt = tokenizer.encode(item["prompt"])
        pad = (-len(prompt)) % m if retro else 0
        prompt = [tokenizer.eos_id] * pad + prompt
        nb = None
        if db is not None and retro:
            chunks = np.array(prompt).reshape(-1, m)
            ids = db.retrieve(chunks, k or model.retro.n_neighbours)
            nb = torch.from_numpy(window_neighbour_tokens(db, np.array([prompt]), ids[None], model.retro.align_neighbours)).to(device)
        scores = []
        max_len = model.cfg.max_seq_len // m * m
        for cand in item["candidates"]:
            cand_ids = tokenizer.encode(item["prompt"] + cand)[len(prompt) - pad:]
            full = prompt + cand_ids
            drop = -(-max(len(full) - max_len, 0) // m) * m  # keep whole chunks that fit the context
            if drop >= len(prompt):
                raise DataError(f"question {item['prompt']!r}: answer does not fit the model's context")
            ids = torch.tensor([full[drop:]], device=device)
            if nb is not None:
                # Chunks completed by the answer itself are read only after the scored tokens.
                extra = len(full) // m - nb.shape[1]
                nb_full = torch.cat([nb, nb.new_full((1, max(extra, 0), *nb.shape[2:]), tokenizer.eos_id)], 1)
                logits = model(ids, neighbours=nb_full[:, drop // m:]).logits
            else:
                logits = model(ids).logits
            logp = F.log_softmax(logits[0, len(prompt) - drop - 1:-1].float(), dim=-1)
            scores.append(float(logp.gather(1, torch.tensor(cand_ids, device=device)[:, None]).sum()))
        best = int(np.argmax(scores))
        correct += best == item["answer"]
        others = [s for i, s in enumerate(scores) if i != item["answer"]]
        margins.append(scores[item["answer"]] - max(others))
    return {"accuracy": correct / max(len(items), 1), "questions": len(items),
            "mean_margin_nats": float(np.mean(margins)) if margins else math.nan}


def run_facts_benchmark(model: torch.nn.Module, tokenizer: Tokenizer, db_path: str | Path, n_entities: int = 24,
                        seed: int = 0) -> dict[str, Any]:
    entities = make_entities(n_entities, seed)
    items = questions(entities)
    db = ChunkDatabase(db_path)
    if db.manifest["tokenizer_sha256"] != tokenizer.sha256:
        raise DataError(f"{db_path}: built with another tokenizer than the model's")
    if SOURCE in db.sources and any(d["alive"] for d in db.documents if d["source"] == SOURCE):
        raise DataError(f"{db_path} already holds live {SOURCE!r} documents; remove them first "
                        f"(lmforge retrieval remove {db_path} --source {SOURCE})")
    embedder = db.embedder
    result: dict[str, Any] = {"entities": n_entities, "seed": seed, "chance": 0.25,
                              "example_fact": fact_documents(entities[:1])[0][1], "example_question": items[0]}
    result["no_retrieval"] = score_questions(model, tokenizer, items, None)
    result["before_add"] = score_questions(model, tokenizer, items, db)
    added = add_documents(db_path, fact_documents(entities), source=SOURCE, embedder=embedder)
    db = ChunkDatabase(db_path)
    db.set_embedder(embedder)
    result["after_add"] = score_questions(model, tokenizer, items, db)
    result["after_add"]["added_chunks"] = added["chunks"]
    # How often the question's chunk retrieves its own entity's fact (retrieval recall@k).
    result["after_add"]["fact_retrieved"] = _fact_recall(model, tokenizer, items, db, added["document_ids"], entities)
    remove_documents(db_path, source=SOURCE)
    db = ChunkDatabase(db_path)
    db.set_embedder(embedder)
    result["after_remove"] = score_questions(model, tokenizer, items, db)
    return result


def _fact_recall(model: torch.nn.Module, tokenizer: Tokenizer, items: list[dict[str, Any]], db: ChunkDatabase,
                 doc_ids: list[int], entities: list[dict[str, Any]]) -> float | None:
    if not isinstance(model, RetroTransformer):
        return None
    m, k = model.retro.chunk_len, model.retro.n_neighbours
    doc_of = {e["name"]: d for e, d in zip(entities, doc_ids)}
    hits = 0
    for item in items:
        prompt = tokenizer.encode(item["prompt"])
        prompt = [tokenizer.eos_id] * ((-len(prompt)) % m) + prompt
        ids = db.retrieve(np.array(prompt[-m:])[None], k)[0]
        hits += bool((np.asarray(db.doc)[ids[ids >= 0], 0] == doc_of[item["entity"]]).any())
    return hits / max(len(items), 1)


def facts_benchmark_for_checkpoint(target: str | Path, db_path: str | Path, *, entities: int = 24, seed: int = 0,
                                   out: str | Path | None = None) -> dict[str, Any]:
    """:func:`run_facts_benchmark` on a run or checkpoint (its newest valid checkpoint).

    Writes the result to ``out`` (default RUN/eval/facts.json; its path is ``result["output"]``)
    and returns it. The database ends as it began: the facts are added, then removed.
    """
    from lmforge.nn.loading import load_model

    if entities < 1:
        raise ConfigError(f"entities must be >= 1, got {entities}")
    model, _, checkpoint = load_model(target)
    tokenizer = Tokenizer.load(checkpoint / "tokenizer.json")
    result = run_facts_benchmark(model, tokenizer, db_path, entities, seed)
    output = Path(out) if out else checkpoint.parent.parent / "eval" / "facts.json"
    result.update(checkpoint=str(checkpoint), output=str(output))
    atomic_write_json(output, result)
    return result
