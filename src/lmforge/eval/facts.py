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

Two variants (``variant``): ``verbatim`` (this module's questions, whose answer is the
fact document's continuation of the question's last words: a copy test) and ``reading``
(:mod:`lmforge.eval.facts_reading`: other phrasings, reverse relations, entities named by a
description, distractor documents; never a verbatim continuation). Beside the model, two
model-free baselines read the same retrieved, aligned neighbours:

- ``copy_baseline``: pick the candidate whose tokens follow the aligned neighbour (the
  longest prefix of the candidate that the neighbour's continuation starts with; ties split
  evenly) — what copying through the aligned read can do. It answers the verbatim variant
  and should be near chance on the reading variant;
- ``presence_baseline``: pick a candidate that appears anywhere in the retrieved windows
  (ties split) — what "the answer is somewhere in the neighbours" can do.

Several seeds (entity sets) give an accuracy with a 95% percentile-bootstrap interval that
resamples entities (their questions together) over all seeds (:func:`summarise_seeds`).
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


VARIANTS = ("verbatim", "reading")


def benchmark_items(variant: str, n_entities: int, seed: int) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
    """(documents to add, questions) of one seed of ``variant``."""
    if variant == "verbatim":
        entities = make_entities(n_entities, seed)
        return fact_documents(entities), questions(entities)
    if variant == "reading":
        from lmforge.eval.facts_reading import make_reading_entities, reading_documents, reading_questions

        people = make_reading_entities(n_entities, seed)
        return reading_documents(people), reading_questions(people, seed)
    raise ConfigError(f"facts benchmark: unknown variant {variant!r} (known: {', '.join(VARIANTS)})")


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
    correct, margins, scored = 0, [], []
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
        scored.append(float(best == item["answer"]))
        others = [s for i, s in enumerate(scores) if i != item["answer"]]
        margins.append(scores[item["answer"]] - max(others))
    return {"accuracy": correct / max(len(items), 1), "questions": len(items),
            "mean_margin_nats": float(np.mean(margins)) if margins else math.nan, "scores": scored}


def chunk_aligned_prompt(tokenizer: Tokenizer, text: str, chunk_len: int) -> list[int]:
    """``text``'s tokens left-padded with end-of-text to whole chunks, so the prompt ends on a chunk
    boundary: its last chunk is the one that retrieves, and the answer starts a new chunk."""
    prompt = tokenizer.encode(text)
    return [tokenizer.eos_id] * ((-len(prompt)) % chunk_len) + prompt


def _question_neighbours(tokenizer: Tokenizer, prompt_text: str, db: ChunkDatabase, m: int, k: int,
                         align: bool) -> tuple[list[int], np.ndarray]:
    """(padded prompt tokens, the last chunk's neighbour windows [k, 2m]) as the model reads them."""
    prompt = chunk_aligned_prompt(tokenizer, prompt_text, m)
    ids = db.retrieve(np.array(prompt).reshape(-1, m), k)
    windows = window_neighbour_tokens(db, np.array([prompt]), ids[None], align)
    return prompt, windows[0, -1]


def _split_ties(values: list[float], answer: int) -> float:
    best = np.flatnonzero(np.asarray(values) == max(values))
    return 1.0 / len(best) if answer in best else 0.0


def copy_baselines(tokenizer: Tokenizer, items: list[dict[str, Any]], db: ChunkDatabase, m: int, k: int,
                   align: bool) -> dict[str, dict[str, Any]]:
    """The model-free baselines (module docstring) on the neighbours a RETRO model with chunk_len
    ``m``, ``k`` neighbours and alignment ``align`` would read; expected accuracy, ties split."""
    copy, presence = [], []
    for item in items:
        prompt, windows = _question_neighbours(tokenizer, item["prompt"], db, m, k, align)
        n_prompt = len(tokenizer.encode(item["prompt"]))
        follow, length = [], []
        for cand in item["candidates"]:
            tokens = tokenizer.encode(item["prompt"] + cand)[n_prompt:]
            prefix = 0
            for window in windows:  # the continuation starts at position m of an aligned window
                run = 0
                while run < len(tokens) and m + run < window.shape[0] and window[m + run] == tokens[run]:
                    run += 1
                prefix = max(prefix, run)
            follow.append(float(prefix))
            text = " | ".join(" ".join(str(t) for t in w) for w in windows)
            length.append(float(f" {' '.join(str(t) for t in tokens)} " in f" {text} "))
        copy.append(_split_ties(follow, item["answer"]))
        presence.append(_split_ties(length, item["answer"]))
    return {name: {"accuracy": float(np.mean(v)) if v else math.nan, "questions": len(v), "scores": v}
            for name, v in (("copy_baseline", copy), ("presence_baseline", presence))}


