"""Fuzzed inputs (hypothesis): configs, YAML files and CLI arguments end in a clear
``LmforgeError`` (or argparse's usage error), never a traceback from deep inside, and a
failed command writes nothing."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.cli.main import main
from lmforge.core.config import apply_overrides, read_yaml
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.train.config import RunConfig

VALID = {
    "name": "fuzz",
    "data": {"out_dir": "data/x", "sources": [{"name": "a", "kind": "files", "path": "corpus"}]},
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32,
              "moe": {"n_experts": 4, "top_k": 2}},
    "optim": {"name": "adamw", "lr": 0.001},
    "train": {"steps": 5, "batch_size": 2, "seq_len": 16, "guard": {"spike_zscore": 6.0}},
    "eval": {"max_tokens_per_domain": 64},
}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


def _paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in tree.items():
        out.append(prefix + (key,))
        if isinstance(value, dict):
            out += _paths(value, prefix + (key,))
    return out


PATHS = _paths(VALID)


@settings(max_examples=150, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), value=values, extra=st.booleans())
def test_mutated_configs_fail_cleanly(path, value, extra):
    data = yaml.safe_load(yaml.safe_dump(VALID))
    node = data
    for key in path[:-1]:
        node = node[key]
    if extra:
        node[f"{path[-1]}_unknown"] = value  # an unknown key must be named
    else:
        node[path[-1]] = value
    try:
        RunConfig.from_dict(data)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message.strip()
        if extra:
            assert f"{path[-1]}_unknown" in message
    else:
        assert not extra, "an unknown key was accepted"


@settings(max_examples=100, deadline=None, database=None, derandomize=True)
@given(text=st.text(max_size=200))
def test_arbitrary_yaml_text_reads_or_fails_cleanly(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "config.yaml"
    path.write_text(text)
    try:
        data = read_yaml(path)
    except ConfigError as exc:
        assert str(path) in str(exc)
    else:
        assert isinstance(data, dict)


@settings(max_examples=100, deadline=None, database=None, derandomize=True)
@given(items=st.lists(st.text(max_size=20), max_size=4))
def test_arbitrary_overrides_apply_or_fail_cleanly(items):
    try:
        apply_overrides(yaml.safe_load(yaml.safe_dump(VALID)), items)
    except ConfigError as exc:
        assert "override" in str(exc)


VERB_ARGS = {
    "train": ["CONFIG", "--set", "--resume", "--max-restarts", "--no-report"],
    "eval": ["TARGET", "--max-tokens", "--device", "--lm-eval-tasks", "--limit"],
    "generate": ["TARGET", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--seed", "--device"],
    "export": ["TARGET", "--out", "--overwrite"],
    "report": ["TARGET"],
    "data": ["prepare", "CONFIG", "--set", "--overwrite"],
    "scaling": ["fit", "plan", "CSV", "--compute", "--inference-tokens", "--bootstrap"],
}
# Free-form tokens never name a real file or preset config ("zz" prefix), so no fuzzed
# command can start a real training run.
tokens = st.one_of(st.text(alphabet="abcxyz0123456789.=-_/:{} ", max_size=10).map(lambda t: "zz" + t),
                   st.sampled_from(["0", "-1", "1e400", "nan", "auto", "key=value", "a.b=[1,"]))


@settings(max_examples=120, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(verb=st.sampled_from(sorted(VERB_ARGS)), data=st.data())
def test_fuzzed_command_lines_fail_cleanly_and_write_nothing(tmp_path, verb, data):
    # Found by this test: `eval X --device TARGET` used to end in a torch RuntimeError.
    parts = data.draw(st.lists(st.one_of(st.sampled_from(VERB_ARGS[verb]), tokens), max_size=5))
    if verb == "scaling" and "fit" not in parts:
        parts = [p for p in parts if p != "plan"]  # a valid `scaling plan` may succeed; that is fine too
    argv = [verb, *parts]
    before = set(Path(tmp_path).rglob("*"))
    stderr = io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse: usage errors (2) and --help (0)
                code = exc.code
    except LmforgeError:
        pytest.fail(f"{argv}: LmforgeError escaped main()")
    finally:
        os.chdir(cwd)
    assert "Traceback" not in stderr.getvalue(), argv
    if code != 0:
        assert stderr.getvalue().strip(), f"{argv}: failed without saying why"
        created = set(Path(tmp_path).rglob("*")) - before
        assert not created, f"{argv}: a failed command wrote {sorted(map(str, created))}"


@pytest.mark.parametrize("name", ["TARGET", "gpu", "mps", "cuda:x", ""])
def test_bad_device_names_are_config_errors(name):
    from lmforge.core.device import resolve_device

    with pytest.raises(ConfigError, match="device"):
        resolve_device(name)


# Raw bytes, and text that may hold lone surrogates (encoded as invalid UTF-8).
file_bodies = st.one_of(st.binary(max_size=300), st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))


@settings(max_examples=12, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kind=st.sampled_from(["files", "jsonl", "parquet"]), bodies=st.lists(file_bodies, min_size=1, max_size=3))
def test_fuzzed_data_files_prepare_or_fail_cleanly(tmp_path_factory, tiny_corpus, kind, bodies):
    """Random bytes mixed into a source folder: preparation either succeeds with the problems
    counted in the manifest, or ends in one DataError — and a failure leaves no manifest."""
    from lmforge.core.errors import DataError
    from lmforge.data.config import DataConfig
    from lmforge.data.prepare import prepare_data

    root = tmp_path_factory.mktemp("fuzzdata")
    folder = root / "in"
    folder.mkdir()
    suffix = {"files": ".txt", "jsonl": ".jsonl", "parquet": ".parquet"}[kind]
    for i, body in enumerate(bodies):
        (folder / f"fuzz_{i}{suffix}").write_bytes(body)
    if kind == "files":  # plus some real documents, so success is possible
        for i in range(6):
            (folder / f"real_{i}.txt").write_text((tiny_corpus / "prose" / f"doc_{i:03d}.txt").read_text())
    cfg = DataConfig.from_dict({"out_dir": str(root / "data"), "vocab_size": 300, "num_workers": 1,
                                "heldout_fraction": 0.3, "sources": [{"name": "s", "kind": kind, "path": str(folder)}]})
    try:
        manifest = prepare_data(cfg)
    except DataError as exc:
        assert str(exc).strip() and "Traceback" not in str(exc)
        assert not (root / "data" / "manifest.json").exists()
    else:
        assert manifest["pipeline"]["s"]["read"] >= 1
