"""Weight averaging (train/averaging.py): EMA and window averages against their definitions, saved
in checkpoints with checksums, evaluated beside the raw weights, loaded by eval/generate/export
with --weights, continued exactly after a resume and after a stability-guard rollback, and the
same under DDP and FSDP2 as in one process (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, tiny_run_dict, train_losses, write_config
from lmforge.core.checkpoint_files import safe_torch_load, step_dir_name
from lmforge.core.errors import ConfigError
from lmforge.core.io import sha256_file
from lmforge.core.metrics_file import read_metrics
from lmforge.train.assembly import build_trainer, train_run
from lmforge.train.averaging import ExponentialAverage, WindowAverage
from lmforge.train.callbacks import Callback
from lmforge.train.checkpoint import unwrap
from lmforge.train.config import RunConfig

STEPS, EVAL_EVERY, CHECKPOINT_EVERY = 12, 6, 4
DECAY, WINDOW = 0.8, 5
AVERAGING = {"ema_decay": DECAY, "window": WINDOW}


# ---- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("section, message", [
    ({"ema_decay": 1.0}, "train.weight_averaging.ema_decay: expected a decay between 0 and 1"),
    ({"ema_decay": 0}, "train.weight_averaging.ema_decay: expected a decay between 0 and 1"),
    ({"ema_decay": float("nan")}, "train.weight_averaging.ema_decay"),
    ({"window": 1}, "train.weight_averaging.window: expected a number of steps >= 2"),
    ({"start_step": -1}, "train.weight_averaging.start_step: expected a step >= 0"),
    ({"ema": 0.99}, "train.weight_averaging.ema: unknown key"),
    ({"window": "last"}, "train.weight_averaging.window: expected int or null"),
])
def test_bad_settings_are_refused_naming_the_key(section, message):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict({"train": {"weight_averaging": section}})
    assert message in str(error.value)


def test_averaging_is_off_by_default():
    assert not RunConfig.from_dict({}).train.weight_averaging.enabled
    assert RunConfig.from_dict({"train": {"weight_averaging": {"window": 10}}}).train.weight_averaging.enabled


# ---- the averages, against their definitions ------------------------------------------------------

def _weights_sequence(n: int, seed: int = 0) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)] for _ in range(n)]


def _ema_closed_form(sequence: list[list[torch.Tensor]], decay: float) -> list[torch.Tensor]:
    """E_k = d^(k-1) w_1 + sum_{j=2..k} (1-d) d^(k-j) w_j (the first update copies w_1)."""
    k = len(sequence)
    out = []
    for i in range(len(sequence[0])):
        total = decay ** (k - 1) * sequence[0][i].double()
        for j in range(2, k + 1):
            total = total + (1 - decay) * decay ** (k - j) * sequence[j - 1][i].double()
        out.append(total)
    return out


def test_ema_matches_the_closed_form():
    sequence = _weights_sequence(9)
    ema = ExponentialAverage(0.7)
    for step, weights in enumerate(sequence, start=1):
        ema.update(weights, step)
        expected = _ema_closed_form(sequence[:step], 0.7)
        assert ema.tensors is not None
        for got, want in zip(ema.tensors, expected):
            assert torch.allclose(got.double(), want, atol=1e-6)
    assert (ema.first_step, ema.updates) == (1, 9)
    assert all(t.dtype == torch.float32 for t in ema.tensors)


def test_window_is_the_mean_of_the_last_steps_where_it_is_needed():
    sequence = _weights_sequence(12, seed=1)
    needed = {2, 6, 8, 12}
    window = WindowAverage(4, lambda step: step in needed)
    most_open = 0
    for step, weights in enumerate(sequence, start=1):
        window.update(weights, step)
        most_open = max(most_open, len(window.pending))
        if step in needed:
            assert window.finished is not None and window.finished[0] == step
            first = max(1, step - 3)  # step 2: only steps 1-2 exist yet
            mean = [torch.stack([w[i] for w in sequence[first - 1:step]]).mean(0) for i in range(2)]
            assert window.finished[1].first_step == first and window.finished[1].count == step - first + 1
            for got, want in zip(window.finished[1].tensors, mean):
                assert torch.allclose(got, want, atol=1e-6)
        else:
            assert window.finished is None
    assert most_open == 2  # one running sum per needed step within a window, not one copy per step


# ---- a real tiny run ------------------------------------------------------------------------------

class WeightRecorder(Callback):
    """The raw weights after each step (a step redone after a rollback replaces its entry)."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, trainer, metrics) -> None:
        model = unwrap(trainer.model)
        self.weights[trainer.step] = {n: p.detach().clone() for n, p in model.named_parameters()}


