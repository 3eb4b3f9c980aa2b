"""The by-name choices (optimizers, schedules, embedders, index kinds, source kinds) are
registries: an unknown name is refused naming its config key and the known names, and a new
entry is one registered function or class, usable at once through the config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.core.errors import ConfigError
from lmforge.data.config import DataConfig, EvalSetConfig, SourceConfig
from lmforge.data.documents import Document
from lmforge.data.sources import SOURCE_KINDS, iter_documents, register_source_kind, source_signature
from lmforge.data.tokenizer import Tokenizer
from lmforge.optim.config import OptimConfig
from lmforge.optim.optimizers import DECAY, OPTIMIZERS, OptimizerGroup, build_optimizer
from lmforge.optim.schedules import SCHEDULES, lr_multiplier
from lmforge.retrieval.embedders import EMBEDDERS, Embedder, build_embedder, register_embedder
from lmforge.retrieval.index import INDEXES, build_index, choose_kind


@pytest.fixture
def scratch_registries(monkeypatch):
    """Entries a test registers vanish afterwards (each registry gets a copy of its table)."""
    for registry in (OPTIMIZERS, SCHEDULES, EMBEDDERS, INDEXES, SOURCE_KINDS):
        monkeypatch.setattr(registry, "_items", dict(registry._items))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(["the cat sat on the mat", "def f(x):\n    return x"] * 20, vocab_size=300)


# ---- unknown names: the config key and the known names ---------------------------------------
@pytest.mark.parametrize("section, message", [
    ({"name": "adamw2"}, r"^optim\.name: unknown optimizer 'adamw2' \(known: adamw, muon\)$"),
    ({"schedule": "step"}, r"^optim\.schedule: unknown schedule 'step' \(known: constant, cosine, infinite, linear, wsd, "
                           r"wsd_cyclic\)$"),
])
def test_unknown_optimizer_or_schedule_names_the_key(section, message):
    with pytest.raises(ConfigError, match=message):
        OptimConfig.from_dict(section, path="optim")


def test_unknown_optimizer_from_the_command_line_is_one_line(tmp_path):
    from conftest import run_cli

    config = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"
    result = run_cli("train", str(config), "--set", "optim.name=adamw2",
                     "--set", f"runs_dir={tmp_path}", "--set", f"data.out_dir={tmp_path / 'data'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        "lmforge: error: optim.name: unknown optimizer 'adamw2' (known: adamw, muon)"


def test_unknown_source_and_eval_set_kinds_name_the_key():
    known = (r"\(known: demo_code, demo_digits, demo_literature, files, hf, image_folder, image_hf, image_parquet, "
             r"installed_packages, invented_facts, jsonl, kv_recall, parquet, prepared_heldout, synthetic\)")
    with pytest.raises(ConfigError, match=r"^sources\[0\]\.kind: unknown source kind 'csv' " + known):
        DataConfig.from_dict({"sources": [{"name": "a", "kind": "csv", "path": "x"}]})
    eval_set = {"name": "e", "kind": "xml", "path": "x"}
    with pytest.raises(ConfigError, match=r"^decontamination\.eval_sets\[0\]\.kind: unknown source kind 'xml'"):
        DataConfig.from_dict({"sources": [{"name": "a", "kind": "demo_code"}],
                              "decontamination": {"eval_sets": [eval_set]}})
    # An eval set is read from its path: a demo kind has none.
    with pytest.raises(ConfigError, match=r"^kind: .*'demo_code' reads none \(kinds with a path: files, hf, image_folder, "
                                          r"image_hf, image_parquet, jsonl, parquet, prepared_heldout, synthetic\)"):
        EvalSetConfig.from_dict({"name": "e", "kind": "demo_code", "path": "x"})
    with pytest.raises(ConfigError, match="of kind 'files' needs a path"):
        SourceConfig.from_dict({"name": "a", "kind": "files"})


def test_unknown_embedder_and_index_kind(tokenizer):
    with pytest.raises(ConfigError, match=r"^embedder: unknown embedder 'glove' \(known: bag_of_tokens, "
                                          r"bag_of_tokens_idf, bag_of_words_idf, minilm, model\)$"):
        build_embedder("glove:300", tokenizer)
    with pytest.raises(ConfigError, match=r"^embedder\.name: unknown embedder 'glove'"):
        build_embedder({"name": "glove", "dim": 300}, tokenizer)
    with pytest.raises(ConfigError, match=r"bag_of_tokens:wide.*positive integer"):
        build_embedder("bag_of_tokens:wide", tokenizer)
    with pytest.raises(ConfigError, match=r"^index_kind: unknown index kind 'annoy' \(known: auto, flat, hnsw, ivf, "
                                          r"ivfpq\)$"):
        choose_kind(10, "annoy")
    assert choose_kind(10) == "flat" and choose_kind(300_000) == "ivf" and choose_kind(6_000_000) == "ivfpq"


def test_a_name_registered_twice_is_refused(scratch_registries):
    with pytest.raises(ValueError, match="schedule 'cosine' registered twice"):
        SCHEDULES.register("cosine")(lambda step, total, cfg: 1.0)


# ---- a new entry is one registered function or class ----------------------------------------
def test_a_registered_schedule_and_optimizer_are_usable_by_name(scratch_registries):
    @SCHEDULES.register("step_down")
    def step_down(step: int, total_steps: int, cfg: OptimConfig) -> float:
        return 1.0 - step / total_steps

    @OPTIMIZERS.register("sgd")
    def build_sgd(model: torch.nn.Module, cfg: OptimConfig) -> OptimizerGroup:
        params = [p for p in model.parameters() if p.requires_grad]
        return OptimizerGroup([torch.optim.SGD([{"params": params, "base_lr": cfg.lr}], lr=cfg.lr)], [[DECAY]])

    cfg = OptimConfig.from_dict({"name": "sgd", "schedule": "step_down", "warmup_steps": 2}, path="optim")
    assert [lr_multiplier(step, 10, cfg) for step in (0, 1, 5)] == [0.5, 1.0, 0.5]
    optimizer = build_optimizer(torch.nn.Linear(3, 2), cfg)
    assert isinstance(optimizer.optimizers[0], torch.optim.SGD)


def test_a_registered_source_kind_reads_documents_and_eval_sets(scratch_registries, tmp_path):
    @register_source_kind("lines", signature=lambda source: f"lines:{source.path}")
    def read_lines(source: SourceConfig, problems) -> list[Document]:
        text = open(source.path, encoding="utf-8").read()
        return [Document(text=line, source=source.name, doc_id=str(i)) for i, line in enumerate(text.splitlines())]

    path = tmp_path / "items.txt"
    path.write_text("first\nsecond\nthird\n")
    cfg = DataConfig.from_dict({"sources": [{"name": "a", "kind": "lines", "path": str(path), "max_documents": 2}],
                                "decontamination": {"eval_sets": [{"name": "e", "kind": "lines", "path": str(path)}]}})
    assert [doc.text for doc in iter_documents(cfg.sources[0])] == ["first", "second"]
    assert source_signature(cfg.sources[0]) == f"lines:{path}"
    with pytest.raises(ConfigError, match="of kind 'lines' needs a path"):
        SourceConfig.from_dict({"name": "a", "kind": "lines"})


def test_a_registered_embedder_and_index_kind_are_usable_by_name(scratch_registries, tokenizer):
    @register_embedder
    class FirstTokenEmbedder(Embedder):
        name = "first_token"

        def __init__(self, dim: int):
            self.dim = dim

        @classmethod
        def spec_from_argument(cls, argument: str) -> dict:
            return {"name": cls.name, "dim": int(argument)}

        @classmethod
        def from_spec(cls, spec: dict, tokenizer: Tokenizer) -> Embedder:
            return cls(spec["dim"])

        def embed(self, chunks: np.ndarray) -> np.ndarray:
            return np.eye(self.dim, dtype=np.float32)[np.asarray(chunks)[:, 0] % self.dim]

    embedder = build_embedder("first_token:4", tokenizer)
    assert isinstance(embedder, FirstTokenEmbedder) and embedder.spec() == {"name": "first_token", "dim": 4}
    assert isinstance(build_embedder(embedder.spec(), tokenizer), FirstTokenEmbedder)

    @INDEXES.register("flat_again")
    def flat_again(embeddings: np.ndarray, settings) -> tuple:
        import faiss

        return faiss.IndexIDMap2(faiss.IndexFlatIP(embeddings.shape[1])), {"note": "registered in a test"}

    vectors = embedder.embed(np.array([[1, 9], [2, 9], [3, 9]]))
    index, spec = build_index(vectors, np.array([10, 11, 12]), kind="flat_again")
    assert spec == {"kind": "flat_again", "dim": 4, "note": "registered in a test"}
    assert index.search(vectors[1:2], 1)[1][0, 0] == 11
