"""The allocator setting stops the page-fault churn of large tensors."""

import os
import subprocess
import sys

import pytest

from xception.runtime import keep_freed_memory

CHURN = """
import resource, torch
from xception.runtime import keep_freed_memory
assert keep_freed_memory()
def churn():  # six 24 MiB maps alive at once, then all freed: a step's feature maps
    maps = [torch.ones(6 * 1024 * 1024) for _ in range(6)]
    return sum(float(m[0]) for m in maps)
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_reuses_large_blocks_instead_of_faulting_them_in_again():
    # With the setting, ten rounds of freed and reallocated maps fault in less than one
    # round's pages: the blocks are reused. glibc's defaults returned the memory and faulted
    # it in again in most runs (43k-368k faults for these ten rounds, against 6-12k).
    import resource

    env = {**os.environ, "XCEPTION_KEEP_FREED_MEMORY": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHURN], check=True, capture_output=True, text=True, env=env
    )
    one_round = 6 * 24 * 1024 * 1024 // resource.getpagesize()
    assert int(out.stdout) < one_round


def test_keep_freed_memory_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("XCEPTION_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False
