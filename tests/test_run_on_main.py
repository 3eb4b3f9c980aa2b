"""``run_on_main`` in a real two-process gloo group: whatever rank 0's work raises reaches the
other rank at once (an OSError from a write that fails as LmforgeError "rank 0 failed: ..."),
instead of leaving it waiting in the next collective until the process-group timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import json, os, resource, signal, sys, time
    from datetime import timedelta
    from pathlib import Path
    import torch.distributed as dist
    from lmforge.core import distributed
    from lmforge.core.errors import DataError
    from lmforge.train.run_dir import record_resume

    rank, folder = int(sys.argv[1]), Path(sys.argv[2])
    # Short enough that a rank left waiting fails the test quickly, not after 30 minutes.
    dist.init_process_group("gloo", init_method=f"file://{folder / 'store'}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    outcomes = []

    def attempt(fn):
        try:
            outcomes.append({"value": distributed.run_on_main(fn)})
        except Exception as exc:
            outcomes.append({"type": type(exc).__name__, "message": str(exc),
                             "errno": getattr(exc, "errno", None)})

    def refused():
        raise DataError("the data folder is gone")

    def append_to_a_full_file():
        # A file-size limit of 0 (as on a full disk, the write fails) for this process only.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
        try:
            record_resume(folder / "run", 4, None, [], [])
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    attempt(lambda: "written")
    attempt(refused)
    attempt(append_to_a_full_file)
    (folder / f"rank{rank}.json").write_text(json.dumps(outcomes))
    # Rank 0 stays alive until rank 1 is done, as a training process cleaning up would: a rank 1
    # that was never told waits for its timeout rather than seeing rank 0's connection close.
    deadline = time.monotonic() + 60
    while rank == 0 and not (folder / "rank1.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    distributed.exit_process(0)
""")


def test_any_error_on_rank_0_reaches_the_other_rank(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMFORGE_PROGRESS": "0"}
    ranks = [subprocess.Popen([sys.executable, "-c", CHILD, str(rank), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        output = [process.communicate(timeout=300)[0] for process in ranks]
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
    assert [process.returncode for process in ranks] == [0, 0], output
    main, other = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert main[0] == {"value": "written"} and other[0] == {"value": None}
    assert main[1]["type"] == other[1]["type"] == "DataError"  # an lmforge error: as itself
    assert main[1]["message"] == other[1]["message"] == "the data folder is gone"
    assert main[2]["type"] == "OSError" and main[2]["message"].startswith("[Errno 27] File too large")
    assert other[2] == {"type": "LmforgeError", "errno": None,
                        "message": f"rank 0 failed: OSError: {main[2]['message']}"}
