"""lmforge.data: sources -> pipeline steps -> tokenizer -> shards + manifest -> mixture loader.

Modules: config (DataConfig, SourceConfig), documents (Document, content_hash),
demo_corpus, sources (iter_documents), pipeline (normalize, exact_dedup, split_by_hash),
tokenizer (Tokenizer), shards (ShardSet, load_manifest, verify_shards, check_isolation),
prepare (prepare_data), loader (MixtureLoader, heldout_windows). Nothing is imported
here, so worker processes that only write shards stay light.
"""
