"""bench/synth_validation.py: the runs it asks the mixture sweep for (synthetic shares, the teacher →
student arms' unique-token budgets), the student config it writes, and its tables (real bpb only)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from conftest import load_bench
from lmforge.data.mixture import mixture_probabilities
from lmforge.scaling.mixtures import mixture_configs, parse_mixture
from lmforge.train.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    return load_bench("synth_validation")


def _base(bench, out: Path) -> dict:
    return bench.resolved_config(yaml.safe_load((ROOT / bench.STUDENT_CONFIG).read_text()), out)


def _option_values(command: list[str], option: str) -> list[str]:
    return [command[i + 1] for i, arg in enumerate(command) if arg == option]


def test_share_mixtures_give_the_synthetic_share_and_even_domains(bench, tmp_path):
    base = _base(bench, tmp_path)
    mixtures = [parse_mixture(bench.share_mixture(share)) for share in bench.SHARES]
    for share, cfg in zip(bench.SHARES, mixture_configs(base, mixtures)):
        weights = {s["name"]: s["weight"] for s in cfg["data"]["sources"]}
        total = sum(weights.values())
        synthetic = sum(weights[n] for n in bench.SYNTHETIC) / total
        assert synthetic == pytest.approx(share / 100)
        assert weights["literature"] == weights["code"]
        assert weights["synth_literature"] == weights["synth_code"]
    assert "synth" not in bench.share_mixture(0)   # 0%: the synthetic sources are not sampled at all


def test_resolved_config_puts_every_path_under_out_and_parses(bench, tmp_path):
    cfg = _base(bench, tmp_path)
    assert cfg["runs_dir"] == str(tmp_path / "runs") and cfg["data"]["out_dir"] == str(tmp_path / "data")
    paths = {s["name"]: s.get("path") for s in cfg["data"]["sources"]}
    assert paths["synth_literature"] == str(tmp_path / "synth_literature")
    assert paths["synth_code"] == str(tmp_path / "synth_code")
    run = RunConfig.from_dict(cfg)
    assert run.data.tokenizer_from == "data/demo"          # the real data's tokenizer
    assert run.train.tokens_per_step * bench.STEPS == 4 * bench.UNIQUE_TOKENS


def test_resolved_config_refuses_a_config_without_the_synthetic_sources(bench, tmp_path):
    base = yaml.safe_load((ROOT / bench.STUDENT_CONFIG).read_text())
    base["data"]["sources"] = base["data"]["sources"][:2]
    with pytest.raises(SystemExit, match="synth_literature"):
        bench.resolved_config(base, tmp_path)


def test_teacher_arms_keep_the_real_budget_and_the_total_tokens(bench, tmp_path):
    """Each arm's data.unique_tokens is split over sources by mixture probability (data/loader.py):
    the real part is U in every arm but fresh (4U), and every arm trains D = 4U tokens."""
    commands = bench.seed_commands(tmp_path, tmp_path / "c.yaml", seed=3)
    share, teacher = commands[0], commands[1:]
    assert len(_option_values(share, "--mixture")) == len(bench.SHARES)
    assert "train.seed=3" in _option_values(share, "--set")
    seen = {}
    for command in teacher:
        sets = dict(item.split("=", 1) for item in _option_values(command, "--set"))
        budget = int(sets["data.unique_tokens"])
        assert int(sets["train.steps"]) * 16 * 128 == 4 * bench.UNIQUE_TOKENS
        for mixture in _option_values(command, "--mixture"):
            weights = parse_mixture(mixture)
            probs = mixture_probabilities({name: 1 for name in weights}, weights, None)
            real = sum(budget * probs[name] for name in bench.REAL)
            synthetic = sum(budget * probs.get(name, 0.0) for name in bench.SYNTHETIC)
            seen[round(real), round(synthetic)] = budget
    U = bench.UNIQUE_TOKENS
    assert seen == {(U, 0): U, (U, U): 2 * U, (U, 3 * U): 4 * U, (4 * U, 0): 4 * U}


def _write_sweep(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_tables_score_real_heldout_only(bench, tmp_path):
    def row(run, lit, code, synth):
        return {"run": run, "mixture": "x", "bpb_code": code, "bpb_literature": lit,
                "bpb_synth_code": synth, "bpb_synth_literature": synth, "bpb_mean": 99.0, "epochs_code": 1.0}
    _write_sweep(tmp_path / "sweeps" / "share_s0" / "sweep.csv",
                 [row(f"share_s0_mix{k}", 3.0 + k, 3.0 + k, 1.0) for k in range(4)])
    _write_sweep(tmp_path / "sweeps" / "ts1u_s0" / "sweep.csv", [row("ts1u_s0_mix0", 3.3, 3.1, 2.0)])
    _write_sweep(tmp_path / "sweeps" / "ts4u_s0" / "sweep.csv",
                 [row("ts4u_s0_mix0", 3.0, 2.8, 1.5), row("ts4u_s0_mix1", 2.9, 2.7, 2.5)])
    results = bench.gather(tmp_path, [0])
    assert [r["real_bpb"] for r in results["share"]] == [3.0, 4.0, 5.0, 6.0]   # the synthetic 1.0 and bpb_mean ignored
    arms = {r["arm"]: r for r in results["teacher_student"]}
    assert set(arms) == {"repeat", "teacher_3u", "fresh"}                     # ts2u missing: skipped, not invented
    assert arms["repeat"]["real_bpb"] == pytest.approx(3.2)
    assert arms["teacher_3u"]["synthetic_unique_tokens"] == 3 * bench.UNIQUE_TOKENS
    text = bench.tables(results, [0])
    assert "| 25 | 4.0000 | 4.0000 ± 0.0000 | +33.33% | +33.33% ± 0.00 | 1.0000 |" in text
    assert "| fresh | 2.8000 | 2.8000 ± 0.0000 | -12.50% | -12.50% ± 0.00 | 2.5000 |" in text


def test_tables_pair_each_seed_with_its_own_reference(bench, tmp_path):
    def row(run, bpb):
        return {"run": run, "mixture": "x", "bpb_code": bpb, "bpb_literature": bpb}
    for seed, (ref, other) in enumerate([(2.0, 2.2), (3.0, 3.6)]):   # +10% and +20%, on different baselines
        _write_sweep(tmp_path / "sweeps" / f"share_s{seed}" / "sweep.csv",
                     [row("a", ref), row("b", other), row("c", ref), row("d", ref)])
    text = bench.tables(bench.gather(tmp_path, [0, 1]), [0, 1])
    assert "| 25 | 2.2000 | 3.6000 | 2.9000 ± 0.7000 | +10.00%, +20.00% | +15.00% ± 5.00 | - |" in text
