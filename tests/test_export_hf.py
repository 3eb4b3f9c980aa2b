"""Hugging Face export: every supported lmforge architecture reloads in transformers with
the same logits, and unsupported ones get a clear error."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from lmforge.export.hf import ExportError, export_hf  # noqa: E402
from lmforge.nn.config import ModelConfig  # noqa: E402

BASE = {"vocab_size": 120, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32}


def _tokenizer(tmp_path):
    from lmforge.data.tokenizer import Tokenizer

    tok = Tokenizer.train(["the king and the queen\n", "def f(x):\n    return x\n"] * 20, vocab_size=300)
    return tok.save(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("extra, architecture", [
    ({}, "LlamaForCausalLM"),
    ({"qk_norm": True, "tie_embeddings": False}, "Qwen3ForCausalLM"),
    ({"moe": {"n_experts": 4, "top_k": 2, "d_expert": 24}}, "MixtralForCausalLM"),
    ({"qk_norm": True, "moe": {"n_experts": 4, "top_k": 2, "every_n_layers": 2}}, "Qwen3MoeForCausalLM"),
])
def test_export_reloads_with_identical_logits(tmp_path, extra, architecture):
    import transformers

    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({**BASE, **extra})
    model = cfg.build()
    for p in model.parameters():  # non-trivial norms, so a mapping mistake shows
        p.data.add_(torch.randn_like(p) * 0.05)
    summary = export_hf(model, cfg, _tokenizer(tmp_path), tmp_path / "hf")
    assert summary["architecture"] == architecture
    assert summary["max_logit_difference"] < 1e-4
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    # lmforge pads its 120 embedding rows to 128 but never uses the padded ids; the export
    # leaves them out, so a softmax over its logits is lmforge's.
    assert cfg.padded_vocab_size > cfg.vocab_size == reloaded.config.vocab_size
    torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits[..., :cfg.vocab_size],
                               atol=1e-4, rtol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.decode(tok("the king")["input_ids"]) == "the king"
    _assert_end_of_text_is_declared(tmp_path / "hf", tok)


@pytest.mark.parametrize("extra, scaling, written", [
    ({}, {"kind": "linear", "factor": 2.0}, {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    # static NTK-aware scaling has no transformers type: it is the larger base it amounts to
    ({}, {"kind": "ntk", "factor": 4.0}, {"rope_type": "default", "rope_theta": 10000.0 * 4.0 ** (8 / 6)}),
    ({}, {"kind": "yarn", "factor": 2.0, "original_max_seq_len": 32},
     {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "beta_fast": 32.0,
      "beta_slow": 1.0, "attention_factor": 0.1 * math.log(2.0) + 1.0, "rope_theta": 10000.0}),
    ({"qk_norm": True, "tie_embeddings": False}, {"kind": "yarn", "factor": 2.0, "original_max_seq_len": 32,
                                                  "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.2},
     {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "beta_fast": 16.0,
      "beta_slow": 2.0, "attention_factor": 1.2, "rope_theta": 10000.0}),
])
def test_rope_scaling_exports_as_rope_parameters_with_identical_logits(tmp_path, extra, scaling, written):
    import json

    import transformers

    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({**BASE, **extra, "max_seq_len": 64, "rope_scaling": scaling})
    model = cfg.build()
    for p in model.parameters():  # sharper attention than at initialisation, so positions matter
        p.data.add_(torch.randn_like(p) * 0.1)
    summary = export_hf(model, cfg, _tokenizer(tmp_path), tmp_path / "hf")
    assert summary["max_logit_difference"] < 1e-4
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_parameters"] == pytest.approx(written) and config["max_position_embeddings"] == 64
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 64))  # past the original 32 positions
    ours = model.eval()(ids).logits[..., :cfg.vocab_size]
    torch.testing.assert_close(reloaded(ids).logits, ours, atol=1e-4, rtol=1e-4)
    plain = ModelConfig.from_dict({**cfg.to_dict(), "rope_scaling": None}).build()
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(plain.eval()(ids).logits[..., :cfg.vocab_size], ours, atol=1e-3)  # the scaling counts


def _assert_end_of_text_is_declared(folder, tok):
    """<|endoftext|> (id 0) ends and begins sequences in config.json, generation_config.json and
    the tokenizer, pads in the last two only, and is plain text when a document contains it."""
    import json

    from lmforge.data.tokenizer import Tokenizer

    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"], config.get("pad_token_id")) == (0, 0, None)
    assert (generation["eos_token_id"], generation["bos_token_id"], generation["pad_token_id"]) == (0, 0, 0)
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == ("<|endoftext|>", 0, 0, 0)
    ours = Tokenizer.load(folder / "tokenizer.json")
    text = "the end<|endoftext|>the king"
    assert tok(text)["input_ids"] == ours.encode(text) and 0 not in ours.encode(text)


def test_unsupported_and_existing_targets_are_clear_errors(tmp_path):
    cfg = ModelConfig.from_dict({**BASE, "moe": {"n_experts": 4, "top_k": 2, "n_shared_experts": 1}})
    with pytest.raises(ExportError, match="shared experts"):
        export_hf(cfg.build(), cfg, _tokenizer(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    dense = ModelConfig.from_dict(BASE)
    (tmp_path / "taken").mkdir()
    with pytest.raises(ExportError, match="exists"):
        export_hf(dense.build(), dense, _tokenizer(tmp_path), tmp_path / "taken")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_corpus):
    from conftest import run_cli, tiny_run_dict, write_config

    tmp = tmp_path_factory.mktemp("export_run")
    cfg = tiny_run_dict(tmp, tiny_corpus, train={"steps": 2, "batch_size": 2, "seq_len": 16, "log_every": 1,
                                                 "eval_every": 0, "checkpoint_every": 0, "tensorboard": False})
    config = write_config(tmp / "run.yaml", cfg)
    result = run_cli("train", str(config), "--no-report")
    assert result.returncode == 0, result.stderr
    return tmp / "runs" / "tiny"


def _user_folder(path):
    """A folder of the user's own: files and a subfolder lmforge never wrote."""
    (path / "notes").mkdir(parents=True)
    (path / "thesis.txt").write_text("three years of work\n")
    (path / "notes" / "ideas.md").write_text("- idea\n")
    return {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _files(path):
    return {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _one_line_error(result, *words):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("lmforge: error:"), result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_export_command_on_a_trained_run(tmp_path, trained_run):
    from conftest import run_cli

    result = run_cli("export", str(trained_run), "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert "MixtralForCausalLM" in result.stdout and (tmp_path / "hf" / "config.json").is_file()
    assert "Loading weights" not in result.stderr  # no progress bars in logs
    again = run_cli("export", str(trained_run), "--out", str(tmp_path / "hf"))
    _one_line_error(again, "exists", "--overwrite")


def test_overwrite_never_deletes_a_folder_or_file_lmforge_did_not_export(tmp_path, trained_run):
    from conftest import run_cli

    own = tmp_path / "own"
    before = _user_folder(own)
    result = run_cli("export", str(trained_run), "--out", ".", "--overwrite", cwd=own)
    _one_line_error(result, "working directory")
    onto_file = run_cli("export", str(trained_run), "--out", str(own / "thesis.txt"), "--overwrite")
    _one_line_error(onto_file, "is a file")
    assert _files(own) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["own"]  # no temporary folder left behind


@pytest.fixture(scope="module")
def trained_model(trained_run):
    from lmforge.serve.loading import load_for_inference

    model, _, _, checkpoint = load_for_inference(trained_run, torch.device("cpu"))
    return model, checkpoint / "tokenizer.json"


def _export(trained_model, out, **kwargs):
    model, tokenizer_json = trained_model
    return export_hf(model, model.cfg, tokenizer_json, out, **kwargs)


def test_overwrite_refuses_user_folders_parents_and_files(tmp_path, trained_model, monkeypatch):
    own = tmp_path / "own"
    before = _user_folder(own)
    with pytest.raises(ExportError, match="not an lmforge export"):
        _export(trained_model, own, overwrite=True)
    monkeypatch.chdir(own / "notes")
    with pytest.raises(ExportError, match="parent of the working directory"):
        _export(trained_model, Path(".."), overwrite=True)
    with pytest.raises(ExportError, match="is a file"):
        _export(trained_model, own / "thesis.txt" / "hf")
    assert _files(own) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["own"]


def test_overwrite_replaces_an_earlier_export_with_usual_permissions(tmp_path, trained_model):
    import json
    import os
    import stat

    out = tmp_path / "hf"
    umask = os.umask(0o027)  # the export must follow the umask, not mkdtemp's or safetensors' own modes
    try:
        _export(trained_model, out)
        (out / "config.json").write_text("{}")  # lmforge's own files are replaced on overwrite
        _export(trained_model, out, overwrite=True)
    finally:
        os.umask(umask)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    marker = json.loads((out / "lmforge_export.json").read_text())
    assert "model.safetensors" in marker["files"] and marker["architecture"] == "MixtralForCausalLM"
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # the replaced export is gone, nothing hidden


def test_overwrite_keeps_files_the_user_added_to_an_export(tmp_path, trained_model):
    out = tmp_path / "hf"
    _export(trained_model, out)
    (out / "README.md").write_text("my model card\n")
    before = _files(out)
    with pytest.raises(ExportError, match="README.md"):
        _export(trained_model, out, overwrite=True)
    assert _files(out) == before


def test_protected_folders_are_refused_even_when_they_look_like_exports(tmp_path, monkeypatch):
    from lmforge.export.folder import MARKER, check_target

    def fake_export(path):
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}")
        (path / MARKER).write_text('{"format": "lmforge-hf-export", "files": ["config.json"]}')
        return path

    check_target(fake_export(tmp_path / "export"), overwrite=True)  # a real export may be replaced
    repo = fake_export(tmp_path / "repo")
    (repo / ".git").mkdir()
    with pytest.raises(ExportError, match="git repository"):
        check_target(repo, overwrite=True)
    home = fake_export(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(ExportError, match="the home folder"):
        check_target(home, overwrite=True)
    with pytest.raises(ExportError, match="parent of the home folder"):
        check_target(tmp_path, overwrite=True)
    import lmforge

    with pytest.raises(ExportError, match="lmforge's own code"):
        check_target(Path(lmforge.__file__).parent, overwrite=True)
    with pytest.raises(ExportError, match="filesystem root"):
        check_target(Path("/"), overwrite=True)  # only checks: nothing is ever removed here
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "export")
    with pytest.raises(ExportError, match="symbolic link"):
        check_target(link, overwrite=True)


@pytest.mark.parametrize("atomic_exchange", [True, False])
def test_a_failed_overwrite_leaves_the_earlier_export_and_a_good_one_swaps_it(tmp_path, monkeypatch, atomic_exchange):
    import lmforge.export.folder as folder

    if not atomic_exchange:  # the two-rename path used where renameat2 is missing
        monkeypatch.setattr(folder, "exchange_paths", lambda a, b: False)
    dense = ModelConfig.from_dict(BASE)
    out = tmp_path / "out" / "hf"
    export_hf(dense.build(), dense, _tokenizer(tmp_path), out)
    before = _files(out)
    with pytest.raises(ExportError, match="does not reproduce"):
        export_hf(dense.build(), dense, _tokenizer(tmp_path), out, overwrite=True, atol=-1.0)
    assert _files(out) == before
    torch.manual_seed(1)
    export_hf(dense.build(), dense, _tokenizer(tmp_path), out, overwrite=True)
    assert _files(out)[Path("model.safetensors")] != before[Path("model.safetensors")]
    assert [p.name for p in out.parent.iterdir()] == ["hf"]


def test_a_retro_model_is_refused_with_its_family_named(tmp_path):
    from lmforge.nn.retro import RetroConfig, RetroModelConfig

    cfg = RetroModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=32,
                           retro=RetroConfig(chunk_len=8, encoder_layers=1))
    with pytest.raises(ExportError, match="family 'retro' has no transformers equivalent"):
        export_hf(cfg.build(), cfg, tmp_path / "tokenizer.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()
