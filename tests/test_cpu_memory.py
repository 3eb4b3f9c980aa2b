"""train.keep_freed_memory: freed activations stay in the process, so the next step does not fault
the same pages in again (counted as the kernel counts them: minor page faults, in a fresh process
each, since malloc settings are process-wide)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

# A step-like pattern: five 8 MiB activations written, then all freed, ten times over.
PATTERN = """
import json, resource, sys, torch
if sys.argv[1] == "keep":
    from lmforge.core.cpu_memory import keep_freed_memory
    assert keep_freed_memory()
def step():
    held = [torch.ones(2**21) for _ in range(5)]
    del held
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_is_reused_without_page_faults():
    default, kept = faults("default"), faults("keep")
    pages = 10 * 5 * (8 * 2**20) // 4096  # what faulting every activation in again would cost
    # glibc's defaults give part of the memory back each step and fault it in again (a third of
    # the pages on the machine this was written on); kept, only the first step's pages fault
    assert kept < pages // 20 < default


def test_the_setting_is_a_config_option_that_is_on_by_default():
    from lmforge.train.config import TrainConfig

    assert TrainConfig().keep_freed_memory is True
    assert TrainConfig.from_dict({"keep_freed_memory": False}).keep_freed_memory is False
