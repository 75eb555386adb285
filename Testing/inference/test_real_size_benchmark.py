"""The real-size benchmark works: its smoke mode runs ours and stock nnU-Net on the ResEnc L bundle and prints the table.

A test that the benchmark runs, not a timing: figures are checked for presence and sense, never
against targets (those live in the benchmark's output and docs/performance.md).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from SegRapSegmenterLib.formats.segfile import read_seg_nrrd

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_real_size.py"


def test_smoke_run_segments_with_ours_and_stock_and_prints_the_figures_last(tmp_path):
    results = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(BENCH), "--smoke", "--work", str(tmp_path / "work"), "--results",
                           str(results)], check=False, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-6:]
    assert any(line.startswith("ours/stock, mirroring off: wall time") for line in last), done.stdout[-2000:]
    report = json.loads(results.read_text())
    assert "SMOKE" in " ".join(report["notes"]) and report["folds"] == 1
    assert set(report["runs"]) == {"stock, mirror off", "ours, mirror off"}
    for run in report["runs"].values():
        assert run["exit"] == 0 and run["wall_s"] > 0 and run["peak_host_gib"] > 0.1
    ours, stock = report["runs"]["ours, mirror off"], report["runs"]["stock, mirror off"]
    assert report["ratios"]["off"]["wall"] == round(ours["wall_s"] / stock["wall_s"], 3)
    stages = ours["tasks"]["oar"]["timings_s"]
    assert stages["network"] > 0 and set(stages) == {"preprocess", "network", "labels", "scores"}
    # both produced labels on the case's grid
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(stock["labels"]["oar"]))
    assert theirs.shape == (16, 64, 64) and theirs.max() < 55
    masks = read_seg_nrrd(Path(ours["labels"])).masks
    assert len(masks) >= 45 and all(np.asarray(m).shape == (16, 64, 64) for m in masks.values())
    shutil.rmtree(tmp_path / "work" / "home", ignore_errors=True)  # the installed weights (0.5 GB)
