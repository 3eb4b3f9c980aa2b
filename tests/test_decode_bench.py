"""bench/decode.py: batch-1 decode speed against the memory-bandwidth bound, on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2", "--set", "model.n_kv_heads=1",
        "--vocab-size", "512", "--new-tokens", "32", "--prompt-tokens", "4", "--rounds", "3", "--dtype", "fp32",
        "--device", "cpu", "--bandwidth-mib", "16"]


@pytest.mark.parametrize("tied", [True, False])
def test_decode_reports_its_rate_and_the_bytes_a_token_reads(tied):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "decode.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
                          *TINY, "--set", f"model.tie_embeddings={str(tied).lower()}"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    result = json.loads(out.stdout)
    head = 512 * 32  # the LM head's matrix is read for every token; of the input embedding, one row
    assert result["parameters_read_per_token"] == (result["parameters"] if tied else result["parameters"] - head)
    assert result["weight_bytes"] == 4 * result["parameters_read_per_token"]
    # keys and values of 2 layers x 1 head x 16 dims, at the mean context 4 + 32 / 2, fp32
    assert result["mean_kv_bytes"] == 2 * 2 * 1 * 16 * 20 * 4
    assert result["decode_tokens_per_s"] > 0 and result["bandwidth_bound_tokens_per_s"] > 0
    assert result["fraction_of_bound"] == pytest.approx(
        result["decode_tokens_per_s"] / result["bandwidth_bound_tokens_per_s"], abs=1e-3)  # rounded to 3 places
