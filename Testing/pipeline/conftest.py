"""One real end-to-end run of `segrap segment` with the demo bundle, shared by the pipeline tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from SegRapSegmenterLib.phantom import cases as phantom

HELD_OUT_SEED = 99  # the demo model was trained on cohort 2023; this cohort it never saw


@pytest.fixture(scope="session")
def heldout_case(tmp_path_factory) -> tuple[phantom.PhantomCase, phantom.CasePaths]:
    case = phantom.make_case(0, seed=HELD_OUT_SEED, size="small")
    return case, phantom.write_case(case, tmp_path_factory.mktemp("heldout"))


@pytest.fixture(scope="session")
def segment_run(heldout_case, tmp_path_factory) -> dict:
    """`segrap segment --json --nifti` on the held-out case: its events, outputs and exit code."""
    case, paths = heldout_case
    out = tmp_path_factory.mktemp("segment_out")
    proc = subprocess.run(
        [sys.executable, "-m", "SegRapSegmenterLib.cli", "segment", "--ct", str(paths.ct), "--contrast-ct",
         str(paths.contrast_ct), "--out", str(out), "--bundle", "demo", "--device", "cpu", "--nifti", "--json"],
        capture_output=True, text=True, timeout=900)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return {"returncode": proc.returncode, "events": events, "out": Path(out), "stderr": proc.stderr,
            "case": case, "paths": paths}
