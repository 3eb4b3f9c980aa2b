"""Gold fact neighbours: which training chunks ask about which fact document, for RETRO training.

A question document of ``kind: invented_facts`` (:mod:`lmforge.data.invented_facts`) asks about
one person, whose facts are in another document, that person's fact document. With a lexical
retriever only about a third of the training answers have that document among the precomputed
neighbours, so reading a neighbour rarely pays off in training. ``retrieval.gold_fact_rate`` puts
a chunk of the fact document in a neighbour slot of question chunks
(:class:`lmforge.retrieval.batches.RetroLoader`); this module finds, for every training chunk of
the database, the chunks of the fact document its question document is paired with.

The pairing is not guessed from the text. The source names its documents
(``person00012:questions_by_town`` asks about ``person00012:fact``,
:func:`lmforge.data.invented_facts.fact_document_of`), and data preparation records every
document's name beside its content hash in the read step's work files
(``work/read/SOURCE/chunk_*.arrow``). The database knows a document only by its position in the
source's training shards, so each of the source's training documents is decoded from the shards
and matched to its name by content hash (byte-level tokens decode to the exact text).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.core.errors import DataError
from lmforge.core.logging import get_logger
from lmforge.data import invented_facts
from lmforge.data.documents import content_hash
from lmforge.data.shards import ShardSet
from lmforge.data.stages import WORK, read_chunk
from lmforge.retrieval.database import ChunkDatabase

log = get_logger(__name__)


def question_fact_documents(db: ChunkDatabase, source: str) -> dict[int, int]:
    """{database id of a question document: database id of its fact document} for the training
    documents of ``source`` (an ``invented_facts`` source) whose fact document is also a training
    document of the database (one held out is not there to read)."""
    info = db.sources.get(source)
    if info is None or info["kind"] != "train":
        raise DataError(f"{db.path}: no training source {source!r} (training sources: "
                        f"{', '.join(n for n, i in db.sources.items() if i['kind'] == 'train')})")
    data_dir = Path(info["data_dir"])
    records = sorted((data_dir / WORK / "read" / source).glob("chunk_*.arrow"))
    if not records:
        raise DataError(f"{data_dir}: no read records of source {source!r} (work/read/{source}/chunk_*.arrow); "
                        "the pairing of question and fact documents comes from them: prepare the data again")
    name_of: dict[str, str] = {}
    for path in records:
        chunk = read_chunk(path, ("doc_id", "sha256"))
        name_of.update(zip(chunk["sha256"], chunk["doc_id"]))
    id_of_name: dict[str, int] = {}
    shards = ShardSet(data_dir, "train", source)
    ends = np.append(shards.doc_offsets[1:], len(shards))
    database_ids = {d["name"]: int(d["id"]) for d in db.documents if d["source"] == source}
    for j, (start, end) in enumerate(zip(shards.doc_offsets, ends)):
        if f"{source}:{j}" not in database_ids:
            continue  # past the last whole chunk of the source: not in the database
        text = db.tokenizer.decode(shards.get(int(start), int(end - start)))
        name = name_of.get(content_hash(text))
        if name is None:
            raise DataError(f"{data_dir}: training document {j} of source {source!r} is in no read record "
                            "(the shards and work files disagree): prepare the data again")
        id_of_name[name] = database_ids[f"{source}:{j}"]
    pairs = {}
    for name, doc in id_of_name.items():
        fact = invented_facts.fact_document_of(name)
        if fact is not None and fact in id_of_name:
            pairs[doc] = id_of_name[fact]
    if not pairs:
        raise DataError(f"{db.path}: source {source!r} has no question document paired with a fact document "
                        "(is it an invented_facts source?)")
    return pairs


def fact_chunks_of_training_chunks(db: ChunkDatabase, pairs: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(first chunk, number of chunks) of the paired fact document of every training chunk, int64
    [n_train_chunks] each; 0 chunks where the chunk is no question chunk.

    A chunk is a question chunk when its *last* token is in a paired question document: the chunk's
    neighbours serve the prediction of the text after it (RETRO's causal shift), which is that
    document's. The fact document's chunks are those holding any of its tokens, as the database
    records them (``documents[i]["first_chunk"]``, ``["n_chunks"]``).
    """
    n_train = sum(i["n_chunks"] for i in db.sources.values() if i["kind"] == "train")
    documents = db.documents
    fact_of = np.full(len(documents), -1, dtype=np.int64)
    fact_of[np.fromiter(pairs, np.int64, len(pairs))] = np.fromiter(pairs.values(), np.int64, len(pairs))
    doc_first = np.array([d["first_chunk"] for d in documents], dtype=np.int64)
    doc_chunks = np.array([d["n_chunks"] for d in documents], dtype=np.int64)
    fact = fact_of[np.asarray(db.doc[:n_train, 1])]
    question = fact >= 0
    first = np.where(question, doc_first[np.maximum(fact, 0)], 0)
    count = np.where(question, doc_chunks[np.maximum(fact, 0)], 0)
    log.info("gold fact neighbours: %d question documents paired, %d of %d training chunks are question chunks",
             len(pairs), int((count > 0).sum()), n_train)
    return first, count
