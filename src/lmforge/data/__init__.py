"""lmforge.data: sources -> configured steps -> tokenizer -> shards + manifest -> mixture loader.

Modules: config (DataConfig, SourceConfig, DEFAULT_STEPS and the step settings), documents
(Document, content_hash), demo_corpus, sources (iter_documents, InputProblems), steps (the
one document-step shape: PipelineStep, FilterStep, StepStats), pipeline (Normalize,
ExactDedup, split_by_hash), quality (Gopher-style QualityFilter, the non-text rule, and
the "quality" step), near_dedup (MinHash-LSH), eval_registry (eval sets to decontaminate
against), decontaminate (n-gram index and report), stages (the step registry STEPS,
Context, Stage, ChunkFilter: work units with completion markers), document_steps (read,
minhash, dedup, eval_index, decontaminate), output_steps (tokenizer, shards), filters
(your own document filters, one module each), executors (local pool, Slurm via datatrove),
tokenizer (Tokenizer), shards (ShardSet, load_manifest, verify_shards, check_isolation),
manifest (write_manifest), prepare (prepare_data), mixture (temperature sampling, planned
epochs), loader (MixtureLoader, heldout_windows), heldout_check. Nothing is imported here,
so worker processes that only run one step stay light. docs/data.md describes the
pipeline and its figures.
"""
