"""The demo job: write a phantom case, segment it with the phantom-trained demo bundle, score it.

This is the README's main-job command. It runs the same worker process as ``segrap segment`` and
then compares the result with the phantom's truth (DSC per structure), so what it prints is
measured, not claimed. The demo model has only ever seen the synthetic phantom.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .anatomy import structures as S
from .anatomy.qa import EMPTY_WARNING
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


@dataclass(frozen=True)
class DemoScores:
    """What the demo measured: DSC and voxel count of every structure of the result."""

    dsc: dict[str, float]
    voxels: dict[str, int]

    @property
    def empty(self) -> list[str]:
        """Structures the model left empty, in catalogue order."""
        return [n for n in S.STRUCTURE_NAMES if self.voxels.get(n, 0) == 0]

    def mean(self, names) -> float:
        return round(float(np.mean([self.dsc[n] for n in names])), 4)


def measure(case: phantom.PhantomCase, seg_path: Path) -> DemoScores:
    """DSC against the phantom truth and the voxel count of every structure of a result file."""
    result = read_seg_nrrd(seg_path)
    truth = {**dict(case.oar_masks().items()), **case.gtv_masks()}
    names = [n for n in S.STRUCTURE_NAMES if n in result.masks]
    return DemoScores({n: float(dice(truth[n], result.masks[n])) for n in names},
                      {n: int(np.count_nonzero(result.masks[n])) for n in names})


def summary_lines(scores: DemoScores, details: bool = False) -> list[str]:
    """The short summary: structures found, mean DSC, the lowest, the empty ones in one line; the
    per-structure table only with ``details``."""
    total = len(S.STRUCTURE_NAMES)
    lowest = sorted(scores.dsc.items(), key=lambda kv: kv[1])[:3]
    lines = [f"structures found: {total - len(scores.empty)} of {total}",
             f"mean DSC against the phantom truth: OARs {scores.mean(S.OAR_NAMES):.3f}, "
             f"GTVs {scores.mean(S.GTV_NAMES):.3f}; lowest: " + ", ".join(f"{k} {v:.2f}" for k, v in lowest)]
    if scores.empty:
        lines.append(f"empty ({len(scores.empty)}): " + ", ".join(scores.empty))
    if details:
        width = max(len(n) for n in S.STRUCTURE_NAMES)
        lines.append(f"{'structure':<{width}}  {'voxels':>7}  DSC")
        lines += [f"{n:<{width}}  {scores.voxels.get(n, 0):>7}  {scores.dsc.get(n, 0.0):.3f}" for n in S.STRUCTURE_NAMES]
    else:
        lines.append("per-structure Dice: segrap demo --details")
    return lines


def _without_empty_warnings(printer):
    """The progress printer minus the per-structure "empty" warnings: the summary lists them in one line."""
    def show(event: dict) -> None:
        if not (event.get("event") == "warning" and str(event.get("message", "")).endswith(EMPTY_WARNING)):
            printer(event)
    return show


def run_demo(out: str | Path, size: str = "small", seed: int = 99, device: str = "auto",
             json_lines: bool = False, details: bool = False) -> int:
    """Phantom case -> worker with the demo bundle -> DSC summary; returns the exit code."""
    out = Path(out)
    case = phantom.make_case(0, seed=seed, size=size)
    paths = phantom.write_case(case, out / "phantom")
    print(f"phantom case ({size}, seed {seed}) written to {paths.folder}", file=sys.stderr)
    request = SegmentRequest(ct=str(paths.ct), contrast_ct=str(paths.contrast_ct), out_dir=str(out / "segmentation"),
                             case_id=case.case_id, bundle=DEMO_BUNDLE_NAME, device=device)
    printer = (lambda e: print(json.dumps(e), flush=True)) if json_lines else _without_empty_warnings(
        ProgressPrinter("segrap demo"))
    with cancel_on_termination():  # SIGTERM/SIGHUP stop the worker's tree and remove its temp folders
        outcome = WorkerRun(request).start().wait(printer)
    if not outcome.ok:
        print(f"segrap demo: error: {outcome.final.get('message')}", file=sys.stderr)
        return exit_code_of_kind(outcome.final.get("kind"))
    seg_path = Path(outcome.final["outputs"]["segmentation"])
    scores = measure(case, seg_path)
    if json_lines:
        summary = {"segmentation": str(seg_path), "provenance": outcome.final["outputs"]["provenance"],
                   "found": len(S.STRUCTURE_NAMES) - len(scores.empty), "empty": scores.empty,
                   "mean_dsc_oar": scores.mean(S.OAR_NAMES), "mean_dsc_gtv": scores.mean(S.GTV_NAMES),
                   "review": outcome.final.get("review"), "flagged": outcome.final.get("flagged"), "notice": NOTICE}
        if details:
            summary["dsc"] = {k: round(v, 4) for k, v in scores.dsc.items()}
        print(json.dumps({"event": "demo-summary", **summary}))
    else:
        print(f"segmentation: {seg_path}  (open it in 3D Slicer over {paths.ct})")
        for line in summary_lines(scores, details):
            print(line)
        if outcome.final.get("review"):
            print(outcome.final["review"])
        print(NOTICE)
    return EXIT_OK
