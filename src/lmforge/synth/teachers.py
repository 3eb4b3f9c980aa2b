"""Teachers: the models that write synthetic documents, behind one small interface.

- :class:`LmforgeTeacher`: an lmforge run or checkpoint, loaded through ``serve.loading`` (any
  model family that generates text), sampled with ``nn.generation.generate`` (a KV cache, one
  prefill per batch). Identified by the sha256 of its weights file, from the checkpoint manifest.
- :class:`HuggingFaceTeacher`: a transformers causal LM by hub name (with a revision) or folder,
  sampled with ``model.generate`` on left-padded batches. Identified by name and the resolved
  commit (hub) or the sha256 of its weight files (folder).

Both take lists of token-id prompts and return, per prompt, the generated ids (up to the first
end-of-text, which is not included) and whether generation stopped at end-of-text or at the
length limit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.core.device import resolve_device
from lmforge.core.errors import CheckpointError, ConfigError
from lmforge.core.logging import get_logger
from lmforge.synth.config import SamplingConfig, TeacherConfig

log = get_logger(__name__)


@dataclass
class Generation:
    ids: list[int]
    finish: str               # "eos" | "length"


def _cut_at_eos(ids: list[int], eos_id: int | None) -> Generation:
    if eos_id is not None and eos_id in ids:
        return Generation(ids[:ids.index(eos_id)], "eos")
    return Generation(ids, "length")


class Teacher:
    identity: dict[str, Any]
    eos_id: int | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def rephrase_prompt(self, text: str) -> list[int]:
        """The ids of a rephrasing prompt (a chat template where the teacher has one)."""
        return self.encode(text)

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, seed: int) -> list[Generation]:
        raise NotImplementedError


class LmforgeTeacher(Teacher):
    def __init__(self, cfg: TeacherConfig):
        from lmforge.serve.loading import load_for_inference

        self.device = resolve_device(cfg.device)
        self.model, self.tokenizer, _, checkpoint = load_for_inference(cfg.path, self.device, cfg.weights)
        if not hasattr(self.model, "cfg") or not hasattr(self.model.cfg, "max_seq_len"):
            raise ConfigError(f"teacher.path {cfg.path!r}: its model family cannot generate text")
        from lmforge.core.io import read_json
        from lmforge.nn.loading import weights_file

        manifest = read_json(checkpoint / "manifest.json")
        file_name = weights_file(cfg.weights)
        self.eos_id = self.tokenizer.eos_id
        self.identity = {"kind": "lmforge", "path": str(cfg.path), "checkpoint": str(checkpoint),
                         "step": manifest.get("step"), "weights": cfg.weights,
                         "sha256": manifest["files"][file_name]["sha256"],
                         "tokenizer_sha256": self.tokenizer.sha256}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, seed: int) -> list[Generation]:
        from lmforge.nn.generation import generate

        generator = torch.Generator(device=self.device).manual_seed(seed)
        results: list[Generation | None] = [None] * len(prompts)
        # One KV cache holds prompts of one length: group them (continuation prompts all share one).
        by_length: dict[int, list[int]] = {}
        for row, ids in enumerate(prompts):
            by_length.setdefault(len(ids), []).append(row)
        for length, rows in sorted(by_length.items()):
            batch = torch.tensor([prompts[r] for r in rows], dtype=torch.long, device=self.device).reshape(len(rows), length)
            out = generate(self.model, batch, sampling.max_new_tokens, temperature=sampling.temperature,
                           top_k=sampling.top_k or None, eos_id=self.eos_id, generator=generator,
                           top_p=sampling.top_p)
            for i, row in enumerate(rows):
                results[row] = _cut_at_eos(out[i, length:].tolist(), self.eos_id)
        return [r for r in results if r is not None]


def _folder_sha256(folder: Path) -> str:
    """A hash over the weight files of a model folder (names and contents)."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise CheckpointError(f"teacher.path {str(folder)!r}: no weight files (*.safetensors, *.bin)")
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class HuggingFaceTeacher(Teacher):
    def __init__(self, cfg: TeacherConfig):
        try:
            import transformers
        except ImportError as exc:
            raise ConfigError("teacher.kind hf needs transformers (pip install transformers)") from exc
        self.device = resolve_device(cfg.device)
        folder = Path(cfg.path).expanduser()
        local = folder.is_dir()
        if cfg.path.startswith((".", "/", "~")) and not local:
            raise ConfigError(f"teacher.path {cfg.path!r}: no such folder")
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            cfg.dtype, torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        where = str(folder) if local else cfg.path
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(where, revision=cfg.revision)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(where, revision=cfg.revision,
                                                                           torch_dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"teacher.path {cfg.path!r}: could not load a causal LM ({exc})") from exc
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"  # generation continues from the right end of every row
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        identity: dict[str, Any] = {"kind": "hf", "name": cfg.path, "revision": cfg.revision, "dtype": str(dtype)}
        if local:
            identity["sha256"] = _folder_sha256(folder)
        else:  # the commit the revision resolved to
            identity["commit"] = getattr(self.model.config, "_commit_hash", None)
        self.identity = identity

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def rephrase_prompt(self, text: str) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            return list(self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                           add_generation_prompt=True, tokenize=True))
        return self.encode(text)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, seed: int) -> list[Generation]:
        width = max(len(p) for p in prompts)
        if width == 0:  # unconditional: start from end-of-text, as lmforge does
            prompts, width = [[self.eos_id] for _ in prompts], 1
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        torch.manual_seed(seed)
        options: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": self.pad_id,
                                   "eos_token_id": self.eos_id}
        if sampling.temperature > 0:
            options.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                           top_k=sampling.top_k or 0)
        else:
            options.update(do_sample=False)
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **options)
        return [_cut_at_eos(row[width:].tolist(), self.eos_id) for row in out.cpu()]


def load_teacher(cfg: TeacherConfig) -> Teacher:
    if cfg.kind == "lmforge":
        return LmforgeTeacher(cfg)
    return HuggingFaceTeacher(cfg)
