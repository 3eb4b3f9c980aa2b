"""Synthetic data: provenance, the same pipeline as real data (dedup, decontamination), a resumable
`lmforge synth` (killed with SIGKILL and rerun), Hugging Face teachers, the collapse plan."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import WORDS, run_cli, tiny_run_dict, write_config
from lmforge.core.errors import ConfigError
from lmforge.data.config import DataConfig
from lmforge.data.documents import content_hash
from lmforge.data.pipeline import split_by_hash
from lmforge.data.documents import Document
from lmforge.data.prepare import prepare_data
from lmforge.synth.config import SynthConfig
from lmforge.synth.run import claim_folder, write_synthetic_shard

REPO = Path(__file__).resolve().parents[1]
TEACHER = {"kind": "test", "name": "hand-written", "sha256": "0" * 64}


def _prose(seed: int, lines: int = 30) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 10))).capitalize() + "."
                     for _ in range(lines)) + "\n"


def _in_train(text: str, fraction: float) -> bool:
    return split_by_hash(Document(text, "x", "x"), fraction) == "train"


def _synth_folder(folder: Path, texts: list[str]) -> list[str]:
    """A synth output folder holding ``texts`` (written with the library's own writer); their ids."""
    cfg = SynthConfig.from_dict({"out_dir": str(folder), "teacher": {"path": "hand-written"},
                                 "mode": "unconditional", "documents": len(texts)})
    claim_folder(folder, cfg, TEACHER, "test")
    records = [{"id": f"synth-00000-{i:05d}", "text": text, "teacher": TEACHER, "sampling": cfg.sampling.to_dict(),
                "mode": "unconditional", "prompt_document_id": None, "generation_index": i,
                "generated_tokens": len(text.split())} for i, text in enumerate(texts)]
    write_synthetic_shard(folder / "shards" / "shard_00000.jsonl", records, "test")
    return [r["id"] for r in records]


def test_synthetic_documents_meet_the_same_decontamination_and_near_dedup_as_real_data(tmp_path, tiny_corpus):
    prose = tiny_corpus / "prose"
    fraction = 0.2
    original = next(p.read_text() for p in sorted(prose.glob("doc_0*.txt")) if _in_train(p.read_text(), fraction))
    words = original.split(" ")
    words[5], words[40] = "lantern", "harbour"              # two words changed: a near-copy
    near_copy = " ".join(words)
    eval_item = next(t for t in (_prose(100 + i) for i in range(50)) if _in_train(t, 0.01))
    fresh = next(t for t in (_prose(200 + i) for i in range(50)) if _in_train(t, 0.01))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "items.jsonl").write_text(json.dumps({"text": eval_item}) + "\n")
    ids = _synth_folder(tmp_path / "synth", [eval_item, near_copy, fresh])
    cfg = DataConfig.from_dict({
        "out_dir": str(tmp_path / "data"), "vocab_size": 300, "heldout_fraction": fraction, "num_workers": 1,
        "sources": [{"name": "prose", "kind": "files", "path": str(prose)},
                    {"name": "synth", "kind": "synthetic", "path": str(tmp_path / "synth"), "heldout_fraction": 0.01}],
        "decontamination": {"eval_sets": [{"name": "task/items", "kind": "jsonl", "path": str(tmp_path / "eval")}]}})
    manifest = prepare_data(cfg)

    contamination = json.loads((tmp_path / "data" / "contamination.json").read_text())
    hits = [hit for hit in contamination["hits"] if hit["source"] == "synth"] if "hits" in contamination else None
    pipeline = manifest["pipeline"]["synth"]
    assert pipeline["removed_contaminated"] == 1, (pipeline, hits)
    dedup = json.loads((tmp_path / "data" / "dedup_report.json").read_text())
    clusters = [c for c in dedup["clusters"] if any(m["doc_id"] == ids[1] for m in c["members"])]
    assert len(clusters) == 1 and clusters[0]["kept"]["source"] == "prose"   # the real document stays
    assert pipeline["removed_near_duplicates"] == 1
    assert manifest["sources"]["synth"]["train"]["documents"] == 1            # only the fresh one is left

    origin = manifest["data_origin"]
    assert origin["by_source"]["prose"]["origin"] == "real"
    synth = origin["by_source"]["synth"]
    assert synth["origin"] == "synthetic" and synth["provenance"]["teacher"] == TEACHER
    assert origin["train_tokens"]["synthetic"] == manifest["sources"]["synth"]["train"]["tokens"] > 0
    assert origin["train_tokens"]["real"] == manifest["sources"]["prose"]["train"]["tokens"]
    from lmforge.report.html import _data

    html = _data(manifest, None)   # the run report's data section shows the origin of every source
    assert "<td>synthetic</td>" in html and f"{origin['train_tokens']['synthetic']} synthetic" in html
    kept = json.loads((tmp_path / "synth" / "shards" / "shard_00000.jsonl").read_text().splitlines()[2])
    assert content_hash(kept["text"]) == content_hash(fresh) and kept["teacher"] == TEACHER


