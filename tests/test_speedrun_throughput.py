"""bench/train_throughput.py and the calibration of bench/speedrun.py: per-round ratios with their
range, the CPU-time clock, Hugging Face's eager attention, and the refusal of architecture
options Hugging Face Llama cannot represent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_run_dict, write_config

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 32}


def _bench(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args],
                          capture_output=True, text=True, env=env, timeout=600)


def _tiny_config(tmp_path: Path, **model) -> Path:
    return write_config(tmp_path / "tiny_model.yaml", {"model": {**TINY_MODEL, **model}})


def _throughput(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return _bench("train_throughput.py", "--config", str(config), "--vocab-size", "256", "--batch-size", "2",
                  "--seq-len", "16", "--steps", "1", "--rounds", "3", "--warmup", "1", *extra)


def test_throughput_reports_per_round_ratios_on_the_process_clock(tmp_path):
    pytest.importorskip("transformers")
    result = _throughput(_tiny_config(tmp_path), "--clock", "process", "--hf-attention", "eager")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["clock"] == "process" and report["lmforge_mfu"] is None  # no MFU against a wall-clock peak
    assert report["hf_model"] == "LlamaForCausalLM (eager attention)"
    spread = report["ratio_lmforge_over_hf_over_rounds"]
    assert 0 < spread["min"] <= spread["median"] <= spread["max"]


def test_throughput_refuses_a_hugging_face_row_for_options_llama_lacks(tmp_path):
    result = _throughput(_tiny_config(tmp_path, mlp_activation="relu2", value_embeddings=True))
    assert result.returncode != 0
    assert "model.mlp_activation" in result.stderr and "model.value_embeddings" in result.stderr
    assert "--no-hf" in result.stderr
    alone = _throughput(_tiny_config(tmp_path, mlp_activation="relu2", value_embeddings=True), "--no-hf")
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert json.loads(alone.stdout)["lmforge_tokens_per_s"] > 0


@pytest.mark.slow
def test_speedrun_calibrate_only_gives_every_config_its_rate(tmp_path, tiny_corpus):
    config = write_config(tmp_path / "tiny.yaml", tiny_run_dict(tmp_path, tiny_corpus))
    out = tmp_path / "calibration"
    result = _bench("speedrun.py", f"a={config}", f"b={config}+model.attention.kernel=explicit", "--calibrate-only",
                    "--calibration-rounds", "2", "--clock", "process", "--threads", "1", "--no-hf", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "calibration.json").read_text())
    assert set(report["tokens_per_s"]) == {"a", "b"} and all(v > 0 for v in report["tokens_per_s"].values())
    assert report["ratio_to_baseline"]["a"] == 1.0
    missing = _bench("speedrun.py", str(config), "--out", str(out))
    assert missing.returncode != 0 and "--seconds" in missing.stderr


def test_matmul_shapes_bench_times_seen_and_new_shapes_and_refuses_too_many_calls():
    result = _bench("matmul_shapes.py", "--rows", "64", "--d-in", "8", "--d-out", "16", "--calls", "8", "--rounds", "2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for dtype in ("float32", "bfloat16"):
        timing = report[dtype]
        assert timing["same_shape_us"] > 0 and timing["new_shape_us"] > 0 and timing["new_over_same"] > 0
    refused = _bench("matmul_shapes.py", "--rows", "16", "--calls", "9")
    assert refused.returncode != 0 and "--calls" in refused.stderr


def test_throughput_variants_train_in_the_same_rounds_and_bad_specs_are_refused(tmp_path):
    config = _tiny_config(tmp_path, moe={"n_experts": 4, "top_k": 2})
    result = _throughput(config, "--no-hf", "--clock", "process", "--adamw", "default",
                         "--variant", "unpadded:moe.expert_rows_multiple=1", "--variant", "narrow:moe.d_expert=16",
                         "--variant", "batched:moe.expert_compute=batched", "--variant", "batched:moe.expert_rows_multiple=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["adamw"] == "default"
    variants = json.loads(result.stdout)["variants"]
    assert set(variants) == {"unpadded", "batched", "narrow"}
    base_params = json.loads(result.stdout)["params_total"]
    assert variants["unpadded"]["params_total"] == base_params
    assert variants["narrow"]["params_total"] < base_params  # the override reached the variant's model
    assert variants["batched"]["overrides"] == ["batched:moe.expert_compute=batched", "batched:moe.expert_rows_multiple=1"]
    per_round = json.loads(result.stdout)["tokens_per_s_per_round"]
    assert set(per_round) == {"lmforge", "dense", "unpadded", "batched", "narrow"}
    assert len({len(values) for values in per_round.values()}) == 1 and min(map(min, per_round.values())) > 0
    for report in variants.values():
        assert report["tokens_per_s"] > 0
        for key in ("ratio_over_lmforge_over_rounds", "ratio_over_dense_over_rounds"):
            assert 0 < report[key]["min"] <= report[key]["median"] <= report[key]["max"]
    for spec, message in (("no_colon", "NAME:KEY=VALUE"), ("dense:d_ff=64", "taken"),
                          ("wide:moe.expert_compute=fast", "expert_compute")):
        refused = _throughput(config, "--no-hf", "--variant", spec)
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr[-2000:]
        assert "Traceback" not in refused.stderr and "--variant" in refused.stderr


def test_moe_layer_bench_splits_the_layer_against_the_dense_feed_forward(tmp_path):
    config = _tiny_config(tmp_path, moe={"n_experts": 4, "top_k": 2})
    result = _bench("moe_layer.py", "--config", str(config), "--tokens", "64", "--calls", "1", "--rounds", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    ms = report["ms_per_call"]
    assert set(ms) == {"dense", "experts", "moe", "moe_routed"} and all(v > 0 for v in ms.values())
    assert report["routing_dispatch_combine_ms"] == pytest.approx(ms["moe"] - ms["experts"], abs=0.011)
    assert report["routing_ms"] == pytest.approx(ms["moe"] - ms["moe_routed"], abs=0.011)
    assert report["dispatch_combine_ms"] == pytest.approx(ms["moe_routed"] - ms["experts"], abs=0.011)
    assert set(report["ratios_per_round"]) == {"experts / dense", "moe / dense", "moe / experts", "moe_routed / experts"}
    assert report["moe_kernel"] == "loop" and report["run_lengths"] == report["slots_per_expert"]  # fp32: no padding
    assert sum(report["slots_per_expert"]) == 64 * 2
    kernels = _bench("moe_layer.py", "--config", str(config), "--tokens", "256", "--calls", "1", "--rounds", "2",
                     "--precision", "bf16", "--kernel", "loop")  # enough slots per expert for auto to batch
    assert kernels.returncode == 0, kernels.stderr[-3000:]
    report = json.loads(kernels.stdout)
    assert report["moe_kernel"] == "batched" and report["ms_per_call"]["moe_loop"] > 0
    assert len(set(report["run_lengths"])) == 1 and report["run_lengths"][0] % 64 == 0  # one block, 64-row multiple
    assert report["ratios_per_round"]["moe / moe_loop"] > 0
    dense_only = _bench("moe_layer.py", "--config", str(_tiny_config(tmp_path)))
    assert dense_only.returncode != 0 and "model.moe" in dense_only.stderr
    shared = _bench("moe_layer.py", "--config", str(_tiny_config(tmp_path, moe={"n_experts": 4, "n_shared_experts": 1})))
    assert shared.returncode != 0 and "n_shared_experts" in shared.stderr and "Traceback" not in shared.stderr


def test_optimizer_step_bench_times_the_three_adamw_implementations(tmp_path):
    result = _bench("optimizer_step.py", "--config", str(_tiny_config(tmp_path)), "--vocab-size", "64",
                    "--steps", "1", "--rounds", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert set(report["ms_per_step"]) == {"default", "foreach", "fused"}
    assert all(ms > 0 for ms in report["ms_per_step"].values()) and report["default_over_fused_per_round"] > 0
    assert report["tensors"] > 0 and report["parameters"] > 0
