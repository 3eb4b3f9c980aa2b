"""``lmforge retrieval build|add|remove|neighbours|info|train|eval|facts|train-query-encoder|train-retriever``.

Parsing, a call into the library with typed arguments, printing. ``retrieval train`` is an
alias of ``lmforge train`` (same handler, same options)::

    add_retrieval_parser(verbs)                  # verbs = parser.add_subparsers(...)
    handler = {"retrieval": run_retrieval, ...}  # run_retrieval(args) -> exit code
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lmforge.cli.arguments import (add_train_args, fraction_list, name_list, non_negative_int, positive_float,
                                   positive_int)
from lmforge.retrieval.index import INDEX_KINDS


def add_retrieval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    retrieval = subparsers.add_parser(
        "retrieval", help="chunk database, vector index, neighbours and RETRO evaluation",
        description="Build and update a retrieval database of token chunks (RETRO), precompute training "
                    "neighbours, and evaluate models with and without retrieval. See docs/retrieval.md.")
    verbs = retrieval.add_subparsers(dest="retrieval_verb", required=True, metavar="ACTION")

    build = verbs.add_parser("build", help="chunk prepared data directories' training splits, embed, index",
                             description="Cut each training source into chunks of --chunk-len tokens, keep each "
                                         "chunk's continuation and document, embed with a frozen encoder and "
                                         "index with FAISS. Writes DIR (default SOURCE/retrieval). The first "
                                         "SOURCE's chunks are the training chunks; further SOURCEs (prepared with "
                                         "data.tokenizer_from: SOURCE) add chunks that are retrieved from but never "
                                         "trained on. Resumable: rerun the same command after a crash or kill.")
    build.add_argument("source", metavar="SOURCE", nargs="+",
                       help="prepared data directories (lmforge data prepare); the first is the training data")
    build.add_argument("--out", default=None, metavar="DIR", help="database directory (default SOURCE/retrieval)")
    build.add_argument("--chunk-len", type=positive_int, default=64, help="tokens per chunk (default 64)")
    build.add_argument("--embedder", default="auto",
                       help="auto (default: minilm below 200k chunks, bag_of_tokens:128 from there), minilm, "
                            "model:CHECKPOINT (mean token embeddings), bag_of_tokens[:DIM], "
                            "bag_of_tokens_idf[:DIM] (tokens weighted by inverse document frequency)")
    build.add_argument("--index", default="auto", choices=INDEX_KINDS,
                       help="FAISS index kind; auto picks flat (exact) below 200k chunks, IVF above")
    build.add_argument("--recall-queries", type=non_negative_int, default=1000, metavar="N",
                       help="sampled chunks on which the index's recall against exact search is measured "
                            "(default 1000; 0: skip)")
    build.add_argument("--sources", type=name_list, default=None,
                       help="comma-separated training sources (default: all)")
    build.add_argument("--max-tokens-per-source", type=positive_int, default=None, metavar="N",
                       help="use only the first N training tokens of each source")
    build.add_argument("--overwrite", action="store_true", help="replace an existing database in DIR")

    add = verbs.add_parser("add", help="add text files (one document each) to a database",
                           description="Tokenize, chunk, embed and index text files; the database's manifest "
                                       "is replaced atomically.")
    add.add_argument("db", metavar="DB", help="database directory")
    add.add_argument("paths", nargs="+", metavar="PATH", help="text files, or folders of .txt/.md files")
    add.add_argument("--source", default="added", help="source name recorded for these documents (default added)")

    remove = verbs.add_parser("remove", help="remove documents by id or by source",
                              description="Remove documents from the index (and mark their chunks removed).")
    remove.add_argument("db", metavar="DB", help="database directory")
    remove.add_argument("--doc", type=non_negative_int, action="append", default=[], metavar="ID",
                        help="document id to remove (repeatable; see `retrieval info --documents`)")
    remove.add_argument("--source", default=None, help="remove every document of this source")

    nb = verbs.add_parser("neighbours", help="precompute top-k neighbours of every training chunk (resumable)",
                          description="For each training chunk, the k nearest chunks from other documents "
                                      "(and not within --exclusion-radius chunks of it). Finished blocks are "
                                      "skipped on rerun.")
    nb.add_argument("db", metavar="DB", help="database directory")
    nb.add_argument("-k", type=positive_int, default=2, help="neighbours per chunk (default 2)")
    nb.add_argument("--out", default=None, metavar="DIR", help="output directory (default DB/neighbours_kK)")
    nb.add_argument("--block-size", type=positive_int, default=4096, help="queries per resumable block (default 4096)")
    nb.add_argument("--exclusion-radius", type=non_negative_int, default=8, metavar="CHUNKS",
                    help="also exclude chunks this close in the same source stream (default 8)")
    nb.add_argument("--workers", type=positive_int, default=1, metavar="N",
                    help="processes searching blocks in parallel (default 1; the result is the same)")

    info = verbs.add_parser("info", help="print what a database holds")
    info.add_argument("db", metavar="DB", help="database directory")
    info.add_argument("--documents", action="store_true", help="list documents (id, source, name, alive)")

    tr = verbs.add_parser("train", help="the same as `lmforge train` (kept for RETRO configs)",
                          description="The same as `lmforge train CONFIG`: RETRO configs (see configs/retro_*.yaml, "
                                      "a model with a `retro:` section and a `retrieval:` section naming the "
                                      "database and neighbours) train like any other.")
    add_train_args(tr)

    ev = verbs.add_parser("eval", help="held-out bits-per-byte with and without retrieval",
                          description="Score a RETRO run or checkpoint on held-out data with retrieval from DB, "
                                      "without retrieval, at growing database fractions, and bucketed by the "
                                      "token overlap between each chunk and its neighbours.")
    ev.add_argument("target", metavar="RUN_OR_CHECKPOINT")
    ev.add_argument("--db", required=True, help="database directory")
    ev.add_argument("-k", type=positive_int, default=None, help="neighbours per chunk (default: the model's)")
    ev.add_argument("--max-tokens", type=positive_int, default=16384,
                    help="held-out tokens per domain (default 16384)")
    ev.add_argument("--fractions", type=fraction_list, default=(0.1, 0.3, 1.0),
                    help="database fractions in (0, 1] to score (default 0.1,0.3,1.0)")
    ev.add_argument("--domains", type=name_list, default=None, metavar="A,B",
                    help="held-out domains to score, comma-separated (default: all)")
    ev.add_argument("--out", default=None, help="JSON file for the results (default RUN/eval/retrieval.json)")
    ev.add_argument("--query-encoder", default=None, metavar="PATH",
                    help="re-rank with a trained query encoder (train-query-encoder): retrieve --candidates with the "
                         "frozen index, keep the encoder's top k")
    ev.add_argument("--candidates", type=positive_int, default=8, metavar="K",
                    help="candidates over-retrieved for --query-encoder to re-rank (default 8)")

    facts = verbs.add_parser("facts", help="knowledge-update benchmark: invented facts before/after add and remove",
                             description="Score QA about invented entities (absent from training) without the "
                                         "facts, after `retrieval add` of them, and after `retrieval remove`.")
    facts.add_argument("target", metavar="RUN_OR_CHECKPOINT")
    facts.add_argument("--db", required=True, help="database directory (facts are added, then removed again)")
    facts.add_argument("--entities", type=positive_int, default=24, help="invented entities (default 24)")
    facts.add_argument("--seed", type=non_negative_int, default=0)
    facts.add_argument("--seeds", type=_seed_list, default=None, metavar="S1,S2,...",
                       help="several seeds (entity sets): accuracy pooled with a bootstrap interval over entities")
    facts.add_argument("--variant", choices=("verbatim", "reading"), default="verbatim",
                       help="verbatim: answers continue the fact text (a copy test); reading: other phrasings, "
                            "reverse relations, descriptions, distractor documents (docs/retrieval.md)")
    facts.add_argument("--out", default=None, help="JSON file for the results (default RUN/eval/facts.json)")

    qe = verbs.add_parser("train-query-encoder",
                          help="train a query encoder by perplexity distillation to re-rank retrieved candidates",
                          description="Over-retrieve K candidates for sampled training chunks, score each alone "
                                      "with the RETRO model (loss on the next chunk), and train a query encoder "
                                      "whose ranking of the candidates matches the model's (KL to softmax(-loss / "
                                      "tau_lm)). The database's embeddings stay as they are. Compares the frozen "
                                      "and re-ranked top-1 on held-out chunks and writes OUT/relevance.json.")
    qe.add_argument("target", metavar="RUN_OR_CHECKPOINT", help="a RETRO run or checkpoint")
    qe.add_argument("--db", required=True, help="database directory")
    qe.add_argument("--out", default=None, metavar="PATH", help="output folder (default RUN/query_encoder)")
    qe.add_argument("--queries", type=positive_int, default=512,
                    help="training queries (20%% for validation; default 512)")
    qe.add_argument("--candidates", type=positive_int, default=8, metavar="K", help="candidates per query (default 8)")
    qe.add_argument("--heldout-queries", type=positive_int, default=256,
                    help="held-out queries to compare rankings on (default 256)")
    qe.add_argument("--steps", type=non_negative_int, default=300, help="AdamW steps (default 300)")
    qe.add_argument("--lr", type=positive_float, default=0.01, help="learning rate (default 0.01)")
    qe.add_argument("--tau-lm", type=positive_float, default=0.1, help="LM target temperature, nats (default 0.1)")
    qe.add_argument("--tau-q", type=positive_float, default=0.05, help="retriever temperature (default 0.05)")
    qe.add_argument("--context-chunks", type=non_negative_int, default=None,
                    help="chunks of context before each query chunk (default: as many as fit, at most 3)")
    qe.add_argument("--exclusion-radius", type=non_negative_int, default=8, metavar="CHUNKS",
                    help="training queries never get candidates this close in their own source (default 8)")
    qe.add_argument("--device", default="auto", help="device for the RETRO model: auto (cuda if available), cpu, cuda")
    qe.add_argument("--seed", type=non_negative_int, default=0)
    _add_train_retriever_parser(verbs)
    return retrieval


def _add_train_retriever_parser(verbs: argparse._SubParsersAction) -> None:
    jr = verbs.add_parser("train-retriever",
                          help="train query and document encoders end to end (distractor facts task)",
                          description="End-to-end retrieval training (docs/retrieval.md): on the distractor facts "
                                      "task, a query encoder and a document encoder learn by perplexity distillation "
                                      "from the frozen RETRO model; the database is re-embedded by the document "
                                      "encoder and the index refreshed every --refresh-every steps, in OUT (the "
                                      "task's databases are built in OUT too). Resumable (--resume auto). Reports "
                                      "held-out recall@1 of the fact document and answer accuracy per retriever; "
                                      "writes OUT/distractor_facts.json.")
    jr.add_argument("target", metavar="RUN_OR_CHECKPOINT", help="a RETRO run or checkpoint")
    jr.add_argument("--out", required=True, metavar="DIR", help="output folder (databases, runs, results)")
    jr.add_argument("--data", default=None, metavar="DIR",
                    help="prepared data directory for the task databases' tokenizer (default: the run's)")
    jr.add_argument("--retrievers", type=name_list, default=["frozen_bag_of_tokens", "joint"],
                    help="comma-separated: frozen_minilm, frozen_bag_of_tokens, query_only, joint "
                         "(default frozen_bag_of_tokens,joint)")
    jr.add_argument("--seeds", type=_seed_list, default=[0], help="comma-separated task seeds (entity sets; default 0)")
    jr.add_argument("--train-entities", type=positive_int, default=200, help="training entities (default 200)")
    jr.add_argument("--eval-entities", type=positive_int, default=60, help="held-out entities (default 60)")
    jr.add_argument("--embedder", default="bag_of_tokens:128",
                    help="embedder of the trainable database (default bag_of_tokens:128; minilm works too)")
    jr.add_argument("--steps", type=non_negative_int, default=150, help="AdamW steps (default 150)")
    jr.add_argument("--refresh-every", type=positive_int, default=25, metavar="N",
                    help="re-embed the database and refresh the index every N steps (default 25)")
    jr.add_argument("--checkpoint-every", type=non_negative_int, default=25, metavar="N",
                    help="checkpoint every N steps (default 25; 0: at the end only)")
    jr.add_argument("--resume", choices=("auto", "never"), default="auto",
                    help="auto: continue from the newest checkpoint in OUT (default); never: refuse if one exists")
    jr.add_argument("--candidates", type=positive_int, default=16, metavar="K",
                    help="candidates retrieved per query from the current index (default 16)")
    jr.add_argument("--batch-size", type=positive_int, default=32, help="queries per step (default 32)")
    jr.add_argument("--lr", type=positive_float, default=0.01, help="learning rate (default 0.01)")
    jr.add_argument("--tau-lm", type=positive_float, default=0.1, help="LM target temperature, nats (default 0.1)")
    jr.add_argument("--tau-q", type=positive_float, default=0.05, help="retriever temperature (default 0.05)")
    jr.add_argument("--random-negatives", type=non_negative_int, default=0, metavar="R",
                    help="random database chunks added to each query's candidates as irrelevant (default 0)")


def run_retrieval(args: argparse.Namespace) -> int:
    verb = args.retrieval_verb
    if verb == "train":
        from lmforge.cli import commands

        return commands.train(args)
    return {
        "build": _build, "add": _add, "remove": _remove, "neighbours": _neighbours, "info": _info,
        "eval": _eval, "facts": _facts, "train-query-encoder": _train_query_encoder,
        "train-retriever": _train_retriever,
    }[verb](args)


# ---- the database ------------------------------------------------------------------------------

def _build(args: argparse.Namespace) -> int:
    from lmforge.retrieval.database import build_database, database_info

    out = args.out or str(Path(args.source[0]) / "retrieval")
    build_database(args.source, out, chunk_len=args.chunk_len, embedder=args.embedder, index_kind=args.index,
                   sources=args.sources, max_tokens_per_source=args.max_tokens_per_source, overwrite=args.overwrite,
                   recall_queries=args.recall_queries)
    print_database_info(database_info(out))
    return 0


def _add(args: argparse.Namespace) -> int:
    from lmforge.retrieval.database import add_documents, read_text_documents

    result = add_documents(args.db, read_text_documents(args.paths), source=args.source)
    print(f"added {result['documents']} documents ({result['chunks']} chunks), ids "
          f"{result['document_ids'][0]}..{result['document_ids'][-1]}; generation {result['generation']}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    from lmforge.retrieval.database import remove_documents

    result = remove_documents(args.db, args.doc or None, args.source)
    print(f"removed {result['documents']} documents ({result['chunks']} chunks); generation {result['generation']}")
    return 0


def _neighbours(args: argparse.Namespace) -> int:
    from lmforge.retrieval.database import ChunkDatabase
    from lmforge.retrieval.neighbours import precompute_neighbours

    out = precompute_neighbours(ChunkDatabase(args.db), k=args.k, out=args.out, block_size=args.block_size,
                                exclusion_radius=args.exclusion_radius, workers=args.workers)
    run = json.loads((out / "manifest.json").read_text())["last_run"]
    print(f"neighbours: {out / 'neighbours.npy'}; searched {run['chunks_searched']} chunks in {run['seconds']:.1f} s "
          f"({run['chunks_per_second']:.0f} chunks/s, {run['workers']} worker{'s' if run['workers'] > 1 else ''}), "
          f"{run['blocks_skipped']} blocks done before")
    return 0


def _info(args: argparse.Namespace) -> int:
    from lmforge.retrieval.database import ChunkDatabase, database_info

    print_database_info(database_info(args.db), ChunkDatabase(args.db).documents if args.documents else None)
    return 0


def print_database_info(info: dict[str, Any], documents: list | None = None) -> None:
    print(f"database {info['path']}: generation {info['generation']}, {info['alive_chunks']}/{info['chunks']} "
          f"chunks of {info['chunk_len']} tokens alive, {info['alive_documents']}/{info['documents']} documents")
    print(f"embedder {json.dumps(info['embedder'])}; index {json.dumps(info['index'])}")
    for name, src in info["sources"].items():
        print(f"  {name:<16}{src['kind']:<8}{src['n_chunks']:>10} chunks{src['tokens']:>12} tokens")
    print(f"on disk: {sum(info['bytes'].values()) / 1e6:.1f} MB")
    build, recall = info.get("build"), info.get("recall")
    if build:
        stages = ", ".join(f"{name} {sec:.1f} s" for name, sec in build["seconds_by_stage"].items())
        print(f"built in {build['seconds']:.1f} s ({stages}){'; resumed' if build['resumed'] else ''}; "
              f"{build['bytes_on_disk_per_chunk']:.0f} bytes on disk and {build['peak_rss_bytes_per_chunk']:.0f} "
              f"bytes of peak memory per chunk; embedding {build['embed_chunks_per_second']:.0f} chunks/s")
    if recall and recall.get("queries"):
        by = recall.get("recall_by_nprobe")
        print(f"index recall@{recall['k']} against exact search: {recall['recall']:.4f} (recall@1 "
              f"{recall['recall_at_1']:.4f}; {recall['queries']} sampled chunks)"
              + (f"; by nprobe {json.dumps(by)}" if by else ""))
    for d in documents or []:
        print(f"  doc {d['id']:>6}  {d['source']:<14}{'alive' if d['alive'] else 'removed':<9}{d['n_chunks']:>6} "
              f"chunks  {d['name']}")


# ---- RETRO models: evaluation, knowledge update, query encoder ----------------------------------

def _eval(args: argparse.Namespace) -> int:
    from lmforge.eval.retrieval_eval import evaluate_retrieval_for_checkpoint

    result = evaluate_retrieval_for_checkpoint(
        args.target, args.db, k=args.k, max_tokens=args.max_tokens, fractions=args.fractions,
        query_encoder=args.query_encoder, candidates=args.candidates, out=args.out, domains=args.domains)
    print_retrieval_result(result)
    print(f"written: {result['output']}")
    return 0


def print_retrieval_result(result: dict[str, Any]) -> None:
    conds = list(result["bpb"])
    if "reranking" in result:
        print(f"neighbours: the query encoder's top {result['k']} of {result['reranking']['candidates']} candidates")
    print(f"{'domain':<14}" + "".join(f"{c:>12}" for c in conds) + "   (bits/byte)")
    for domain in result["bpb"]["none"]:
        print(f"{domain:<14}" + "".join(f"{result['bpb'][c][domain]:>12.4f}" for c in conds))
    if "guard" in result:  # paired per-document comparison of with vs without (lmforge.eval.retrieval_guard)
        print(result["guard"]["message"])
    for name, b in result.get("overlap_buckets", {}).items():
        if b["tokens"]:
            print(f"overlap {name:<10}{b['tokens']:>8} tokens  without {b['bpb_without']:.4f}  "
                  f"with {b['bpb_with']:.4f}")
    overlap = result.get("chunk_overlap", {})
    if overlap.get("chunks"):
        print(f"chunk overlap with the database r(C) (longest common run with the {overlap['neighbours']} nearest "
              "chunks, as RETRO §2.6):")
        for group in ("buckets", "cumulative"):
            for name, b in overlap[group].items():
                if b["chunks"]:
                    print(f"  r {name:<10}{b['chunks']:>7} chunks  without {b['bpb_without']:.4f}  with "
                          f"{b['bpb_with']:.4f}  gain {b['bpb_without'] - b['bpb_with']:+.4f}")


def _seed_list(text: str) -> list[int]:
    """``--seeds 0,1,2``: distinct non-negative integers."""
    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct and >= 0, got {text!r}")
    return seeds


def _facts(args: argparse.Namespace) -> int:
    from lmforge.eval.facts import facts_benchmark_for_checkpoint

    result = facts_benchmark_for_checkpoint(args.target, args.db, entities=args.entities, seed=args.seed,
                                            out=args.out, variant=args.variant, seeds=args.seeds)
    print_facts_result(result)
    print(f"written: {result['output']}")
    return 0


def print_facts_result(result: dict[str, Any]) -> None:
    print(f"{'condition':<16}{'accuracy':>10}{'margin (nats)':>16}   "
          f"({result['after_add']['questions']} questions, chance {result['chance']})")
    for cond in ("no_retrieval", "before_add", "after_add", "after_remove"):
        r = result[cond]
        print(f"{cond:<16}{r['accuracy']:>10.3f}{r['mean_margin_nats']:>16.3f}")
    if result["after_add"].get("fact_retrieved") is not None:
        print(f"question chunk retrieves its fact: {result['after_add']['fact_retrieved']:.3f}")
    summary = result.get("summary", {})
    if summary:
        print(f"{result.get('variant', 'verbatim')} variant, seeds {result.get('seeds')}: accuracy [95% interval "
              f"over entities]")
        for cond, entry in summary.items():
            if isinstance(entry, dict):
                print(f"  {cond:<28}{entry['accuracy']:>7.3f}  [{entry['interval'][0]:.3f}, "
                      f"{entry['interval'][1]:.3f}]  ({entry['questions']} questions)")
        print(f"  after remove = before add on every question: {summary['remove_restores_before']}")


def _train_query_encoder(args: argparse.Namespace) -> int:
    from lmforge.core.device import resolve_device
    from lmforge.train.query_encoder_trainer import QueryEncoderSettings, train_query_encoder_for_checkpoint

    settings = QueryEncoderSettings(
        queries=args.queries, candidates=args.candidates, heldout_queries=args.heldout_queries, steps=args.steps,
        lr=args.lr, tau_lm=args.tau_lm, tau_q=args.tau_q, context_chunks=args.context_chunks,
        exclusion_radius=args.exclusion_radius, seed=args.seed)
    result = train_query_encoder_for_checkpoint(args.target, args.db, settings, out=args.out,
                                                device=resolve_device(args.device))
    print_relevance(result)
    encoder = Path(result["encoder"])
    print(f"written: {encoder / 'query_encoder.safetensors'}, {encoder / 'relevance.json'}")
    return 0


def _train_retriever(args: argparse.Namespace) -> int:
    from lmforge.core.logging import get_logger
    from lmforge.core.run_marker import resolve_data_dir
    from lmforge.data.tokenizer import Tokenizer
    from lmforge.core.errors import ConfigError
    from lmforge.eval.distractor_facts import RETRIEVERS, run_distractor_experiment
    from lmforge.nn.loading import load_model
    from lmforge.retrieval.joint import JointConfig

    unknown = sorted(set(args.retrievers) - set(RETRIEVERS))
    if unknown:
        raise ConfigError(f"--retrievers: unknown {', '.join(unknown)} (known: {', '.join(RETRIEVERS)})")
    cfg = JointConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, candidates=args.candidates,
                      tau_lm=args.tau_lm, tau_q=args.tau_q, refresh_every=args.refresh_every,
                      checkpoint_every=args.checkpoint_every, random_negatives=args.random_negatives)
    model, config, checkpoint = load_model(args.target)
    tokenizer = Tokenizer.load(checkpoint / "tokenizer.json")
    data_dir = Path(args.data) if args.data else resolve_data_dir(checkpoint, config["data"]["out_dir"])
    result = run_distractor_experiment(model, tokenizer, data_dir, args.out, args.seeds, cfg,
                                       train_entities=args.train_entities, eval_entities=args.eval_entities,
                                       embedder=args.embedder, retrievers=tuple(args.retrievers),
                                       log=get_logger("lmforge.retrieval.joint").info, resume=args.resume)
    print(f"held-out: {args.eval_entities} entities x 3 questions per seed, seeds {result['seeds']}; "
          "95% entity-bootstrap intervals")
    print(f"{'retriever':<22}{'recall@1':>10}{'interval':>16}{'accuracy':>10}{'interval':>16}")
    for name, entry in result["summary"].items():
        r, a = entry["recall_at_1"], entry["accuracy"]
        print(f"{name:<22}{r['mean']:>10.3f}  [{r['interval'][0]:.3f}, {r['interval'][1]:.3f}]"
              f"{a['mean']:>10.3f}  [{a['interval'][0]:.3f}, {a['interval'][1]:.3f}]")
    for seed_result in result["per_seed"]:
        for name in ("query_only", "joint"):
            if name in seed_result:
                costs = seed_result[name]["training"]["refreshes"]
                print(f"seed {seed_result['seed']} {name}: {len(costs)} index refreshes, "
                      f"{costs[-1]['chunks']} chunks each, {sum(c['seconds'] for c in costs):.2f} s in all")
    print(f"written: {Path(args.out) / 'distractor_facts.json'}")
    return 0


def print_relevance(result: dict[str, Any]) -> None:
    d = result["distillation"]
    print(f"distillation: {d['train_queries']} train / {d['val_queries']} validation queries, {d['steps']} steps; "
          f"validation KL {d['val_kl_before']:.4f} -> {d['val_kl_after']:.4f} (kept step {d['best_step']})")
    print(f"held-out: {result['queries']} queries, K={result['settings']['candidates']} candidates; "
          "loss in nats/token on the next chunk")
    print(f"{'domain':<14}{'queries':>8}{'frozen':>10}{'trained':>10}{'R@1 frz':>9}{'R@1 trn':>9}"
          f"{'oracle':>9}{'no retr':>9}")
    for name, r in [("all", result), *result.get("domains", {}).items()]:
        print(f"{name:<14}{r['queries']:>8}{r['before']['top1_loss']:>10.4f}{r['after']['top1_loss']:>10.4f}"
              f"{r['before']['recall_at_1']:>9.3f}{r['after']['recall_at_1']:>9.3f}"
              f"{r['oracle_loss']:>9.4f}{r['no_retrieval_loss']:>9.4f}")