class _Crash(Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.step == self.at:
            raise RuntimeError("simulated crash")


def _cfg(tmp: Path, corpus: Path, name: str, averaging: dict | None = AVERAGING, **train) -> RunConfig:
    raw = tiny_run_dict(tmp, corpus, name=name,
                        model={"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 32,
                               "moe": None},
                        train={"steps": STEPS, "batch_size": 2, "seq_len": 32, "log_every": 1,
                               "eval_every": EVAL_EVERY, "checkpoint_every": CHECKPOINT_EVERY, "keep_checkpoints": 5,
                               "tensorboard": False, **({"weight_averaging": averaging} if averaging else {}),
                               **train})
    raw["eval"] = {"max_tokens_per_domain": 64, "sample_tokens": 2, "sample_prompts": ["the "], "task_items": 0}
    return RunConfig.from_dict(raw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_corpus):
    """``averaged`` (weights recorded after every step), ``plain`` (no averaging) and ``resumed``
    (averaging, crashed at step 10 after the checkpoint at 8, resumed)."""
    tmp = tmp_path_factory.mktemp("averaging")
    recorder = WeightRecorder()
    train_run(_cfg(tmp, tiny_corpus, "averaged"), extra_callbacks={"recorder": recorder})
    train_run(_cfg(tmp, tiny_corpus, "plain", averaging=None))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_run(_cfg(tmp, tiny_corpus, "resumed"), extra_callbacks={"crash": _Crash(10)})
    build_trainer(_cfg(tmp, tiny_corpus, "resumed"), resume="auto").fit()
    return tmp / "runs", recorder.weights


def _checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / step_dir_name(step)


def _evals(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "eval"}


def test_saved_averages_are_the_ema_and_window_of_the_weights_of_each_step(runs):
    runs_dir, recorded = runs
    names = list(recorded[1])
    for step in (4, 8, 12):
        checkpoint = _checkpoint(runs_dir / "averaged", step)
        ema, window = load_file(str(checkpoint / "ema.safetensors")), load_file(str(checkpoint / "window.safetensors"))
        assert ema.keys() == window.keys() == load_file(str(checkpoint / "model.safetensors")).keys()
        expected_ema = _ema_closed_form([[recorded[s][n] for n in names] for s in range(1, step + 1)], DECAY)
        first = max(1, step - WINDOW + 1)  # step 4: the run has only 4 steps
        for name, want in zip(names, expected_ema):
            if name in ema:  # a tied weight is stored once
                assert torch.allclose(ema[name].double(), want, atol=1e-5), (step, name)
                mean = torch.stack([recorded[s][name] for s in range(first, step + 1)]).mean(0)
                assert torch.allclose(window[name], mean, atol=1e-6), (step, name)
                assert ema[name].dtype == torch.float32


def test_checkpoint_lists_the_averages_with_their_checksums(runs):
    run = runs[0] / "averaged"
    for step, sums in ((8, True), (12, False)):  # at 8 the window of step 12 is open (steps 8-12)
        checkpoint = _checkpoint(run, step)
        files = json.loads((checkpoint / "manifest.json").read_text())["files"]
        for name in ("ema.safetensors", "window.safetensors") + (("window_sums.safetensors",) if sums else ()):
            assert files[name]["sha256"] == sha256_file(checkpoint / name), name
        assert ("window_sums.safetensors" in files) == sums
        # trainer_state.pt names the files; their tensors are not pickled into it
        state = safe_torch_load(checkpoint / "trainer_state.pt")["callbacks"]["weight_averaging"]
        assert isinstance(state["weight_files"], list) and "ema.safetensors" in state["weight_files"]
        assert state["ema"] == {"first_step": 1, "updates": step}
    plain = json.loads((_checkpoint(runs[0] / "plain", 12) / "manifest.json").read_text())["files"]
    assert not {"ema.safetensors", "window.safetensors"} & set(plain)


def test_evaluations_report_the_averages_beside_the_raw_weights(runs):
    averaged, plain = _evals(runs[0] / "averaged"), _evals(runs[0] / "plain")
    assert sorted(averaged) == sorted(plain) == [EVAL_EVERY, STEPS]
    for step, record in averaged.items():
        # the raw weights' record is unchanged in shape and value; the averages ride beside it
        assert set(record) - {"averaged"} == set(plain[step])
        assert record["bpb"] == plain[step]["bpb"]
        assert set(record["averaged"]) == {"ema", "window"}
        for kind, result in record["averaged"].items():
            assert set(result["bpb"]) == set(record["bpb"]) == {"prose", "code"}
            assert result["bpb"] != record["bpb"], kind
        assert record["averaged"]["window"]["first_step"] == step - WINDOW + 1
        assert record["averaged"]["ema"]["steps"] == step
    for kind in ("ema", "window"):
        final = json.loads((runs[0] / "averaged" / "eval" / kind / "final.json").read_text())
        assert final["weights"] == kind and final["step"] == STEPS
        assert final["bpb"] == averaged[STEPS]["averaged"][kind]["bpb"]
        assert final["samples"] and final["isolation"]["overlap"] == 0
    from lmforge.report import write_report

    html = write_report(runs[0] / "averaged").read_text()
    from lmforge.report.plots import bpb_plot
    from lmforge.report.run_data import load_run

    # the bpb plot gains the averaged weights' curves (a different picture than the raw ones alone)
    assert bpb_plot(load_run(runs[0] / "averaged")) != bpb_plot(load_run(runs[0] / "plain")) and "bits per byte" in html


def test_averaging_leaves_the_training_itself_unchanged(runs):
    runs_dir = runs[0]
    assert train_losses(runs_dir / "averaged") == train_losses(runs_dir / "plain")
    train = [r for r in read_metrics(runs_dir / "averaged" / "metrics.jsonl") if r.get("kind") == "train"]
    assert all(r["weight_averaging_s"] >= 0 for r in train)  # its cost, logged apart from step_time_s
    a = load_file(str(_checkpoint(runs_dir / "averaged", STEPS) / "model.safetensors"))
    b = load_file(str(_checkpoint(runs_dir / "plain", STEPS) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # evaluating the averages swaps the weights back exactly


def test_a_resumed_run_keeps_identical_averages(runs):
    runs_dir = runs[0]
    assert train_losses(runs_dir / "resumed") == train_losses(runs_dir / "averaged")
    for file_name in ("model.safetensors", "ema.safetensors", "window.safetensors"):
        a = load_file(str(_checkpoint(runs_dir / "averaged", STEPS) / file_name))
        b = load_file(str(_checkpoint(runs_dir / "resumed", STEPS) / file_name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), file_name  # bit for bit
    assert _evals(runs_dir / "resumed")[STEPS]["averaged"] == _evals(runs_dir / "averaged")[STEPS]["averaged"]


# ---- loading the averages: eval, generate, export ------------------------------------------------

def _main(*argv: str) -> int:
    from lmforge.cli.main import main

    return main(list(argv))


def test_eval_with_window_weights_reproduces_the_training_evaluation(runs):
    run = runs[0] / "averaged"
    assert _main("eval", str(run), "--weights", "window", "--device", "cpu") == 0
    result = json.loads((run / "eval" / "window" / f"{step_dir_name(STEPS)}.json").read_text())
    assert result["weights"] == "window"
    logged = _evals(run)[STEPS]["averaged"]["window"]["bpb"]
    for domain, value in logged.items():
        assert result["bpb"][domain] == pytest.approx(value, abs=1e-6)


def test_generate_and_load_model_with_ema_weights(runs, capsys):
    from lmforge.nn.loading import load_model

    run = runs[0] / "averaged"
    assert _main("generate", str(run), "--weights", "ema", "--prompt", "the king", "--max-new-tokens", "4",
                 "--temperature", "0", "--device", "cpu") == 0
    assert capsys.readouterr().out.startswith("the king")
    model, _, checkpoint = load_model(run, weights="ema")
    saved = load_file(str(checkpoint / "ema.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    raw, _, _ = load_model(run)
    assert any(not torch.equal(raw.state_dict()[k], v) for k, v in saved.items())


def test_missing_averages_are_one_clear_error(runs, capsys):
    plain = runs[0] / "plain"
    assert _main("generate", str(plain), "--weights", "ema", "--prompt", "the", "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert "no checkpoint of the run holds ema weights (ema.safetensors)" in err
    assert "train.weight_averaging.ema_decay" in err and "Traceback" not in err
    assert _main("eval", str(_checkpoint(plain, STEPS)), "--weights", "window", "--device", "cpu") == 2
    assert "holds no window weights (window.safetensors)" in capsys.readouterr().err
    assert not (plain / "eval" / "window").exists()


def test_export_writes_the_ema_weights(runs, tmp_path, capsys):
    pytest.importorskip("transformers")
    assert _main("export", str(runs[0] / "averaged"), "--weights", "ema", "--out", str(tmp_path / "hf")) == 0
    assert "exported the ema weights of" in capsys.readouterr().out
    assert (tmp_path / "hf" / "config.json").is_file()


# ---- a stability-guard rollback -------------------------------------------------------------------

def test_after_a_rollback_the_averages_follow_the_weights_back(tmp_path, tiny_corpus, monkeypatch, records):
    from lmforge.train import faults

    monkeypatch.setattr(faults, "NAN_AT", 6)  # the loss of step 6 is NaN: skipped, then a rollback to step 4
    recorder = WeightRecorder()
    cfg = _cfg(tmp_path, tiny_corpus, "rollback", guard={"rollback": True})
    run = train_run(cfg, extra_callbacks={"recorder": recorder})
    assert any("read back from" in r.getMessage() and "step_0000004" in r.getMessage() for r in records)
    names = list(recorder.weights[1])
    # the history that stands: steps 1-4, then 5-12 redone after the rollback (each step once)
    ema = load_file(str(_checkpoint(run, STEPS) / "ema.safetensors"))
    expected = _ema_closed_form([[recorder.weights[s][n] for n in names] for s in range(1, STEPS + 1)], DECAY)
    for name, want in zip(names, expected):
        if name in ema:
            assert torch.allclose(ema[name].double(), want, atol=1e-5), name
    state = safe_torch_load(_checkpoint(run, STEPS) / "trainer_state.pt")["callbacks"]["weight_averaging"]
    assert state["ema"]["updates"] == STEPS and state["finished"]["count"] == WINDOW


# ---- several processes (slow) ---------------------------------------------------------------------

def _torchrun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "LMFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "lmforge", *args]
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=600)


@pytest.fixture(scope="module")
def distributed_setup(tmp_path_factory, tiny_corpus):
    tmp = tmp_path_factory.mktemp("averaging_dist")
    cfg = tiny_run_dict(tmp, tiny_corpus,
                        model={"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 32,
                               "moe": None},
                        train={"steps": 8, "batch_size": 4, "seq_len": 32, "log_every": 1, "eval_every": 4,
                               "checkpoint_every": 4, "keep_checkpoints": 3, "tensorboard": False,
                               "weight_averaging": {"ema_decay": DECAY, "window": 3}})
    cfg["eval"] = {"max_tokens_per_domain": 64, "sample_tokens": 2, "sample_prompts": ["the "], "task_items": 0}
    config = write_config(tmp / "run.yaml", cfg)
    result = run_cli("train", str(config), "--set", "name=single", "--no-report")
    assert result.returncode == 0, result.stderr
    return tmp / "runs", config


def _assert_averages_close(runs_dir: Path, a: str, b: str, steps: tuple[int, ...]) -> None:
    # Gradients summed in another order differ in the last bits (see test_distributed.py).
    la, lb = train_losses(runs_dir / a), train_losses(runs_dir / b)
    assert sorted(la) == sorted(lb) == list(range(1, 9))
    assert all(abs(la[s] - lb[s]) <= 2e-4 * abs(la[s]) for s in la)
    for step in steps:
        for file_name in ("ema.safetensors", "window.safetensors"):
            x = load_file(str(_checkpoint(runs_dir / a, step) / file_name))
            y = load_file(str(_checkpoint(runs_dir / b, step) / file_name))
            assert x.keys() == y.keys()
            assert max((x[k] - y[k]).abs().max().item() for k in x) < 1e-4, (step, file_name)
    ea, eb = _evals(runs_dir / a), _evals(runs_dir / b)
    for step in ea:  # the averages evaluated mid-run (swapped into the sharded model) agree too
        for kind in ("ema", "window"):
            for domain, value in ea[step]["averaged"][kind]["bpb"].items():
                assert eb[step]["averaged"][kind]["bpb"][domain] == pytest.approx(value, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_keep_the_averages_of_one(distributed_setup, mode):
    runs_dir, config = distributed_setup
    result = _torchrun("train", str(config), "--set", f"name=two_{mode}", "--set", f"train.data_parallel={mode}",
                       "--no-report")
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_averages_close(runs_dir, "single", f"two_{mode}", (4, 8))
    assert (runs_dir / f"two_{mode}" / "eval" / "ema" / "final.json").is_file()


@pytest.mark.slow
def test_averages_saved_by_fsdp_resume_in_one_process(distributed_setup):
    runs_dir, config = distributed_setup
    crashed = _torchrun("train", str(config), "--set", "name=fsdp_to_one", "--set", "train.data_parallel=fsdp",
                        "--no-report", env={"LMFORGE_CRASH_AT_STEP": "6"})
    assert crashed.returncode != 0
    resumed = run_cli("train", str(config), "--set", "name=fsdp_to_one", "--resume", "auto", "--no-report")
    assert resumed.returncode == 0, resumed.stderr
    _assert_averages_close(runs_dir, "single", "fsdp_to_one", (8,))
