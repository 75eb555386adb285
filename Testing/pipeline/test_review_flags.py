"""The review flag on a run that goes wrong: a CT reconstructed with a 3 mm smoothing kernel (a soft-tissue kernel and
a thick reconstruction the demo model never saw) makes it miss structures; the ones it gets badly wrong are
flagged, and the CLI says so. docs/quality.md has the full benchmark (Testing/benchmarks/bench_quality.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import SimpleITK as sitk
from SegRapSegmenterLib.demo import score_against_truth
from SegRapSegmenterLib.phantom import cases as phantom

HELD_OUT_SEED = 99


def test_badly_wrong_structures_are_flagged_and_the_summary_names_them(tmp_path):
    case = phantom.make_case(0, seed=HELD_OUT_SEED, size="small")
    paths = phantom.write_case(case, tmp_path / "case")
    smoothed = sitk.SmoothingRecursiveGaussian(sitk.ReadImage(str(paths.ct)), 3.0)
    sitk.WriteImage(smoothed, str(paths.ct))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "SegRapSegmenterLib.cli", "segment", "--ct", str(paths.ct),
                           "--tasks", "oar", "--out", str(out), "--bundle", "demo", "--device", "cpu"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    provenance = json.loads(next(out.glob("*.provenance.json")).read_text())
    scores = score_against_truth(case, next(out.glob("*.seg.nrrd")))
    structures = provenance["structures"]
    bad = [n for n in structures if scores[n] < 0.5]
    good = [n for n in structures if scores[n] >= 0.9]
    assert len(bad) >= 3, f"the fault did not hurt the model; pick a harsher one ({sorted(scores.items())[:5]})"
    missed = [n for n in bad if not structures[n]["review"]]
    assert len(missed) <= 0.2 * len(bad), f"not flagged although DSC < 0.5: {missed}"
    assert sum(structures[n]["review"] for n in good) <= max(1, 0.1 * len(good))
    # the summary line names the flagged structures (stdout, after the outputs)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("review ") and all(n in last for n in provenance["review"]["flagged"])
    # the confidence ranks the structures by their true DSC: bad ones lower than good ones, nearly always
    pairs = [(structures[b]["confidence"], structures[g]["confidence"]) for b in bad for g in good]
    if pairs:
        assert np.mean([b < g for b, g in pairs]) >= 0.9
