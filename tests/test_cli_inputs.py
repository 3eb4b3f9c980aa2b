"""Bad command lines end in one clear line and exit code 2, before anything runs or is written.

Every test here runs the real command line (``lmforge.cli.main.main`` or a subprocess); none
trains a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.cli import commands
from lmforge.cli.main import build_parser, main


def _exit_code(argv: list[str]) -> int:
    """``main(argv)``'s exit code, whether it returns it or argparse raises SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def _one_error_line(err: str) -> str:
    """stderr must be exactly one line (no usage block, no traceback) holding the error."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], err
    return lines[0]


# ---- config paths ------------------------------------------------------------------------------

@pytest.mark.parametrize("verb", [["train"], ["retrieval", "train"], ["data", "prepare"]])
def test_a_missing_config_path_is_an_error_not_the_preset_of_the_same_name(verb, tmp_path, capsys):
    # configs/debug.yaml exists; /elsewhere/debug.yaml must not silently mean it.
    assert (commands.repo_configs_dir() / "debug.yaml").is_file()
    missing = tmp_path / "nowhere" / "debug.yaml"
    assert _exit_code([*verb, str(missing)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"lmforge: error: config file not found: {missing}"


def test_a_relative_path_with_a_folder_is_not_looked_up_among_presets(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _exit_code(["train", "./debug.yaml"]) == 2
    assert "config file not found: ./debug.yaml" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_bare_names_find_presets_and_a_local_file_comes_first(tmp_path, monkeypatch):
    presets = commands.repo_configs_dir()
    assert commands.find_config("quickstart.yaml") == presets / "quickstart.yaml"
    assert commands.find_config("quickstart") == presets / "quickstart.yaml"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "debug.yaml").write_text("name: local\n")
    assert commands.find_config("debug.yaml") == Path("debug.yaml")


def test_an_unknown_bare_name_lists_the_presets(capsys):
    assert _exit_code(["train", "zz_no_such_preset"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "config file not found: zz_no_such_preset" in line and "quickstart" in line and "debug" in line


def test_a_directory_is_not_a_config(tmp_path, capsys):
    assert _exit_code(["train", str(tmp_path)]) == 2
    assert f"config {tmp_path}: not a file" in _one_error_line(capsys.readouterr().err)


BAD_CONFIGS = {
    "binary": (b"\xff\xfe\x00\x89PNG\r\n\x1a\n", "not a UTF-8 text file"),
    "syntax": (b"model:\n  d_model: [32,\n  n_layers: 2\n", "not valid YAML"),
    "list": (b"- name: tiny\n- steps: 3\n", "the top level must be a mapping, got list"),
    "scalar": (b"just some words\n", "the top level must be a mapping, got str"),
}


@pytest.mark.parametrize("verb", [["train"], ["data", "prepare"], ["retrieval", "train"]])
@pytest.mark.parametrize("kind", sorted(BAD_CONFIGS))
def test_unreadable_configs_are_one_line_naming_the_file(verb, kind, tmp_path, capsys):
    body, message = BAD_CONFIGS[kind]
    path = tmp_path / "config.yaml"
    path.write_bytes(body)
    assert _exit_code([*verb, str(path)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"lmforge: error: {path}: ") and message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


# ---- options that take counts ------------------------------------------------------------------

# (command line up to the option, option, bad value): each must be an argparse error naming the option.
BAD_OPTIONS = [
    (["train", "C"], "--max-restarts", "-1"),
    (["retrieval", "train", "C"], "--max-restarts", "-1"),
    (["eval", "RUN"], "--max-tokens", "0"),
    (["eval", "RUN"], "--max-tokens", "-5"),
    (["eval", "RUN"], "--limit", "0"),
    (["eval", "RUN"], "--lm-eval-tasks", ","),
    (["generate", "RUN", "--prompt", "x"], "--max-new-tokens", "0"),
    (["generate", "RUN", "--prompt", "x"], "--temperature", "-0.5"),
    (["generate", "RUN", "--prompt", "x"], "--temperature", "nan"),
    (["generate", "RUN", "--prompt", "x"], "--top-k", "-1"),
    (["generate", "RUN", "--prompt", "x"], "--seed", "-1"),
    (["retrieval", "build", "DATA"], "--chunk-len", "0"),
    (["retrieval", "build", "DATA"], "--max-tokens-per-source", "0"),
    (["retrieval", "build", "DATA"], "--sources", ","),
    (["retrieval", "remove", "DB"], "--doc", "-1"),
    (["retrieval", "neighbours", "DB"], "-k", "0"),
    (["retrieval", "neighbours", "DB"], "--block-size", "0"),
    (["retrieval", "neighbours", "DB"], "--exclusion-radius", "-1"),
    (["retrieval", "eval", "RUN", "--db", "DB"], "-k", "0"),
    (["retrieval", "eval", "RUN", "--db", "DB"], "--max-tokens", "0"),
    (["retrieval", "eval", "RUN", "--db", "DB"], "--fractions", "0,1"),
    (["retrieval", "eval", "RUN", "--db", "DB"], "--fractions", "1.5"),
    (["retrieval", "eval", "RUN", "--db", "DB"], "--fractions", "nan"),
    (["retrieval", "eval", "RUN", "--db", "DB"], "--candidates", "0"),
    (["retrieval", "eval", "RUN", "--db", "DB"], "--domains", ","),
    (["retrieval", "facts", "RUN", "--db", "DB"], "--entities", "0"),
    (["retrieval", "facts", "RUN", "--db", "DB"], "--seed", "-3"),
    (["retrieval", "train-query-encoder", "RUN", "--db", "DB"], "--queries", "0"),
    (["retrieval", "train-query-encoder", "RUN", "--db", "DB"], "--candidates", "-2"),
    (["retrieval", "train-query-encoder", "RUN", "--db", "DB"], "--heldout-queries", "0"),
    (["retrieval", "train-query-encoder", "RUN", "--db", "DB"], "--steps", "-1"),
    (["retrieval", "train-query-encoder", "RUN", "--db", "DB"], "--lr", "0"),
    (["retrieval", "train-query-encoder", "RUN", "--db", "DB"], "--lr", "inf"),
    (["retrieval", "train-query-encoder", "RUN", "--db", "DB"], "--tau-lm", "-1"),
    (["retrieval", "train-query-encoder", "RUN", "--db", "DB"], "--tau-q", "0"),
    (["retrieval", "train-query-encoder", "RUN", "--db", "DB"], "--context-chunks", "-1"),
    (["retrieval", "train-query-encoder", "RUN", "--db", "DB"], "--exclusion-radius", "-1"),
    (["retrieval", "train-query-encoder", "RUN", "--db", "DB"], "--seed", "-1"),
]


@pytest.mark.parametrize("prefix,option,value", BAD_OPTIONS,
                         ids=[f"{' '.join(p[:2])} {o} {v}" for p, o, v in BAD_OPTIONS])
def test_nonsense_counts_are_usage_errors_naming_the_option(prefix, option, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _exit_code([*prefix, option, value]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"error: argument {option}:" in line, line
    assert list(tmp_path.iterdir()) == []


def test_eval_max_tokens_zero_leaves_existing_results_alone(tmp_path, capsys):
    # It used to evaluate nothing and write empty results over eval/step_N.json.
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    previous = {"bpb": {"prose": 2.5}, "step": 4}
    (run / "eval" / "step_4.json").write_text(json.dumps(previous))
    assert _exit_code(["eval", str(run), "--max-tokens", "0"]) == 2
    assert "argument --max-tokens: expected an integer >= 1, got '0'" in capsys.readouterr().err
    assert json.loads((run / "eval" / "step_4.json").read_text()) == previous
    assert [p.name for p in (run / "eval").iterdir()] == ["step_4.json"]


def test_good_values_still_parse():
    args = build_parser().parse_args(["retrieval", "eval", "RUN", "--db", "DB", "--fractions", "0.5, 1"])
    assert args.fractions == (0.5, 1.0) and args.max_tokens == 16384
    args = build_parser().parse_args(["generate", "RUN", "--prompt", "x", "--temperature", "0", "--top-k", "0"])
    assert args.temperature == 0.0 and args.top_k == 0
    args = build_parser().parse_args(["eval", "RUN", "--lm-eval-tasks", "hellaswag,,arc_easy"])
    assert args.lm_eval_tasks == ["hellaswag", "arc_easy"]


# ---- `retrieval train` is `train` -----------------------------------------------------------------

def _options(argv: list[str]) -> dict:
    parser = build_parser()
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if k not in ("verb", "retrieval_verb")}


def test_retrieval_train_takes_the_options_of_train():
    options = ["C.yaml", "--set", "a.b=1", "--set", "c=2", "--resume", "auto", "--no-report", "--max-restarts", "3"]
    assert _options(["retrieval", "train", *options]) == _options(["train", *options])
    assert _options(["retrieval", "train", "C.yaml"]) == _options(["train", "C.yaml"])


def test_retrieval_train_with_restarts_supervises_lmforge_train(tmp_path, capfd):
    # The supervisor starts `lmforge train` as a child; a bad config (exit 2) is not restarted.
    missing = tmp_path / "nowhere" / "retro.yaml"
    assert _exit_code(["retrieval", "train", str(missing), "--set", "train.steps=2", "--max-restarts", "2"]) == 2
    err = capfd.readouterr().err
    assert err.count(f"lmforge: error: config file not found: {missing}") == 1, err
    assert "restart" not in err


def test_eval_checks_the_lm_eval_task_folder_before_loading_anything(tmp_path, capsys):
    missing = tmp_path / "tasks"
    assert _exit_code(["eval", str(tmp_path / "run"), "--lm-eval-tasks", "t", "--lm-eval-include", str(missing)]) == 2
    assert f"--lm-eval-include {missing}: not a folder" in _one_error_line(capsys.readouterr().err)