def accuracy_interval(scores: list[float], clusters: list[Any], level: float = 0.95, samples: int = 2000,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of mean accuracy, resampling clusters (entities) with their questions."""
    keys = {c: i for i, c in enumerate(dict.fromkeys(clusters))}
    index = np.array([keys[c] for c in clusters])
    sums = np.bincount(index, weights=np.asarray(scores, dtype=np.float64), minlength=len(keys))
    counts = np.bincount(index, minlength=len(keys)).astype(np.float64)
    picks = np.random.default_rng(seed).integers(0, len(keys), size=(samples, len(keys)))
    means = sums[picks].sum(1) / counts[picks].sum(1)
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def summarise_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled accuracy and entity-bootstrap interval per condition over the seeds' results."""
    summary: dict[str, Any] = {}
    for cond, entry in per_seed[0].items():
        if not isinstance(entry, dict) or "scores" not in entry:
            continue
        scores, clusters = [], []
        for result in per_seed:
            scores += result[cond]["scores"]
            clusters += [(result["seed"], e) for e in result["entities_of_questions"]]
        low, high = accuracy_interval(scores, clusters)
        summary[cond] = {"accuracy": float(np.mean(scores)), "interval": [low, high], "questions": len(scores),
                         "per_seed": [r[cond]["accuracy"] for r in per_seed]}
    summary["remove_restores_before"] = all(r["after_remove"]["scores"] == r["before_add"]["scores"] for r in per_seed)
    return summary


def run_facts_benchmark(model: torch.nn.Module, tokenizer: Tokenizer, db_path: str | Path, n_entities: int = 24,
                        seed: int = 0, variant: str = "verbatim") -> dict[str, Any]:
    documents, items = benchmark_items(variant, n_entities, seed)
    db = ChunkDatabase(db_path)
    if db.manifest["tokenizer_sha256"] != tokenizer.sha256:
        raise DataError(f"{db_path}: built with another tokenizer than the model's")
    if SOURCE in db.sources and any(d["alive"] for d in db.documents if d["source"] == SOURCE):
        raise DataError(f"{db_path} already holds live {SOURCE!r} documents; remove them first "
                        f"(lmforge retrieval remove {db_path} --source {SOURCE})")
    embedder = db.embedder
    result: dict[str, Any] = {"variant": variant, "entities": n_entities, "seed": seed, "chance": 0.25,
                              "example_fact": documents[0][1], "example_question": items[0],
                              "entities_of_questions": [item["entity"] for item in items]}
    retro = isinstance(model, RetroTransformer)

    def baselines(condition: str) -> None:
        if retro:
            for name, value in copy_baselines(tokenizer, items, db, model.retro.chunk_len, model.retro.n_neighbours,
                                              model.retro.align_neighbours).items():
                result[f"{name}_{condition}"] = value

    result["no_retrieval"] = score_questions(model, tokenizer, items, None)
    result["before_add"] = score_questions(model, tokenizer, items, db)
    baselines("before_add")
    added = add_documents(db_path, documents, source=SOURCE, embedder=embedder)
    db = ChunkDatabase(db_path)
    db.set_embedder(embedder)
    result["after_add"] = score_questions(model, tokenizer, items, db)
    baselines("after_add")
    result["after_add"]["added_chunks"] = added["chunks"]
    # How often the question's chunk retrieves its own entity's fact (retrieval recall@k).
    result["after_add"]["fact_retrieved"] = _fact_recall(model, tokenizer, items, db, documents,
                                                         added["document_ids"])
    remove_documents(db_path, source=SOURCE)
    db = ChunkDatabase(db_path)
    db.set_embedder(embedder)
    result["after_remove"] = score_questions(model, tokenizer, items, db)
    return result


def _fact_recall(model: torch.nn.Module, tokenizer: Tokenizer, items: list[dict[str, Any]], db: ChunkDatabase,
                 documents: list[tuple[str, str]], doc_ids: list[int]) -> float | None:
    if not isinstance(model, RetroTransformer):
        return None
    m, k = model.retro.chunk_len, model.retro.n_neighbours
    doc_of = {title.split(":", 1)[1]: d for (title, _), d in zip(documents, doc_ids) if title.startswith("fact:")}
    hits = 0
    for item in items:
        prompt = chunk_aligned_prompt(tokenizer, item["prompt"], m)
        ids = db.retrieve(np.array(prompt[-m:])[None], k)[0]
        hits += bool((np.asarray(db.doc)[ids[ids >= 0], 0] == doc_of[item["entity"]]).any())
    return hits / max(len(items), 1)


def facts_benchmark_for_checkpoint(target: str | Path, db_path: str | Path, *, entities: int = 24, seed: int = 0,
                                   out: str | Path | None = None, variant: str = "verbatim",
                                   seeds: list[int] | None = None) -> dict[str, Any]:
    """:func:`run_facts_benchmark` on a run or checkpoint (its newest valid checkpoint), for
    ``seeds`` (default ``[seed]``); ``result["summary"]`` pools them (:func:`summarise_seeds`).

    Writes the result to ``out`` (default RUN/eval/facts.json, RUN/eval/facts_reading.json for
    the reading variant; its path is ``result["output"]``) and returns it. The database ends as
    it began: the facts are added, then removed.
    """
    from lmforge.nn.loading import load_model

    if entities < 1:
        raise ConfigError(f"entities must be >= 1, got {entities}")
    if variant not in VARIANTS:
        raise ConfigError(f"facts benchmark: unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    model, _, checkpoint = load_model(target)
    tokenizer = Tokenizer.load(checkpoint / "tokenizer.json")
    per_seed = [run_facts_benchmark(model, tokenizer, db_path, entities, s, variant) for s in (seeds or [seed])]
    # the first seed's result at the top level, as before; all seeds and their summary beside it
    result = {**per_seed[0], "seeds": [r["seed"] for r in per_seed], "per_seed": per_seed,
              "summary": summarise_seeds(per_seed)}
    name = "facts.json" if variant == "verbatim" else f"facts_{variant}.json"
    output = Path(out) if out else checkpoint.parent.parent / "eval" / name
    result.update(checkpoint=str(checkpoint), output=str(output))
    atomic_write_json(output, result)
    return result
