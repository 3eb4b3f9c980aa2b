"""The config of ``lmforge synth``: which teacher writes, from what prompts, how it samples,
and where the documents go.

A teacher is an lmforge run or checkpoint (``kind: lmforge``) or a Hugging Face causal LM
(``kind: hf``: a hub name, with an optional ``revision``, or a local folder, e.g. one written by
``lmforge export``). Modes:

- ``continuation``: the first ``prompts.prompt_tokens`` tokens of each prompt document (from a
  prepared data directory's train split) are continued;
- ``rephrase``: each prompt document, cut to ``prompts.rephrase_chars`` characters, is put into
  ``prompts.template`` (its ``{document}`` placeholder) and the teacher's answer is the document
  (for instruction-tuned teachers, WRAP-style);
- ``unconditional``: ``documents`` documents sampled from the end-of-text token, no prompt
  (what a model-collapse experiment samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmforge.core.config import Config, FieldValueError

DEFAULT_TEMPLATE = ("Rewrite the following text in clear, high-quality English, keeping every fact.\n\n"
                    "Text:\n{document}\n\nRewritten text:\n")


@dataclass
class TeacherConfig(Config):
    kind: Literal["lmforge", "hf"] = "lmforge"
    path: str = ""                       # lmforge: run or checkpoint directory; hf: hub name or folder
    revision: str | None = None          # hf: a branch, tag or commit of a hub model (recorded)
    weights: Literal["raw", "ema", "window"] = "raw"   # lmforge: which weights of the checkpoint
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # hf: auto = fp32 on CPU, bf16 on CUDA

    def __post_init__(self) -> None:
        if not self.path.strip():
            raise FieldValueError("path", "name the teacher: a run or checkpoint directory (kind lmforge), "
                                          "or a Hugging Face model name or folder (kind hf)")
        if self.revision is not None and self.kind != "hf":
            raise FieldValueError("revision", f"is for hub models (kind hf); teacher kind is {self.kind!r}")


@dataclass
class PromptConfig(Config):
    data_dir: str | None = None          # a prepared data directory: prompts from its train split
    sources: list[str] | None = None     # which of its sources (None: all)
    max_documents: int | None = None     # at most this many prompt documents (in shard order)
    prompt_tokens: int = 32              # continuation: the first N teacher tokens of each document
    rephrase_chars: int = 2000           # rephrase: the document cut to this many characters
    template: str = DEFAULT_TEMPLATE     # rephrase: the prompt, with {document}

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1:
            raise FieldValueError("prompt_tokens", f"must be >= 1, got {self.prompt_tokens}")
        if self.rephrase_chars < 1:
            raise FieldValueError("rephrase_chars", f"must be >= 1, got {self.rephrase_chars}")
        if self.max_documents is not None and self.max_documents < 1:
            raise FieldValueError("max_documents", f"must be >= 1 or null, got {self.max_documents}")
        if "{document}" not in self.template:
            raise FieldValueError("template", "must contain the placeholder {document}")


@dataclass
class SamplingConfig(Config):
    temperature: float = 1.0             # 0 is greedy
    top_p: float = 1.0                   # nucleus sampling; 1 keeps every token
    top_k: int = 0                       # 0 keeps every token
    max_new_tokens: int = 256            # per document
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise FieldValueError("temperature", f"must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise FieldValueError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise FieldValueError("top_k", f"must be >= 0 (0 keeps every token), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise FieldValueError("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")


@dataclass
class SynthConfig(Config):
    out_dir: str = ""
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(path="runs/quickstart"))
    mode: Literal["continuation", "rephrase", "unconditional"] = "continuation"
    prompts: PromptConfig = field(default_factory=PromptConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    documents: int | None = None         # unconditional: how many documents
    samples_per_prompt: int = 1          # generations per prompt document (generation index 0..n-1)
    include_prompt: bool = False         # continuation: the document is prompt + continuation
    min_new_tokens: int = 1              # a generation shorter than this is dropped (counted)
    batch_size: int = 16                 # prompts generated together (one KV cache)
    docs_per_shard: int = 64             # work items per output shard (the unit that resumes)

    def __post_init__(self) -> None:
        if not self.out_dir.strip():
            raise FieldValueError("out_dir", "must name the folder the synthetic documents go to")
        if self.mode == "unconditional":
            if self.documents is None or self.documents < 1:
                raise FieldValueError("documents", "mode unconditional needs documents >= 1 (how many to sample)")
        else:
            if self.prompts.data_dir is None:
                raise FieldValueError("prompts.data_dir", f"mode {self.mode} needs prompt documents: a prepared "
                                                          "data directory (its train split)")
            if self.documents is not None:
                raise FieldValueError("documents", f"is for mode unconditional; mode {self.mode} makes "
                                                   "samples_per_prompt documents per prompt document")
        if self.include_prompt and self.mode != "continuation":
            raise FieldValueError("include_prompt", f"is for mode continuation, not {self.mode}")
        for key in ("samples_per_prompt", "min_new_tokens", "batch_size", "docs_per_shard"):
            if getattr(self, key) < 1:
                raise FieldValueError(key, f"must be >= 1, got {getattr(self, key)}")

    def fingerprint_dict(self) -> dict:
        """What decides the documents written: not where they go, nor the device."""
        data = self.to_dict()
        data.pop("out_dir")
        data["teacher"].pop("device")
        return data
