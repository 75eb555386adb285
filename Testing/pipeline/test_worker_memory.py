"""The worker's allocator settings (glibc): freed blocks are kept for the next tile, and given back between tasks."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="mallopt and malloc_trim are glibc's; elsewhere the worker changes nothing")

_PROBE = """
import numpy as np
from SegRapSegmenterLib.pipeline import give_back_freed_memory, reuse_freed_memory

def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) // 1024

took = {reuse} and reuse_freed_memory()
before = anon_mb()
blocks = [np.ones(1 << 20, np.uint8) for _ in range(200)]  # 200 blocks of 1 MiB, each touched
blocks.append(np.ones(1 << 10, np.uint8))  # a small block on top, as a tile's leftovers would be
held = anon_mb()
del blocks[:-1]
freed = anon_mb()
give_back_freed_memory()
print(took, held - before, freed - before, anon_mb() - before)
"""


def _run(reuse: bool) -> tuple[bool, int, int, int]:
    done = subprocess.run([sys.executable, "-c", _PROBE.format(reuse=reuse)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    took, held, freed, trimmed = done.stdout.split()
    return took == "True", int(held), int(freed), int(trimmed)


def test_freed_blocks_stay_for_reuse_until_they_are_given_back():
    took, held, freed, trimmed = _run(reuse=True)
    assert took, "mallopt refused the settings"
    assert held >= 190
    assert freed >= 150, "the freed blocks should stay in the heap"
    assert trimmed <= 40, "malloc_trim should give them back"


def test_without_the_settings_glibc_unmaps_them_at_once():
    took, held, freed, trimmed = _run(reuse=False)
    assert not took
    assert held >= 190
    assert freed <= 40  # 1 MiB blocks are above glibc's default mmap threshold: unmapped when freed
