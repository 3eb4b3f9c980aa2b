"""lmforge.data: sources -> pipeline steps -> tokenizer -> shards + manifest -> mixture loader.

Modules: config (DataConfig, SourceConfig and the step settings), documents (Document,
content_hash), demo_corpus, sources (iter_documents, InputProblems), steps (the one
step shape: PipelineStep, FilterStep, StepStats), pipeline (Normalize, ExactDedup,
split_by_hash), quality (Gopher-style QualityFilter), near_dedup (MinHash-LSH),
eval_registry (eval sets to decontaminate against), decontaminate (n-gram index and
report), stages (work units with completion markers), executors (local pool, Slurm via
datatrove), tokenizer (Tokenizer), shards (ShardSet, load_manifest, verify_shards,
check_isolation), prepare (prepare_data), mixture (temperature sampling, planned epochs),
loader (MixtureLoader, heldout_windows). Nothing is imported here, so worker processes
that only run one stage stay light. docs/data.md describes the pipeline and its figures.
"""
