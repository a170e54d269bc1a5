"""The allocator setting stops the page-fault churn of large tensors."""

import os
import subprocess
import sys

import pytest

from xception.runtime import keep_freed_memory

CHURN = """
import resource, sys, torch
from xception.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def churn():  # four 20 MiB maps alive at once, then all freed: a step's feature maps
    maps = [torch.ones(5 * 1024 * 1024) for _ in range(4)]
    return sum(float(m[0]) for m in maps)
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    env = {**os.environ, "XCEPTION_KEEP_FREED_MEMORY": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode], check=True, capture_output=True, text=True, env=env
    )
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_reuses_large_blocks_instead_of_faulting_them_in_again():
    default, kept = page_faults("default"), page_faults("keep")
    # 10 rounds x 80 MiB is ~200k fresh pages when every map is mapped afresh.
    assert kept * 3 < default, (kept, default)


def test_keep_freed_memory_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("XCEPTION_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False
