"""``scaling fit`` and ``scaling plan`` end to end on a small CSV written in tmp_path."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before scipy loads; see lmforge.scaling.fit

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lmforge.cli.scaling import add_scaling_parser, run_scaling  # noqa: E402
from lmforge.scaling.fit import LossLaw  # noqa: E402
from lmforge.scaling.synthetic import isoflop_table  # noqa: E402

LAW = LossLaw(E=1.8, A=500.0, B=2000.0, alpha=0.35, beta=0.37)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge")
    add_scaling_parser(parser.add_subparsers(dest="verb", required=True))
    return parser


def run(*argv: str) -> int:
    return run_scaling(_parser().parse_args(["scaling", *argv]))


@pytest.fixture
def runs_csv(tmp_path):
    table = isoflop_table(LAW, np.geomspace(1e17, 1e20, 6), n_sizes=7, noise=0.005, seed=0)
    path = tmp_path / "runs.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model_params", "tokens", "val_loss", "flops"])
        for n, d, loss, c in zip(table.params, table.tokens, table.loss, table.compute):
            writer.writerow([f"{n:.6g}", f"{d:.6g}", f"{loss:.6f}", f"{c:.6g}"])
    return path


def test_fit_then_plan_end_to_end(runs_csv, tmp_path, capsys):
    out = tmp_path / "fit"
    code = run("fit", str(runs_csv), "--out", str(out), "--bootstrap", "8", "--starts", "4",
               "--columns", "params=model_params,loss=val_loss", "--level", "0.9")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "alpha" in captured.out and "2 IsoFLOP" in captured.out and "approach1 skipped" in captured.out
    for name in ("fit.json", "isoflops.png", "loss_surface.png", "residuals.png"):
        assert (out / name).stat().st_size > 0
        assert f"written: {out / name}" in captured.out
    fit = json.loads((out / "fit.json").read_text())
    assert fit["settings"]["level"] == 0.9 and fit["source"]["rows"] == 42 and len(fit["source"]["sha256"]) == 64
    assert fit["approach3"]["bootstrap"]["ok"] == 8
    assert abs(fit["approach3"]["quantities"]["a"]["value"] - LAW.a) < 0.03
    assert abs(fit["approach2"]["quantities"]["a"]["value"] - LAW.a) < 0.03

    plan_json = tmp_path / "plan.json"
    code = run("plan", "--compute", "1e21", "--inference-tokens", "1T", "--fit", str(out / "fit.json"),
               "--json", str(plan_json), "--vocab-size", "32000")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "compute-optimal parameters N" in captured.out and "times smaller" in captured.out
    assert "Proposed shapes" in captured.out
    plan = json.loads(plan_json.read_text())
    n, d = plan["params"]["value"], plan["tokens"]["value"]
    assert 6 * n * d == pytest.approx(1e21)
    assert plan["params"]["low"] <= n <= plan["params"]["high"]
    assert plan["inference"]["params"]["value"] < n
    assert plan["shapes"]["optimal"]["config"]["vocab_size"] == 32000


def test_plan_with_a_published_law(capsys):
    assert run("plan", "--compute", "5.76e23", "--law", "besiroglu2024", "--n-experts", "8") == 0
    out = capsys.readouterr().out
    assert "published law besiroglu2024" in out and "8 (top 2)" in out


def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("N,D,loss\n1e7,2e8,4.1\n1e8,lots,3.0\n")
    assert run("fit", str(bad), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: ") and "line 3, column 'D'" in err
    assert not (tmp_path / "o").exists()  # nothing written on bad input

    assert run("fit", str(tmp_path / "missing.csv")) == 2
    assert "file not found" in capsys.readouterr().err

    assert run("plan", "--compute", "1e21", "--fit", str(tmp_path / "nofit.json")) == 2
    assert "fit file not found" in capsys.readouterr().err


def test_explicit_approach_the_data_cannot_support_is_an_error(runs_csv, tmp_path, capsys):
    code = run("fit", str(runs_csv), "--out", str(tmp_path / "o"), "--approach", "1", "--bootstrap", "0",
               "--columns", "params=model_params,loss=val_loss")
    assert code == 2
    assert "Approach 1 needs two or more training curves" in capsys.readouterr().err
    assert run("fit", str(runs_csv), "--approach", "4") == 2
    assert "approaches are 1, 2 and 3" in capsys.readouterr().err


def test_every_option_has_help():
    parser = _parser()
    scaling = parser._subparsers._group_actions[0].choices["scaling"]
    for verb in ("fit", "plan"):
        sub = scaling._subparsers._group_actions[0].choices[verb]
        for action in sub._actions:
            assert action.help, f"scaling {verb} {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit):
        parser.parse_args(["scaling", "plan", "--compute", "-5"])


def test_data_constrained_fit_and_plan(tmp_path, capsys):
    law = LossLaw(E=1.8, A=500.0, B=2000.0, alpha=0.35, beta=0.37, r_star=15.0)
    rng = np.random.default_rng(0)
    path = tmp_path / "repeats.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["N", "D", "U", "loss"])
        for n in np.geomspace(1e7, 3e9, 5):
            for u in np.geomspace(1e8, 1e10, 3):
                for epochs in (1, 4, 16, 64):
                    loss = law.loss(n, u * epochs, u) * np.exp(rng.normal(0, 0.005))
                    writer.writerow([f"{n:.6g}", f"{u * epochs:.6g}", f"{u:.6g}", f"{loss:.6f}"])
    out = tmp_path / "fit"
    assert run("fit", str(path), "--out", str(out), "--bootstrap", "3", "--starts", "4", "--no-plots",
               "--approach", "3") == 0
    fit = json.loads((out / "fit.json").read_text())
    assert fit["settings"]["r_star"] == "fit"
    assert 10 < fit["approach3"]["law"]["r_star"] < 22
    assert "r_star" in fit["approach3"]["quantities"]
    assert not list(out.glob("*.png"))
    capsys.readouterr()
    assert run("plan", "--compute", "1e22", "--unique-tokens", "5B", "--fit", str(out / "fit.json")) == 0
    assert "compute-optimal parameters N" in capsys.readouterr().out
