"""The demo job: write a phantom case, segment it with the phantom-trained demo bundle, score it.

This is the README's main-job command. It runs the same worker process as ``segrap segment`` and
then compares the result with the phantom's truth (DSC per structure), so what it prints is
measured, not claimed. The demo model has only ever seen the synthetic phantom.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .anatomy import structures as S
from .console import ProgressPrinter
from .errors import EXIT_OK, exit_code_of_kind
from .evaluation.metrics import dice
from .formats.segfile import read_seg_nrrd
from .inference.bundles import DEMO_BUNDLE_NAME
from .phantom import cases as phantom
from .pipeline import SegmentRequest
from .runner import WorkerRun, cancel_on_termination

NOTICE = ("The demo model was trained by this project on the synthetic phantom only. It is not a clinical "
          "model: install a real bundle with `segrap models install` for patient images.")


def score_against_truth(case: phantom.PhantomCase, seg_path: Path) -> dict[str, float]:
    """DSC of every structure of a result file against the phantom's truth."""
    result = read_seg_nrrd(seg_path)
    truth = {**dict(case.oar_masks().items()), **case.gtv_masks()}
    return {name: float(dice(truth[name], result.masks[name])) for name in S.STRUCTURE_NAMES if name in result.masks}


def run_demo(out: str | Path, size: str = "small", seed: int = 99, device: str = "auto",
             json_lines: bool = False) -> int:
    """Phantom case -> worker with the demo bundle -> DSC summary; returns the exit code."""
    out = Path(out)
    case = phantom.make_case(0, seed=seed, size=size)
    paths = phantom.write_case(case, out / "phantom")
    print(f"phantom case ({size}, seed {seed}) written to {paths.folder}", file=sys.stderr)
    request = SegmentRequest(ct=str(paths.ct), contrast_ct=str(paths.contrast_ct), out_dir=str(out / "segmentation"),
                             case_id=case.case_id, bundle=DEMO_BUNDLE_NAME, device=device)
    printer = (lambda e: print(json.dumps(e), flush=True)) if json_lines else ProgressPrinter("segrap demo")
    with cancel_on_termination():  # SIGTERM/SIGHUP stop the worker's tree and remove its temp folders
        outcome = WorkerRun(request).start().wait(printer)
    if not outcome.ok:
        print(f"segrap demo: error: {outcome.final.get('message')}", file=sys.stderr)
        return exit_code_of_kind(outcome.final.get("kind"))
    seg_path = Path(outcome.final["outputs"]["segmentation"])
    scores = score_against_truth(case, seg_path)
    oar = [scores[n] for n in S.OAR_NAMES]
    gtv = [scores[n] for n in S.GTV_NAMES]
    worst = sorted(scores.items(), key=lambda kv: kv[1])[:5]
    summary = {"segmentation": str(seg_path), "provenance": outcome.final["outputs"]["provenance"],
               "mean_dsc_oar": round(float(np.mean(oar)), 4), "mean_dsc_gtv": round(float(np.mean(gtv)), 4),
               "worst": {k: round(v, 4) for k, v in worst}, "notice": NOTICE}
    if json_lines:
        print(json.dumps({"event": "demo-summary", **summary}))
    else:
        print(f"segmentation: {seg_path}  (open it in 3D Slicer over {paths.ct})")
        print(f"mean DSC against the phantom truth: OARs {summary['mean_dsc_oar']:.3f}, "
              f"GTVs {summary['mean_dsc_gtv']:.3f}")
        print("lowest: " + ", ".join(f"{k} {v:.2f}" for k, v in worst))
        print(NOTICE)
    return EXIT_OK