def test_an_unfinished_shard_is_not_read(tmp_path, tiny_corpus):
    _synth_folder(tmp_path / "synth", [_prose(1), _prose(2)])
    (tmp_path / "synth" / "shards" / "shard_00001.jsonl").write_text(json.dumps({"id": "x", "text": _prose(3)}) + "\n")
    from lmforge.data.config import SourceConfig
    from lmforge.data.sources import InputProblems, iter_documents

    problems = InputProblems()
    docs = list(iter_documents(SourceConfig(name="s", kind="synthetic", path=str(tmp_path / "synth")), problems))
    assert [d.doc_id for d in docs] == ["synth-00000-00000", "synth-00000-00001"]
    assert problems.counts["unfinished_synthetic_shard"] == 1
    assert docs[0].meta["provenance"]["teacher"] == TEACHER


def test_a_folder_that_synth_is_still_writing_is_refused_until_its_writer_stops(tmp_path, tiny_corpus):
    from lmforge.core.errors import DataError
    from lmforge.data.config import SourceConfig
    from lmforge.data.sources import InputProblems, iter_documents

    folder = tmp_path / "synth"
    _synth_folder(folder, [_prose(1)])
    source = SourceConfig(name="s", kind="synthetic", path=str(folder))
    # A real process holds the folder's writer lock, as a running `lmforge synth` does.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lmforge.core.run_lock import RunLock; "
                               "RunLock(sys.argv[1], purpose='lmforge synth').acquire(); print('held', flush=True); "
                               "time.sleep(600)", str(folder)],
                              env={**os.environ, "PYTHONPATH": str(REPO / "src")}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DataError, match=f"still writing .*process {holder.pid}"):
            list(iter_documents(source, InputProblems()))
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    # Killed writer: the lock is gone with it, and the finished shard is read.
    assert [d.doc_id for d in iter_documents(source, InputProblems())] == ["synth-00000-00000"]


def test_a_synth_started_while_data_prepare_reads_the_folder_is_refused(tmp_path, tiny_corpus):
    from lmforge.core.errors import LmforgeError
    from lmforge.core.run_lock import RunLock
    from lmforge.data.config import SourceConfig
    from lmforge.data.sources import InputProblems, iter_documents

    folder = tmp_path / "synth"
    _synth_folder(folder, [_prose(1), _prose(2)])
    RunLock(folder, purpose="lmforge synth").acquire().release()  # a finished synth leaves its (empty) lock file
    reader = iter_documents(SourceConfig(name="s", kind="synthetic", path=str(folder)), InputProblems())
    assert next(reader).doc_id == "synth-00000-00000"  # mid-read: the shared lock is held
    with pytest.raises(LmforgeError, match="in use by another process .a reader"):
        RunLock(folder, purpose="lmforge synth").acquire()
    assert [d.doc_id for d in reader] == ["synth-00000-00001"]  # the read finishes, then lets go
    RunLock(folder, purpose="lmforge synth").acquire().release()


@pytest.mark.parametrize("section, message", [
    ({"out_dir": "x", "teacher": {"path": "r"}, "mode": "unconditional"}, "documents"),
    ({"out_dir": "x", "teacher": {"path": "r"}, "mode": "continuation"}, "prompts.data_dir"),
    ({"out_dir": "x", "teacher": {"path": "r"}, "mode": "unconditional", "documents": 2,
      "sampling": {"top_p": 0}}, "sampling.top_p"),
    ({"out_dir": "x", "teacher": {"path": "r"}, "mode": "paraphrase"}, "mode"),
    ({"out_dir": "x", "teacher": {"path": "r", "revision": "main"}, "mode": "unconditional", "documents": 1},
     "teacher.revision"),
])
def test_bad_synth_configs_name_the_key(section, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        SynthConfig.from_dict(section)


def test_top_p_keeps_only_the_nucleus():
    from lmforge.nn.generation import sample_next

    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    draws = {int(sample_next(logits, 1.0, None, torch.Generator().manual_seed(s), top_p=0.5)) for s in range(50)}
    assert draws == {0}
    draws = {int(sample_next(logits, 1.0, None, torch.Generator().manual_seed(s), top_p=0.8)) for s in range(200)}
    assert draws == {0, 1}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tiny_corpus):
    tmp = tmp_path_factory.mktemp("synth_teacher")
    cfg = tiny_run_dict(tmp, tiny_corpus, model={"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1,
                                                 "max_seq_len": 32},
                        train={"steps": 3, "batch_size": 2, "seq_len": 16, "log_every": 1, "eval_every": 0,
                               "checkpoint_every": 0, "tensorboard": False})
    cfg["model"].pop("moe", None)
    result = run_cli("train", str(write_config(tmp / "run.yaml", cfg)), "--no-report")
    assert result.returncode == 0, result.stderr
    return tmp / "runs" / "tiny", tmp / "data"


