"""Logs are one line per record off a terminal, whatever the console width; rich only on a TTY.

Each test runs a real Python process whose stderr is a file (or a pseudo-terminal), the way
Slurm, CI or `make demo > log 2>&1` see lmforge's logs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

LONG = ("checkpoint runs/corrupt/checkpoints/step_0000012: checksum mismatch for model.safetensors "
        "(expected " + "a" * 64 + ", got " + "b" * 64 + "); skipping checkpoint")
SCRIPT = f"""
from lmforge.core.logging import get_logger, track
get_logger("lmforge.test").warning({LONG!r})
for _ in track(range(5), "demo items", total=5, unit="docs"):
    pass
"""
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


def run_logging(tmp_path, columns: str | None, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "LMFORGE_PROGRESS")}
    if columns is not None:
        environ["COLUMNS"] = columns
    environ.update(env)
    log = tmp_path / f"log_{columns}.txt"
    with open(log, "w") as handle:
        subprocess.run([sys.executable, "-c", SCRIPT], stdout=handle, stderr=subprocess.STDOUT, env=environ,
                       check=True, timeout=120)
    return log.read_text()


@pytest.mark.parametrize("columns", ["60", None])
def test_a_long_record_is_one_line_in_a_log_file(tmp_path, columns):
    text = run_logging(tmp_path, columns, LMFORGE_PROGRESS_SECONDS="0")
    lines = text.splitlines()
    assert len(LONG) > 200
    assert [line for line in lines if LONG in line] == [next(line for line in lines if "WARNING" in line)]
    assert re.fullmatch(rf"{STAMP} WARNING {re.escape(LONG)}", lines[0])
    assert "\x1b[" not in text and "\r" not in text  # no colours, no live-display redraws
    # The bar became progress records with a rate, one per item here (LMFORGE_PROGRESS_SECONDS=0).
    progress = [line for line in lines if "demo items:" in line]
    assert len(progress) == 5, text
    assert re.fullmatch(rf"{STAMP} INFO demo items: 3/5 \(60%\), [\d.]+k? docs/s, 0:\d\d elapsed, eta 0:\d\d",
                        progress[2])
    assert progress[-1].endswith("elapsed") and "5/5 (100%)" in progress[-1]


SLOW_START = """
from lmforge.core.logging import RateProgress
now = [0.0]                                  # the clock, set by this script
with RateProgress("steps", total=100, unit="tokens") as bar:
    bar._time = lambda: now[0]
    bar.start, bar._window = 0.0, (0.0, 0, 0.0)
    for step in range(100):
        now[0] = 60.0 + 0.5 * step           # the first step takes 60 s (a compile), the rest 0.5 s
        bar.advance(1, units=1000)
"""


def test_progress_records_give_the_recent_rate_and_eta_after_a_slow_start(tmp_path):
    environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "LMFORGE_PROGRESS")}
    environ["LMFORGE_PROGRESS_SECONDS"] = "10"
    out = subprocess.run([sys.executable, "-c", SLOW_START], capture_output=True, text=True, env=environ,
                         check=True, timeout=120).stderr
    records = [line.split(" INFO ")[1] for line in out.splitlines() if " INFO steps:" in line]
    # the first record comes after the 60 s step: its rate and eta are all it knows
    assert records[0].startswith("steps: 1/100 (1%), 16.7 tokens/s,") and records[0].endswith("eta 1:39:00")
    # the next ones are at 0.5 s a step, 2k tokens/s: eta = steps left x 0.5 s, not the slow average
    assert records[1].startswith("steps: 21/100 (21%), 2.0k tokens/s,") and records[1].endswith("eta 0:40"), records
    # the final record is the whole run's average: 100k tokens in 60 + 99 x 0.5 = 109.5 s
    assert records[-1].startswith("steps: 100/100 (100%), 913.2 tokens/s,"), records


def test_progress_records_are_off_with_lmforge_progress_0(tmp_path):
    text = run_logging(tmp_path, None, LMFORGE_PROGRESS="0")
    assert "demo items" not in text and LONG in text


def test_by_default_a_short_job_logs_one_progress_record(tmp_path):
    text = run_logging(tmp_path, "60")  # default interval: 30 s, far longer than this job
    assert [line for line in text.splitlines() if "demo items:" in line][0].split(" INFO ")[1].startswith(
        "demo items: 5/5 (100%), ")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_a_terminal_gets_rich_output(tmp_path):
    import pty

    master, slave = pty.openpty()
    environ = {k: v for k, v in os.environ.items() if k not in ("LMFORGE_PROGRESS", "NO_COLOR")}
    environ.update(TERM="xterm-256color", COLUMNS="100")
    child = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=slave, stderr=slave, env=environ)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert child.wait(timeout=120) == 0
    text = out.decode(errors="replace")
    assert "\x1b[" in text  # colours and the live bar
    assert "demo items" in text and "━" in text
    assert not re.search(rf"{STAMP} WARNING", text)  # not the plain format
