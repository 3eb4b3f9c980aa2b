"""Configs for data preparation: which sources to read, how to filter, dedup, decontaminate,
split and tokenize them, and where the work runs."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from lmforge.core.config import Config, FieldValueError
from lmforge.data.image_config import IMAGE_SOURCE_KINDS, ImageSourceConfig, ImageTokenizerConfig

# Source names become directory names under shards/, so keep them path-safe.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
N_SPECIAL_TOKENS = 1  # "<|endoftext|>"
# The preparation's steps, in order, as names in lmforge.data.stages.STEPS (what each does: stages.py).
DEFAULT_STEPS = ("read", "quality", "minhash", "dedup", "eval_index", "decontaminate", "tokenizer", "shards")
# A files source whose glob picks these is code: the prose quality rules are not for it.
CODE_SUFFIXES = (".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js", ".ts",
                 ".jsx", ".tsx", ".rb", ".sh", ".scala", ".kt", ".swift", ".cs", ".php", ".lua", ".jl", ".sql")


def _fraction(owner: str, key: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}{key} must be in [0, 1], got {value}")


@dataclass
class QualityConfig(Config):
    """Gopher-style document rules (Rae et al. 2021, "Scaling Language Models", appendix A).

    Each rule removes a document that falls outside its bound; set a bound to null to
    switch that rule off. Words are whitespace-separated tokens. The rules describe
    natural-language prose: sources of code skip them (see ``SourceConfig.content``).

    One rule is about whether a document is text at all, and holds for every source, code
    included, whatever ``enabled`` says: ``max_non_text_char_fraction`` drops a document
    whose U+FFFD replacement characters (undecodable bytes) plus control characters other
    than tab, newline, carriage return and form feed exceed that share of its characters.
    Random bytes read as text are about 56% such characters; the demo corpus
    (Shakespeare, Milton, the Python standard library) is 0.0002% at most, one in 454,482.
    """

    enabled: bool = True                               # the prose rules below (not the non-text rule)
    max_non_text_char_fraction: float | None = 0.05    # binary read as text; applies to code too
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1         # ('#' + ellipses) per word
    max_ellipsis_line_fraction: float | None = 0.3    # lines ending in "..." or "…"
    max_bullet_line_fraction: float | None = 0.9      # lines starting with a bullet
    min_alpha_word_fraction: float | None = 0.8       # words with at least one letter
    # Gopher also bounds the share of repeated lines at 0.3; off here because drama and
    # dialogue repeat speaker names (the demo's Merry Wives of Windsor: 30.3% of its lines).
    # The share of characters in repeated lines (below) still catches boilerplate.
    max_duplicate_line_fraction: float | None = None  # lines that repeat an earlier line
    max_duplicate_line_char_fraction: float | None = 0.2
    # Most frequent word n-gram: the characters it covers over all word characters.
    # (Keys are n; "2" is read as 2, so the config survives a round trip through JSON.)
    max_top_ngram_char_fraction: dict[int | str, float] = field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    # Word n-grams occurring more than once: the characters they cover over all.
    max_duplicate_ngram_char_fraction: dict[int | str, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})

    def __post_init__(self) -> None:
        for key in ("min_words", "max_words"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        for key in ("max_non_text_char_fraction", "max_ellipsis_line_fraction", "max_bullet_line_fraction",
                    "min_alpha_word_fraction", "max_duplicate_line_fraction", "max_duplicate_line_char_fraction"):
            _fraction("", key, getattr(self, key))
        for key in ("max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction"):
            table = getattr(self, key)
            if not all(isinstance(n, int) or (isinstance(n, str) and n.isdigit()) for n in table):
                raise ValueError(f"{key}: keys must be n-gram sizes (integers), got {sorted(map(str, table))}")
            table = {int(n): value for n, value in table.items()}
            setattr(self, key, table)
            for n, value in table.items():
                if n < 1:
                    raise ValueError(f"{key}: n-gram sizes must be >= 1, got {n}")
                _fraction(f"{key}.", str(n), value)


@dataclass
class NearDedupConfig(Config):
    """MinHash-LSH near-duplicate removal over word shingles (Broder 1997; Leskovec et al. ch. 3).

    Each document gets ``num_bands * rows_per_band`` MinHash values; two documents are
    compared when all rows of at least one band agree, and are near-duplicates when their
    estimated Jaccard similarity is at least ``threshold``. The chance that a pair of
    similarity s is compared at all is 1 - (1 - s**rows)**bands, so the bands and rows must
    make that near 1 at the threshold (prepare warns when they do not).
    """

    enabled: bool = True
    shingle_size: int = 5          # words per shingle
    num_bands: int = 32            # 32 bands of 4 rows: a pair at 0.7 is compared with probability 0.9998
    rows_per_band: int = 4
    threshold: float = 0.7         # estimated Jaccard similarity at or above which documents are near-duplicates
    seed: int = 0                  # picks the hash functions

    def __post_init__(self) -> None:
        for key in ("shingle_size", "num_bands", "rows_per_band"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")

    @property
    def num_hashes(self) -> int:
        return self.num_bands * self.rows_per_band

    def candidate_probability(self, similarity: float) -> float:
        """Chance that LSH puts a pair of this Jaccard similarity in a shared bucket."""
        return 1.0 - (1.0 - similarity ** self.rows_per_band) ** self.num_bands


@dataclass
class EvalSetConfig(Config):
    """An evaluation set on disk that training data must not contain (read like a source)."""

    name: str
    kind: str                      # a source kind that reads a path: files, jsonl, parquet, hf
    path: str
    text_field: str = "text"
    split: str = "test"            # hf split
    role: Literal["task", "heldout"] = "task"
    max_items: int | None = None

    def __post_init__(self) -> None:
        from lmforge.data.sources import SOURCE_KINDS  # the readers register there; it imports this module

        SOURCE_KINDS.check(self.kind, "kind")
        if not SOURCE_KINDS.get(self.kind).needs_path:
            with_path = [name for name in SOURCE_KINDS.names() if SOURCE_KINDS.get(name).needs_path]
            raise FieldValueError("kind", f"an eval set is read from its path, and source kind {self.kind!r} "
                                          f"reads none (kinds with a path: {', '.join(with_path)})")


@dataclass
class DecontaminationConfig(Config):
    """N-gram decontamination of the training split against every registered eval set.

    A training document that shares any ``ngram_size``-gram of normalized words with an
    eval item is removed (GPT-3's 13-gram rule, Brown et al. 2020, appendix C). Items with
    fewer words are matched whole when they have at least ``min_item_words`` words.
    """

    enabled: bool = True
    ngram_size: int = 13
    min_item_words: int = 8
    heldout_split: bool = True     # also decontaminate against this preparation's own held-out split
    eval_sets: list[EvalSetConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.ngram_size < 1 or self.min_item_words < 1:
            raise ValueError("ngram_size and min_item_words must be >= 1")
        names = [s.name for s in self.eval_sets]
        if len(set(names)) != len(names):
            raise ValueError(f"eval_sets: names must be unique, got {names}")


@dataclass
class SlurmConfig(Config):
    """Where stage tasks go when ``executor: slurm`` (passed to datatrove's SlurmPipelineExecutor)."""

    partition: str = ""
    time: str = "04:00:00"
    tasks: int = 16                # array tasks per parallel stage
    cpus_per_task: int = 2
    mem_per_cpu_gb: int = 4
    venv_path: str | None = None   # activated in each job, e.g. the path of .venv/bin/activate
    sbatch_args: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tasks < 1 or self.cpus_per_task < 1 or self.mem_per_cpu_gb < 1:
            raise ValueError("tasks, cpus_per_task and mem_per_cpu_gb must be >= 1")


@dataclass
class KvRecallConfig(Config):
    """Settings of a ``kind: kv_recall`` source: synthetic key-value recall documents
    (lmforge/data/kv_recall.py; docs/long_context.md)."""

    documents: int = 2000
    # [min, max] characters per document, drawn uniformly (tokens = characters / the tokenizer's
    # characters per token; the manifest has both per source).
    length_chars: list[int] = field(default_factory=lambda: [200, 800])
    pairs: int = 4                 # each document states 1 to `pairs` key-value pairs
    # Questions at the end of each document, each on a different stated pair (at most all of them):
    # more than one gives more recall targets per document, so a small model learns faster.
    queries: int = 1
    value_digits: int = 3          # values are numbers of this many digits
    seed: int = 0

    def __post_init__(self) -> None:
        if self.documents < 1:
            raise FieldValueError("documents", f"must be >= 1, got {self.documents}")
        if len(self.length_chars) != 2 or not 1 <= self.length_chars[0] <= self.length_chars[1]:
            raise FieldValueError("length_chars", f"must be [min, max] with 1 <= min <= max, got {self.length_chars}")
        for key in ("pairs", "queries"):
            if getattr(self, key) < 1:
                raise FieldValueError(key, f"must be >= 1, got {getattr(self, key)}")
        if not 2 <= self.value_digits <= 9:  # one digit leaves too few held-out values for candidates
            raise FieldValueError("value_digits", f"must be in 2..9, got {self.value_digits}")


@dataclass
class SourceConfig(Config):
    name: str                      # domain name, e.g. "literature", "code"
    kind: str                      # a name in sources.SOURCE_KINDS (demo_literature, files, jsonl, hf, ...)
    path: str | None = None        # folder/file for files/jsonl/parquet; dataset name or local path for hf
    text_field: str = "text"       # for jsonl/parquet/hf
    glob: str | None = None        # files: default "**/*.txt" and "**/*.md"
    split: str = "train"           # hf split
    max_documents: int | None = None
    max_bytes: int | None = None   # stop reading a source after this many bytes (keeps the demo fast)
    weight: float = 1.0            # mixture weight in the loader
    # "code" skips the prose quality rules; "auto": demo_code, installed_packages and files globbing code
    # suffixes are code, other sources are judged document by document.
    content: Literal["auto", "prose", "code"] = "auto"
    quality: dict[str, Any] | None = None          # overrides of DataConfig.quality for this source
    near_dedup_threshold: float | None = None      # overrides DataConfig.near_dedup.threshold
    # Overrides DataConfig.heldout_fraction: a domain of a few long documents needs a larger
    # fraction than one of many short ones for its held-out bpb to rest on several documents.
    heldout_fraction: float | None = None
    kv_recall: KvRecallConfig | None = None         # kind kv_recall: its settings (defaults when not given)
    image: ImageSourceConfig | None = None          # image kinds: decoding and resizing (data/images.py)

    def __post_init__(self) -> None:
        from lmforge.data.sources import SOURCE_KINDS  # the readers register there; it imports this module

        SOURCE_KINDS.check(self.kind, "kind")
        if self.kind == "kv_recall" and self.kv_recall is None:
            self.kv_recall = KvRecallConfig()
        if self.kind != "kv_recall" and self.kv_recall is not None:
            raise FieldValueError("kv_recall", f"settings of a kv_recall source, but source {self.name!r} "
                                               f"is of kind {self.kind!r}")
        if self.image is not None and self.kind not in IMAGE_SOURCE_KINDS:
            raise FieldValueError("image", f"settings of an image source ({', '.join(IMAGE_SOURCE_KINDS)}), but "
                                           f"source {self.name!r} is of kind {self.kind!r}")
        if not _NAME_RE.match(self.name):
            raise ValueError(f"source name {self.name!r} must be letters, digits, '_', '.', '-' "
                             "(it becomes a directory name)")
        if SOURCE_KINDS.get(self.kind).needs_path and not self.path:
            raise ValueError(f"source {self.name!r} of kind {self.kind!r} needs a path")
        for key in ("max_documents", "max_bytes"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"source {self.name!r}: {key} must be positive, got {value}")
        if self.weight < 0:
            raise ValueError(f"source {self.name!r}: weight must be >= 0, got {self.weight}")
        if self.near_dedup_threshold is not None and not 0.0 < self.near_dedup_threshold <= 1.0:
            raise ValueError(f"source {self.name!r}: near_dedup_threshold must be in (0, 1], "
                             f"got {self.near_dedup_threshold}")
        if self.heldout_fraction is not None and not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"source {self.name!r}: heldout_fraction must be in (0, 1), got {self.heldout_fraction}")

    def resolved_content(self) -> Literal["prose", "code", "auto"]:
        """"code", "prose", or "auto" (decide per document) for this source."""
        if self.content != "auto":
            return self.content
        if self.kind in ("demo_code", "installed_packages") or (
                self.kind == "files" and self.glob and self.glob.endswith(CODE_SUFFIXES)):
            return "code"
        return "prose" if self.kind == "demo_literature" else "auto"


# Source kinds that only eval sets may use (decontamination.eval_sets), never training sources.
EVAL_ONLY_KINDS = ("prepared_heldout",)


@dataclass
class DataConfig(Config):
    sources: list[SourceConfig]
    out_dir: str = "data/demo"     # where prepared data goes (relative to cwd)
    vocab_size: int = 4096         # of the tokenizer trained here; ignored with tokenizer_from
    # Tokenize with an existing tokenizer instead of training one: a tokenizer.json, or a
    # prepared data directory (its tokenizer.json), e.g. the parent's data of a continued run,
    # so that the new data has the parent's vocabulary and token ids. Relative to cwd.
    tokenizer_from: str | None = None
    heldout_fraction: float = 0.05
    num_workers: int = 2           # parallel shard-writing processes
    shard_tokens: int = 4_000_000  # max tokens per shard file
    min_doc_chars: int = 1
    seed: int = 0                  # recorded; preparation itself is deterministic (split by hash)
    quality: QualityConfig = field(default_factory=QualityConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    decontamination: DecontaminationConfig = field(default_factory=DecontaminationConfig)
    # Sampling: p_i proportional to weight_i * tokens_i ** (1 / T). null keeps the weights
    # as the probabilities; 1 is the natural mix; large T approaches uniform over sources.
    mixture_temperature: float | None = None
    # Data-limited runs: train only on the first ~unique_tokens tokens of the training split
    # (split over sources by mixture probability), visited in epochs (data/loader.py); null: all of it.
    unique_tokens: int | None = None
    executor: Literal["local", "slurm"] = "local"
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    chunk_bytes: int = 1_000_000   # documents are processed in work units of about this many bytes
    # The pipeline, step by step; a filter of your own is a module in lmforge/data/filters/
    # plus its name here (before "tokenizer": the tokenizer and shards see the final documents).
    steps: list[str] = field(default_factory=lambda: list(DEFAULT_STEPS))
    # The image tokenizer's codebook, for a preparation with the image_tokenizer step (data/image_steps.py).
    image_tokenizer: ImageTokenizerConfig | None = None

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("sources: at least one source is needed")
        for source in self.sources:
            if source.kind in EVAL_ONLY_KINDS:
                raise FieldValueError("sources", f"source {source.name!r} is of kind {source.kind!r}, which is for "
                                      "decontamination.eval_sets only: training on another directory's held-out "
                                      "documents would contaminate its evaluation")
        names = [s.name for s in self.sources]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"sources: names must be unique, repeated: {', '.join(duplicated)}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        # Byte-level BPE starts from all 256 byte tokens plus the special tokens.
        minimum = 256 + N_SPECIAL_TOKENS
        if not minimum <= self.vocab_size < 2**32:
            raise ValueError(f"vocab_size must be at least {minimum} (256 bytes + "
                             f"{N_SPECIAL_TOKENS} special) and below 2**32, got {self.vocab_size}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {self.shard_tokens}")
        if self.min_doc_chars < 1:
            raise ValueError(f"min_doc_chars must be >= 1, got {self.min_doc_chars}")
        if self.mixture_temperature is not None and self.mixture_temperature <= 0:
            raise ValueError(f"mixture_temperature must be > 0, got {self.mixture_temperature}")
        if self.unique_tokens is not None and self.unique_tokens < 1:
            raise FieldValueError("unique_tokens", f"must be a positive token count or null, got {self.unique_tokens}")
        if self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {self.chunk_bytes}")
        if self.tokenizer_from is not None and not self.tokenizer_from.strip():
            raise FieldValueError("tokenizer_from", "must be the path of a tokenizer.json or of a prepared "
                                                    "data directory, or null to train a tokenizer; got an empty string")
        for source in self.sources:
            self.quality_for(source)  # per-source overrides fail here, naming the key
        from lmforge.data.stages import check_steps  # the step registry sits above this module

        check_steps(self.steps, self)
        if "image_tokenizer" in self.steps and self.image_tokenizer is None:
            self.image_tokenizer = ImageTokenizerConfig()

    def quality_for(self, source: SourceConfig) -> QualityConfig:
        """The quality rules for one source: the global ones, off for code, then its overrides."""
        merged = dataclasses.asdict(self.quality)
        # Synthetic recall documents are judged by their generator, not by prose rules (their
        # shortest documents have fewer than min_words words).
        if source.resolved_content() == "code" or source.kind == "kv_recall":
            merged["enabled"] = False
        merged.update(source.quality or {})
        index = self.sources.index(source) if source in self.sources else 0
        return QualityConfig.from_dict(merged, path=f"sources[{index}].quality")

    def near_dedup_threshold_for(self, source: SourceConfig) -> float:
        return source.near_dedup_threshold if source.near_dedup_threshold is not None else self.near_dedup.threshold

    def heldout_fraction_for(self, source: str) -> float:
        """The held-out fraction of the source named ``source``: its own, else the global one."""
        own = next((s.heldout_fraction for s in self.sources if s.name == source), None)
        return own if own is not None else self.heldout_fraction

    def fingerprint_dict(self) -> dict:
        """The part of the config that decides the prepared bytes.

        Worker count, executor, work-unit size, output location and mixture weights change
        how or where data is prepared or how it is sampled later, not what is written, so
        they are left out: changing them must not force (or block) a re-prepare.
        """
        data = self.to_dict()
        for key in ("out_dir", "num_workers", "executor", "slurm", "chunk_bytes", "mixture_temperature",
                    "unique_tokens"):
            data.pop(key)
        for source in data["sources"]:
            source.pop("weight")
            if source.get("heldout_fraction") is None:  # unset: data prepared before the option stays valid
                source.pop("heldout_fraction", None)
            if source.get("kv_recall") is None:  # likewise for sources of other kinds
                source.pop("kv_recall", None)
            if source.get("image") is None:  # likewise for sources that are not images
                source.pop("image", None)
        if data.get("image_tokenizer") is None:  # likewise for preparations without images
            data.pop("image_tokenizer", None)
        if data["tokenizer_from"] is None:  # likewise for data whose tokenizer was trained here
            data.pop("tokenizer_from")
        else:  # the tokenizer comes from there, so the vocabulary size asked for decides nothing
            data.pop("vocab_size")
        if data["steps"] == list(DEFAULT_STEPS):  # likewise for the default steps
            data.pop("steps")
        return data