def _synth_config(path: Path, out: Path, teacher_run: Path, **extra) -> Path:
    section = {"out_dir": str(out), "teacher": {"kind": "lmforge", "path": str(teacher_run), "device": "cpu"},
               "mode": "unconditional", "documents": 60, "docs_per_shard": 2, "batch_size": 2,
               "sampling": {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 120, "seed": 3}, **extra}
    path.write_text(json.dumps({"synth": section}))
    return path


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "shards").glob("shard_*"))}


@pytest.mark.slow
def test_synth_killed_mid_way_and_rerun_finishes_without_duplicates(tmp_path, teacher_run):
    run_dir, _ = teacher_run
    out = tmp_path / "killed"
    config = _synth_config(tmp_path / "synth.json", out, run_dir)
    env = {**os.environ, "LMFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-m", "lmforge", "synth", str(config)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list((out / "shards").glob("*.done"))) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "synth.json").exists(), "synth finished before it could be killed: give it more work"
    finished = {name: data for name, data in _shards(out).items()
                if name.endswith(".jsonl") and (out / "shards" / name.replace(".jsonl", ".done")).is_file()}
    assert 2 <= len(finished) < 30

    result = run_cli("synth", str(config))
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "synth.json").read_text())
    assert summary["complete"] and summary["skipped_finished_shards"] >= len(finished)
    after = _shards(out)
    assert all(after[name] == data for name, data in finished.items())   # finished shards were not redone
    records = [json.loads(line) for name, data in after.items() if name.endswith(".jsonl")
               for line in data.decode().splitlines()]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == summary["documents"]
    assert summary["documents"] + sum(summary["dropped"].values()) == 60
    assert {r["generation_index"] for r in records} <= set(range(60))
    assert len({r["generation_index"] for r in records}) == len(records)
    teacher = records[0]["teacher"]
    assert teacher["kind"] == "lmforge" and len(teacher["sha256"]) == 64
    assert records[0]["sampling"]["top_p"] == 0.95

    # The same documents as a run that was never interrupted.
    clean = tmp_path / "clean"
    assert run_cli("synth", str(_synth_config(tmp_path / "clean.json", clean, run_dir))).returncode == 0
    assert {n: d for n, d in _shards(clean).items() if n.endswith(".jsonl")} == \
        {n: d for n, d in after.items() if n.endswith(".jsonl")}


@pytest.mark.slow
def test_continuation_of_real_prefixes_and_a_different_config_is_refused(tmp_path, teacher_run):
    run_dir, data_dir = teacher_run
    out = tmp_path / "cont"
    extra = {"mode": "continuation", "documents": None, "samples_per_prompt": 2, "include_prompt": True,
             "prompts": {"data_dir": str(data_dir), "sources": ["prose"], "max_documents": 3, "prompt_tokens": 8}}
    config = _synth_config(tmp_path / "c.json", out, run_dir, **extra)
    result = run_cli("synth", str(config))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for p in sorted((out / "shards").glob("*.jsonl")) for line in p.read_text().splitlines()]
    assert {r["prompt_document_id"] for r in records} <= {"prose/train/0", "prose/train/1", "prose/train/2"}
    assert sorted({r["generation_index"] for r in records}) == [0, 1] and all(r["prompt_tokens"] == 8 for r in records)
    changed = run_cli("synth", str(config), "--set", "synth.sampling.temperature=0.5")
    assert changed.returncode == 2 and "different synth config" in changed.stderr


@pytest.mark.slow
def test_a_hugging_face_teacher_from_an_exported_folder(tmp_path, teacher_run):
    pytest.importorskip("transformers")
    run_dir, data_dir = teacher_run
    assert run_cli("export", str(run_dir), "--out", str(tmp_path / "hf")).returncode == 0
    out = tmp_path / "hf_synth"
    extra = {"teacher": {"kind": "hf", "path": str(tmp_path / "hf"), "device": "cpu"}, "mode": "continuation",
             "documents": None, "prompts": {"data_dir": str(data_dir), "max_documents": 4, "prompt_tokens": 6},
             "sampling": {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 20, "seed": 0}}
    result = run_cli("synth", str(_synth_config(tmp_path / "h.json", out, run_dir, **extra)))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for p in sorted((out / "shards").glob("*.jsonl")) for line in p.read_text().splitlines()]
    assert records and all(r["teacher"]["kind"] == "hf" and len(r["teacher"]["sha256"]) == 64 for r in records)
    assert all(0 < r["generated_tokens"] <= 20 and r["prompt_document_id"] for r in records)


