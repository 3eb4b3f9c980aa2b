"""The epochs sweep (data-limited regime): the runs it builds, a loader that really repeats a fixed
unique-token budget, the R*_D fit, ``scaling plan --r-star-fit`` and the figure."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from lmforge.core.errors import ConfigError, DataError
from lmforge.data.config import DataConfig
from lmforge.data.loader import MixtureLoader
from lmforge.data.prepare import prepare_data
from lmforge.data.shards import ShardSet
from lmforge.scaling.fit_repetition import fit_repetition, load_r_star, repetition_loss, save_repetition_fit
from lmforge.scaling.ladder.config import LadderConfig
from lmforge.scaling.ladder.plan import build_plan
from lmforge.scaling.table import make_table
from lmforge.scaling.workflows import plan_budget
from tests.conftest import run_cli

BASE = {
    "name": "base",
    "data": {"out_dir": "unused", "vocab_size": 300, "sources": [{"name": "prose", "kind": "demo_literature"}]},
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32},
    "train": {"seq_len": 32},
}


def _ladder(tmp_path, **epochs):
    return LadderConfig.from_dict({
        "name": "ep", "base": BASE, "out_dir": str(tmp_path), "sizes": {"shapes": [[32, 2]], "head_dim": 16},
        "epochs": {"unique_tokens": 1000, "repetitions": [1, 2, 4], **epochs}, "batch": {"sequences": 4},
    })


# --------------------------------------------------------------------------- the runs


def test_sweep_builds_repeated_and_fresh_runs_of_equal_tokens(tmp_path):
    plan = build_plan(_ladder(tmp_path), BASE, vocab_size=300)
    # U = 1000 rounded down to whole steps of 4 x 32 = 128 tokens: 896 (7 steps).
    runs = {r.name: (r.tokens, r.unique_tokens, r.repetitions, r.steps) for r in plan.rungs}
    assert runs == {
        "d32L2_R1": (896, 896, 1.0, 7),
        "d32L2_R2_repeat": (1792, 896, 2.0, 14), "d32L2_R2_fresh": (1792, 1792, 2.0, 14),
        "d32L2_R4_repeat": (3584, 896, 4.0, 28), "d32L2_R4_fresh": (3584, 3584, 4.0, 28),
    }
    for rung in plan.rungs:  # the budget reaches the loader through the run config
        config = plan.run_configs[rung.name]
        assert config["data"]["unique_tokens"] == rung.unique_tokens
        assert config["train"]["steps"] * 4 * 32 == rung.tokens
        assert not rung.holdout and rung.schedule == "cosine"


def test_sweep_without_fresh_arm_and_bad_settings(tmp_path):
    plan = build_plan(_ladder(tmp_path, fresh=False), BASE, vocab_size=300)
    assert [r.name for r in plan.rungs] == ["d32L2_R1", "d32L2_R2_repeat", "d32L2_R4_repeat"]
    with pytest.raises(ConfigError, match="cosine"):
        LadderConfig.from_dict({"name": "ep", "base": BASE, "sizes": {"shapes": [[32, 2]], "head_dim": 16},
                                "epochs": {"unique_tokens": 1000}, "schedule": {"kind": "wsd"}})
    with pytest.raises(ConfigError, match="exactly one"):
        LadderConfig.from_dict({"name": "ep", "base": BASE, "sizes": {"shapes": [[32, 2]], "head_dim": 16},
                                "epochs": {"unique_tokens": 1000}, "grid": {"tokens": [1000]}})
    with pytest.raises(ConfigError, match="repetitions"):
        _ladder(tmp_path, repetitions=[0.5, 2])
    with pytest.raises(ConfigError, match="less than one optimizer step"):
        build_plan(_ladder(tmp_path, unique_tokens=100), BASE, vocab_size=300)


# --------------------------------------------------------------------------- the loader


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_corpus):
    out = tmp_path_factory.mktemp("epochs") / "data"
    prepare_data(DataConfig.from_dict({
        "out_dir": str(out), "vocab_size": 300, "heldout_fraction": 0.2, "num_workers": 1, "shard_tokens": 5000,
        "sources": [{"name": "prose", "kind": "files", "path": str(tiny_corpus / "prose")},
                    {"name": "code", "kind": "files", "path": str(tiny_corpus / "code")}],
    }))
    return out


def _rows(loader, batches):
    return [row.tobytes() for _ in range(batches) for row in loader.next_batch()[0].numpy()]


def _pool(data_dir, tokens_per_source, seq_len=16):
    """The content of every window of the first ``tokens_per_source`` tokens of each source, as a multiset."""
    pool = collections.Counter()
    for name in ("prose", "code"):
        tokens = ShardSet(data_dir, "train", name).get(0, tokens_per_source + 1).astype(np.int64)
        pool.update(tokens[k * seq_len:(k + 1) * seq_len].tobytes() for k in range(tokens_per_source // seq_len))
    return pool


def test_unique_budget_is_repeated_exactly_and_only_it(data_dir):
    # U = 1024 over two equal-weight sources: 512 tokens = 32 windows of 16 tokens each; 8 rows per batch.
    loader = MixtureLoader(data_dir, seq_len=16, batch_size=8, seed=5, weights={"prose": 1, "code": 1},
                           unique_tokens=1024)
    assert loader.pool_tokens() == {"code": 512, "prose": 512}
    rows = _rows(loader, 64 // 8 * 3)  # three epochs of 64 windows
    pool = _pool(data_dir, 512)
    epochs = [rows[i * 64:(i + 1) * 64] for i in range(3)]
    # Every epoch is exactly the windows of the first 512 tokens of each source, each once
    # (compared as multisets: the tiny corpus repeats some text), in a new order.
    assert all(collections.Counter(e) == pool for e in epochs)
    assert epochs[0] != epochs[1]
    assert loader.epochs_consumed() == {"code": 3.0, "prose": 3.0}


def test_fresh_budget_sees_every_token_once_and_resume_continues(data_dir):
    fresh = MixtureLoader(data_dir, seq_len=16, batch_size=8, seed=5, weights={"prose": 1, "code": 1},
                          unique_tokens=3072)
    rows = _rows(fresh, 192 // 8)  # one epoch of 3072 tokens
    assert collections.Counter(rows) == _pool(data_dir, 1536)
    assert fresh.epochs_consumed() == {"code": 1.0, "prose": 1.0}
    first = MixtureLoader(data_dir, seq_len=16, batch_size=8, seed=5, weights={"prose": 1, "code": 1},
                          unique_tokens=3072)
    _rows(first, 5)
    resumed = MixtureLoader(data_dir, seq_len=16, batch_size=8, seed=5, weights={"prose": 1, "code": 1},
                            unique_tokens=3072)
    resumed.load_state_dict(first.state_dict())
    assert _rows(resumed, 3) == _rows(first, 3)


def test_budget_larger_than_the_split_is_refused(data_dir):
    available = len(ShardSet(data_dir, "train", "code"))
    with pytest.raises(DataError, match="unique_tokens.*'code' would need"):
        MixtureLoader(data_dir, seq_len=16, batch_size=8, seed=0, weights={"code": 1}, unique_tokens=available + 64)
    loader = MixtureLoader(data_dir, seq_len=16, batch_size=8, seed=0, weights={"code": 1}, unique_tokens=256)
    with pytest.raises(DataError, match="replay"):
        loader.draw_rows(np.random.default_rng(0), 4)


def test_unique_tokens_leaves_the_prepared_data_as_it_was():
    sources = [{"name": "prose", "kind": "demo_literature"}]
    plain = DataConfig.from_dict({"sources": sources})
    limited = DataConfig.from_dict({"sources": sources, "unique_tokens": 5000})
    assert plain.fingerprint_dict() == limited.fingerprint_dict()
    with pytest.raises(ConfigError, match="unique_tokens"):
        DataConfig.from_dict({"sources": sources, "unique_tokens": 0})


@pytest.mark.parametrize("extra, message", [
    ({"model": {"family": "retro"}, "retrieval": {"db": "db"}}, "'retro' family reads its own batches"),
    ({"replay": {"share": 0.25, "sources": {"prose": 1.0}}}, "cannot be combined with replay"),
])
def test_unique_tokens_is_refused_where_the_loader_would_ignore_it(extra, message):
    from lmforge.train.config import RunConfig

    run = {"data": {"sources": [{"name": "prose", "kind": "demo_literature"}], "unique_tokens": 5000}, **extra}
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(run)


# --------------------------------------------------------------------------- the fit


def _sweep_table(r_star, noise=0.002, seed=0, unique=1e5):
    epochs = np.array([1.0, 2, 4, 8, 16])
    tokens = np.concatenate([epochs * unique, epochs[1:] * unique])
    uniques = np.concatenate([np.full(5, unique), epochs[1:] * unique])
    loss = repetition_loss(tokens, uniques, E=3.0, B=400.0, beta=0.35, r_star=r_star)
    loss = loss * np.exp(np.random.default_rng(seed).normal(0.0, noise, len(loss)))
    return make_table(np.full(len(loss), 3e5), tokens, loss, unique_tokens=uniques)


@pytest.mark.parametrize("r_star", [3.0, 15.0])
def test_fit_recovers_a_known_r_star_with_an_interval(r_star):
    fit = fit_repetition(_sweep_table(r_star), n_bootstrap=40, level=0.9)
    q = fit["quantities"]["r_star"]
    assert abs(q["value"] / r_star - 1) < 0.15
    assert q["low"] <= q["value"] <= q["high"] and q["low"] < r_star * 1.15 and q["high"] > r_star / 1.15
    assert not fit["fit"]["r_star_at_bound"]
    four = next(c for c in fit["comparison"] if c["epochs"] == 4.0)
    assert four["loss_repeated"] > four["loss_fresh"] and four["relative"] > 0


def test_fit_flags_repetition_as_good_as_fresh_and_refuses_bad_tables():
    tokens = np.array([1e5, 2e5, 4e5, 8e5, 2e5, 4e5, 8e5])
    uniques = np.array([1e5, 1e5, 1e5, 1e5, 2e5, 4e5, 8e5])
    loss = 3.0 + 400.0 * tokens ** -0.35  # repeated exactly as good as fresh: R* → its upper bound
    fit = fit_repetition(make_table(np.full(7, 3e5), tokens, loss, unique_tokens=uniques), n_bootstrap=0)
    assert fit["fit"]["r_star_at_bound"] and fit["quantities"]["r_star"]["value"] > 1e3 and fit["warnings"]
    fresh_only = np.array([1e5, 2e5, 4e5, 8e5, 16e5])
    with pytest.raises(DataError, match="no row repeats"):
        fit_repetition(make_table(np.full(5, 3e5), fresh_only, np.linspace(5, 4, 5), unique_tokens=fresh_only))
    with pytest.raises(DataError, match="one model size"):
        fit_repetition(make_table([1e5, 2e5] * 4, [1, 2, 4, 8] * 2, [5, 4.5, 4.2, 4.1] * 2,
                                  unique_tokens=[1] * 8))


# --------------------------------------------------------------------------- planning with it


def test_plan_uses_the_fitted_r_star(tmp_path):
    fit = fit_repetition(_sweep_table(3.0), n_bootstrap=20)
    path = save_repetition_fit(tmp_path / "repetition_fit.json", fit)
    r_star, samples = load_r_star(path)
    assert r_star == fit["law"]["r_star"] and len(samples) == fit["bootstrap"]["ok"]
    unique = 2e9
    limited = plan_budget(1e21, unique_tokens=unique, r_star_fit=path)
    assert limited.plan.law["r_star"] == pytest.approx(r_star)
    assert limited.plan.n_bootstrap == len(samples) and limited.plan.loss.low is not None
    # Against a slower decay (R* = 15) the same unique data is worth more: lower predicted loss,
    # and more tokens of training are worth spending.
    slow = dict(fit, law={**fit["law"], "r_star": 15.0}, bootstrap={"r_star_samples": []})
    slow_path = save_repetition_fit(tmp_path / "slow.json", slow)
    relaxed = plan_budget(1e21, unique_tokens=unique, r_star_fit=slow_path)
    assert relaxed.plan.loss.value < limited.plan.loss.value
    assert relaxed.plan.tokens.value > limited.plan.tokens.value
    with pytest.raises(ConfigError, match="unique-tokens"):
        plan_budget(1e21, r_star_fit=path)


@pytest.mark.slow
def test_plan_cli_takes_r_star_fit(tmp_path):
    fit = fit_repetition(_sweep_table(3.0), n_bootstrap=0)
    path = save_repetition_fit(tmp_path / "repetition_fit.json", fit)
    out = tmp_path / "plan.json"
    result = run_cli("scaling", "plan", "--compute", "1e21", "--unique-tokens", "2e9", "--r-star-fit", str(path),
                     "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "R*_D" in result.stdout
    assert json.loads(out.read_text())["law"]["r_star"] == pytest.approx(fit["law"]["r_star"])
    bad = run_cli("scaling", "plan", "--compute", "1e21", "--r-star-fit", str(path))
    assert bad.returncode == 2 and "--unique-tokens" in bad.stderr


# --------------------------------------------------------------------------- the figure


def test_plot_of_loss_against_epochs(tmp_path):
    from lmforge.scaling.ladder.epochs import plot_epochs

    table = _sweep_table(5.0)
    fit = fit_repetition(table, n_bootstrap=10)
    fit["runs"] = [{"rung": f"r{i}", "D": d, "U": u, "loss": loss}
                   for i, (d, u, loss) in enumerate(zip(table.tokens, table.unique_tokens, table.loss))]
    path = plot_epochs({"d64L2": fit}, tmp_path / "epochs.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_epochs_sweep_end_to_end(tmp_path, tiny_corpus, capsys):
    import yaml

    from lmforge.scaling.ladder import run_ladder
    from lmforge.scaling.ladder.gather import read_rows
    from tests.conftest import tiny_run_dict

    base = tiny_run_dict(tmp_path, tiny_corpus, train={"eval_every": 0, "checkpoint_every": 0},
                         eval={"max_tokens_per_domain": 256, "sample_tokens": 8, "sample_prompts": ["the "],
                               "task_items": 0})
    base["model"].pop("moe")
    path = tmp_path / "epochs.yaml"
    path.write_text(yaml.safe_dump({
        "name": "ep", "out_dir": str(tmp_path / "ladders"), "base": base,
        "sizes": {"shapes": [[32, 1]], "head_dim": 8, "ffn_multiple": 16},
        "epochs": {"unique_tokens": 4 * 128, "repetitions": [1, 2, 4]},
        "batch": {"sequences": 4}, "fit": {"bootstrap": 10}, "evals_per_run": 1,
    }))
    assert run_ladder(path, workers=2, poll_seconds=0.2) == 0
    ladder_dir = tmp_path / "ladders" / "ep"
    rows = {r["rung"]: r for r in read_rows(ladder_dir / "ladder.csv")}
    assert set(rows) == {"d32L1_R1", "d32L1_R2_repeat", "d32L1_R2_fresh", "d32L1_R4_repeat", "d32L1_R4_fresh"}
    assert rows["d32L1_R4_repeat"]["U"] == 512 and rows["d32L1_R4_fresh"]["U"] == rows["d32L1_R4_fresh"]["D"] == 2048
    assert rows["d32L1_R4_repeat"]["epochs"] == 4.0 and rows["d32L1_R4_fresh"]["epochs"] == 1.0  # logged by the loader
    fit = json.loads((ladder_dir / "fit" / "repetition_fit.json").read_text())
    assert fit["format"] == "lmforge.scaling.repetition_fit/1" and fit["quantities"]["r_star"]["value"] > 0
    assert {c["epochs"] for c in fit["comparison"]} == {2.0, 4.0}
    assert (ladder_dir / "epochs.png").stat().st_size > 10_000
    assert "R*_D =" in capsys.readouterr().out
