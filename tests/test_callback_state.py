"""Callback state in checkpoints is keyed by the callback's name: a resume hands each callback
its own state even when callbacks were added before it, warns about state of a callback the run
no longer has, and still resumes checkpoints whose callback states were a list (lmforge up to
commit cdee255). A real tiny run, crashed after its first checkpoint and resumed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_run_dict
from lmforge.core.checkpoint_files import safe_torch_load, step_dir_name, verify_checkpoint_dir
from lmforge.core.io import sha256_file
from lmforge.train.assembly import build_trainer, train_run
from lmforge.train.callbacks import Callback
from lmforge.train.config import RunConfig

STEPS, CHECKPOINT_EVERY, CRASH_AT = 8, 4, 6


class StatefulCallback(Callback):
    """Counts the steps it has seen; the count is its checkpointed state."""

    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, trainer, metrics) -> None:
        self.steps += 1

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


class OtherStateful(Callback):
    """Has state of another shape, and remembers what a resume handed it."""

    def __init__(self) -> None:
        self.loaded: dict | None = None

    def state_dict(self) -> dict:
        return {"seen": "other"}

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state


class _Crash(Callback):
    def on_step_end(self, trainer, metrics) -> None:
        if trainer.step == CRASH_AT:
            raise RuntimeError("simulated crash")


def _cfg(tmp: Path, corpus: Path, name: str) -> RunConfig:
    raw = tiny_run_dict(tmp, corpus, name=name,
                        model={"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 32,
                               "moe": None},
                        train={"steps": STEPS, "batch_size": 2, "seq_len": 32, "log_every": 1, "eval_every": 0,
                               "checkpoint_every": CHECKPOINT_EVERY, "keep_checkpoints": 2, "tensorboard": False})
    raw["eval"] = {"max_tokens_per_domain": 64, "sample_tokens": 2, "sample_prompts": ["the "]}
    return RunConfig.from_dict(raw)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, tiny_corpus):
    """A run that crashed at step 6, its checkpoint at step 4 holding the counter's state."""
    tmp = tmp_path_factory.mktemp("callbacks")
    counter = StatefulCallback()
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_run(_cfg(tmp, tiny_corpus, "crashed"), extra_callbacks={"counter": counter, "crash": _Crash()})
    assert counter.steps == CRASH_AT
    return tmp, tiny_corpus


def _copy(crashed, name: str) -> tuple[RunConfig, Path]:
    tmp, corpus = crashed
    shutil.copytree(tmp / "runs" / "crashed", tmp / "runs" / name)
    return _cfg(tmp, corpus, name), tmp / "runs" / name / "checkpoints" / step_dir_name(CHECKPOINT_EVERY)


def _saved_callbacks(checkpoint: Path):
    return safe_torch_load(checkpoint / "trainer_state.pt")["callbacks"]


def test_a_callback_gets_its_own_state_back_when_another_is_inserted_before_it(crashed):
    cfg, checkpoint = _copy(crashed, "by_name")
    saved = _saved_callbacks(checkpoint)
    assert saved["counter"]["steps"] > 0
    another, counter = OtherStateful(), StatefulCallback()
    trainer = build_trainer(cfg, resume="auto", extra_callbacks={"another": another, "counter": counter})
    assert trainer.step == CHECKPOINT_EVERY
    names = list(trainer.callbacks)
    assert names.index("another") < names.index("counter")  # a positional restore would mix them up
    assert counter.steps == saved["counter"]["steps"]
    assert another.loaded is None  # the checkpoint holds nothing under its name
    trainer.fit()
    assert counter.steps == saved["counter"]["steps"] + STEPS - CHECKPOINT_EVERY


def test_a_resumed_callback_sees_every_step_once(crashed):
    cfg, _ = _copy(crashed, "every_step")
    counter = StatefulCallback()
    build_trainer(cfg, resume="auto", extra_callbacks={"counter": counter}).fit()
    assert counter.steps == STEPS  # as in a run that never crashed


def test_state_of_a_callback_the_run_no_longer_has_is_reported(crashed, records):
    cfg, _ = _copy(crashed, "dropped")
    another = OtherStateful()
    trainer = build_trainer(cfg, resume="auto", extra_callbacks={"another": another})
    trainer.run_lock.release()
    assert trainer.step == CHECKPOINT_EVERY and another.loaded is None
    messages = [r.getMessage() for r in records]
    assert "checkpoint holds state of callback 'counter', which this run does not use" in messages
    assert not any("'crash'" in m for m in messages)  # its state was empty: nothing to report


def _rewrite_trainer_state(checkpoint: Path, edit) -> None:
    """Change trainer_state.pt as an older lmforge would have written it, keeping the checkpoint
    valid: its sha256 and size in manifest.json follow."""
    state = safe_torch_load(checkpoint / "trainer_state.pt")
    edit(state)
    torch.save(state, checkpoint / "trainer_state.pt")
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["trainer_state.pt"] = {"sha256": sha256_file(checkpoint / "trainer_state.pt"),
                                             "bytes": (checkpoint / "trainer_state.pt").stat().st_size}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    verify_checkpoint_dir(checkpoint)


@pytest.mark.parametrize("with_state", [False, True])
def test_a_checkpoint_with_callback_states_as_a_list_still_resumes(crashed, records, with_state):
    cfg, checkpoint = _copy(crashed, f"listed_{with_state}")
    saved = _saved_callbacks(checkpoint)
    unnamed = [state if with_state else {} for state in saved.values()]  # the old format: in order, no names
    _rewrite_trainer_state(checkpoint, lambda state: state.update(callbacks=unnamed))
    another, counter = OtherStateful(), StatefulCallback()
    trainer = build_trainer(cfg, resume="auto", extra_callbacks={"another": another, "counter": counter})
    assert trainer.step == CHECKPOINT_EVERY  # the rewritten checkpoint was the one resumed
    assert counter.steps == 0 and another.loaded is None  # unnamed states are handed to no one
    warned = "this checkpoint's callback states are unnamed (older lmforge); they are not restored"
    assert (warned in [r.getMessage() for r in records]) == with_state
    assert trainer.fit().name == "listed_" + str(with_state)
    assert trainer.step == STEPS