def test_the_collapse_plan_replaces_or_accumulates(tmp_path):
    from lmforge.synth.collapse import CollapseConfig, plan_generations

    base = {"name": "c", "data": {"out_dir": "/real", "vocab_size": 300,
                                  "sources": [{"name": "literature", "kind": "demo_literature"}]}}
    plans = plan_generations(base, CollapseConfig.from_dict({"generations": 3}), tmp_path)
    assert [(p.mode, p.index) for p in plans] == [("real", 0)] + [(m, g) for m in ("replace", "accumulate")
                                                                 for g in (1, 2, 3)]
    replace3 = plans[3].run["data"]
    assert [(s["name"], s["weight"]) for s in replace3["sources"]] == [("literature", 0.0), ("synthetic_gen2", 1.0)]
    assert replace3["tokenizer_from"] == "/real" and replace3["sources"][1]["path"].endswith("replace_gen2")
    accumulate3 = plans[6].run["data"]
    assert [s["name"] for s in accumulate3["sources"]] == ["literature", "synthetic_gen0", "synthetic_gen1",
                                                            "synthetic_gen2"]
    assert accumulate3["sources"][1]["path"] == str(tmp_path / "samples" / "gen0")   # shared by both modes
    assert [s.get("weight", 1.0) for s in accumulate3["sources"]] == [1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match="collapse.real_source"):
        plan_generations(base, CollapseConfig.from_dict({"real_source": "code"}), tmp_path)
    growing = plan_generations({**base, "train": {"steps": 50}},
                               CollapseConfig.from_dict({"generations": 2, "modes": ["accumulate_growing"]}), tmp_path)
    # As much real text per generation as generation 0: (g+1) data sets of equal weight, (g+1) x the steps.
    assert [(p.mode, p.index, p.run["train"]["steps"]) for p in growing] == [
        ("real", 0, 50), ("accumulate_growing", 1, 100), ("accumulate_growing", 2, 150)]
    assert [s["name"] for s in growing[2].run["data"]["sources"]] == ["literature", "synthetic_gen0", "synthetic_gen1"]
    assert growing[2].run["data"]["sources"][2]["path"].endswith("accumulate_growing_gen1")


def test_the_shipped_synth_configs_parse():
    from lmforge.core.config import read_yaml
    from lmforge.synth.collapse import CollapseConfig
    from lmforge.train.config import RunConfig

    configs = Path(__file__).resolve().parents[1] / "configs"
    assert SynthConfig.from_dict(read_yaml(configs / "synth_continuation.yaml")).mode == "continuation"
    assert SynthConfig.from_dict(read_yaml(configs / "synth_rephrase_hf.yaml")).teacher.kind == "hf"
    collapse = read_yaml(configs / "synth_collapse.yaml")
    assert CollapseConfig.from_dict(collapse.pop("collapse")).modes == ["replace", "accumulate"]
    assert RunConfig.from_dict(collapse).data.sources[0].name == "literature"


@pytest.mark.slow
def test_rephrasing_with_prompts_of_different_lengths(tmp_path, teacher_run):
    run_dir, data_dir = teacher_run
    out = tmp_path / "rephrase"
    extra = {"mode": "rephrase", "documents": None, "docs_per_shard": 4, "batch_size": 4,
             "prompts": {"data_dir": str(data_dir), "sources": ["prose", "code"], "max_documents": 4,
                         "rephrase_chars": 120, "template": "Say it again: {document}\nAgain:"},
             "sampling": {"temperature": 0.0, "max_new_tokens": 10, "seed": 0}}
    result = run_cli("synth", str(_synth_config(tmp_path / "r.json", out, run_dir, **extra)))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for p in sorted((out / "shards").glob("*.jsonl")) for line in p.read_text().splitlines()]
    assert {r["mode"] for r in records} == {"rephrase"} and len({r["prompt_tokens"] for r in records}) > 1
    # Greedy decoding of a prompt does not depend on the other prompts of its batch.
    single = tmp_path / "single"
    extra.update(batch_size=1)
    assert run_cli("synth", str(_synth_config(tmp_path / "s.json", single, run_dir, **extra))).returncode == 0
    alone = [json.loads(line) for p in sorted((single / "shards").glob("*.jsonl")) for line in p.read_text().splitlines()]
    assert [r["text"] for r in alone] == [r["text"] for r in records]
