"""The quickstart end to end on the real demo corpus (slow: a few minutes on 2 cores)."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    result = run_cli("quickstart", "--set", "train.steps=40", "--set", "train.eval_every=20", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "quickstart"
    final = json.loads((run / "eval" / "final.json").read_text())
    assert set(final["bpb"]) == {"literature", "code"}
    assert all(0 < v < 10 for v in final["bpb"].values())
    manifest = json.loads((run / "data_manifest.json").read_text())
    for domain in ("literature", "code"):  # held-out sets big enough to trust, each bpb with its interval
        heldout = manifest["sources"][domain]["heldout"]
        assert heldout["documents"] >= 5 and heldout["tokens"] >= 100_000
        low, high = final["bpb_interval"][domain]
        assert low < final["bpb"][domain] < high and final["interval_unit"][domain] == "document"
    html = (run / "report.html").read_text()
    assert "literature" in html and "code" in html
