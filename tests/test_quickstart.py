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
    html = (run / "report.html").read_text()
    assert "literature" in html and "code" in html
