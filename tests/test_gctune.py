"""The gateway process's collector settings (addon/gctune.py), applied when mitmproxy runs.

In a subprocess: freezing and re-thresholding the collector is process-wide, not for the test runner."""

from __future__ import annotations

import subprocess
import sys

from .dbutil import ROOT

SCRIPT = """
import gc
from addon import gctune
before = gc.get_threshold()
cycle = []
cycle.append(cycle)  # garbage: collected before the freeze, never frozen
del cycle
gctune.tune()
frozen = gc.get_freeze_count()
gctune.tune()  # a second run (mitmproxy reloading the addon) changes nothing
print(before, gc.get_threshold(), frozen > 1000, gc.get_freeze_count() == frozen, gc.garbage == [])
"""


def test_the_start_up_heap_is_frozen_once_and_young_collections_come_less_often() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(700, 10, 10) (700, 10, 10) True True True", out.stdout
