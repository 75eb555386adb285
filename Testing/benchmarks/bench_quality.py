"""How well the per-structure confidence and review flag find wrong contours, on phantom cases with failures we make.

Each case is a held-out phantom (seeds the demo model never saw) put through one realistic fault: noise,
a calibration offset, a smoothing or thick-slice reconstruction, a truncated field of view, the full-size
phantom, or a degraded model (one copy of the demo bundle with noise added to its weights). Every
structure's true DSC against the phantom truth is set beside its confidence and flag, and the script prints:
- AUC of the confidence for "DSC < 0.5" (1 = every bad contour ranked below every good one),
- sensitivity of the review flag for DSC < 0.5,
- false flags: the share of flagged structures among those with DSC >= 0.9,
per fault and overall; the targets (issue 26) are AUC >= 0.95, sensitivity >= 0.9, false flags <= 5%.

Usage: python Testing/benchmarks/bench_quality.py [--cases N] [--faults a,b,...] [--json FILE]
It runs the pipeline in this process on the CPU (about 15-30 s a small case on 2 cores, minutes for full size).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SegRapSegmenterLib.demo import score_against_truth
from SegRapSegmenterLib.evaluation.quality import Reviewed, review_figures
from SegRapSegmenterLib.inference.bundles import DEMO_BUNDLE_PATH
from SegRapSegmenterLib.phantom import cases as phantom

HELD_OUT_SEED = 99


def _resampled(case: phantom.PhantomCase, reference: sitk.Image) -> phantom.PhantomCase:
    """The case on another grid: CTs linear, label maps nearest (the truth follows the image)."""
    def image(img, default):
        return sitk.Resample(img, reference, sitk.Transform(), sitk.sitkLinear, default, img.GetPixelID())

    def labels(arr):
        return sitk.GetArrayFromImage(sitk.Resample(case.label_image(arr), reference, sitk.Transform(),
                                                    sitk.sitkNearestNeighbor, 0))
    return phantom.PhantomCase(case.case_id, image(case.ct, -1024), image(case.contrast_ct, -1024),
                               labels(case.labelmap), labels(case.gtv_labelmap), dict(case.info))


def _with_ct(case: phantom.PhantomCase, change) -> phantom.PhantomCase:
    return replace(case, ct=change(case.ct), contrast_ct=change(case.contrast_ct))


def _noise(sigma: float, seed: int):
    def change(img):
        rng = np.random.default_rng(seed)
        arr = sitk.GetArrayFromImage(img).astype(np.float32)
        out = sitk.GetImageFromArray(arr + rng.normal(0, sigma, arr.shape).astype(np.float32))
        out.CopyInformation(img)
        return sitk.Cast(out, img.GetPixelID())
    return change


def _thick_slices(case: phantom.PhantomCase, factor: int) -> phantom.PhantomCase:
    ref = sitk.Image(case.ct)
    size = list(case.ct.GetSize())
    spacing = list(case.ct.GetSpacing())
    reference = sitk.Image([size[0], size[1], max(2, size[2] // factor)], sitk.sitkUInt8)
    reference.SetSpacing([spacing[0], spacing[1], spacing[2] * factor])
    reference.SetDirection(ref.GetDirection())
    reference.SetOrigin(ref.GetOrigin())
    thick = _with_ct(case, lambda img: sitk.SmoothingRecursiveGaussian(img, [0.1, 0.1, spacing[2] * factor / 2]))
    return _resampled(thick, reference)


def _truncated(case: phantom.PhantomCase, keep: float) -> phantom.PhantomCase:
    """The upper part of the head cut off: only the lowest ``keep`` of the slices (a scan that stops short)."""
    nz = case.ct.GetSize()[2]
    kept = max(2, int(nz * keep))
    def cut(img):
        return img[:, :, :kept]
    return phantom.PhantomCase(case.case_id, cut(case.ct), cut(case.contrast_ct), case.labelmap[:kept],
                               case.gtv_labelmap[:kept], dict(case.info))


FAULTS = {
    "none": lambda case: case,
    "noise-80": lambda case: _with_ct(case, _noise(80.0, 1)),
    "noise-200": lambda case: _with_ct(case, _noise(200.0, 2)),
    "offset+400": lambda case: _with_ct(case, lambda img: img + 400),
    "scale-1.6": lambda case: _with_ct(case, lambda img: sitk.Cast((sitk.Cast(img, sitk.sitkFloat32) + 1024) * 1.6
                                                                    - 1024, img.GetPixelID())),
    "smooth-3mm": lambda case: _with_ct(case, lambda img: sitk.SmoothingRecursiveGaussian(img, 3.0)),
    "thick-3x": lambda case: _thick_slices(case, 3),
    "truncated-60": lambda case: _truncated(case, 0.6),
    "full-size": None,  # a full-size phantom case, made as such
    "degraded-model": None,  # the demo bundle with noise in its weights
}


def degraded_bundle(root: Path, scale: float = 0.5, seed: int = 7) -> Path:
    """A copy of the demo bundle with Gaussian noise (``scale`` x each tensor's std) in every weight, re-checksummed."""
    import torch

    from SegRapSegmenterLib.inference.bundles import MANIFEST_NAME, sha256_file

    target = root / "segrap-demo-degraded"
    shutil.copytree(DEMO_BUNDLE_PATH, target)
    generator = torch.Generator().manual_seed(seed)
    for checkpoint in target.rglob("checkpoint_final.pth"):
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        for key, tensor in state["network_weights"].items():
            if tensor.is_floating_point() and tensor.numel() > 1:
                tensor += torch.randn(tensor.shape, generator=generator) * float(tensor.std()) * scale
        torch.save(state, checkpoint)
    manifest_path = target / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["name"] = "segrap-demo-degraded"
    manifest["files"] = {rel: sha256_file(target / rel) for rel in manifest["files"]}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return target


def run_case(case: phantom.PhantomCase, work: Path, bundle: str, tasks=("oar", "gtv")) -> list[dict]:
    from SegRapSegmenterLib.pipeline import SegmentRequest, run

    paths = phantom.write_case(case, work / "in")
    result = run(SegmentRequest(ct=str(paths.ct), contrast_ct=str(paths.contrast_ct), out_dir=str(work / "out"),
                                case_id=case.case_id, bundle=bundle, tasks=tasks, device="cpu"))
    provenance = json.loads(Path(result.outputs["provenance"]).read_text())
    scores = score_against_truth(case, Path(result.outputs["segmentation"]))
    truth = {**dict(case.oar_masks().items()), **case.gtv_masks()}
    return [{"structure": n, "dsc": round(scores[n], 4), "confidence": e["confidence"], "review": e["review"],
             "reasons": e["review_reasons"], "absent": not truth[n].any() and e["voxels"] == 0}
            for n, e in provenance["structures"].items()]


def figures(rows: list[dict]) -> dict:
    """``evaluation.quality.review_figures`` of the rows (absent structures are left out there)."""
    return review_figures([Reviewed(str(r["case"]), r["structure"], r["dsc"], r["confidence"], r["review"], r["absent"])
                           for r in rows])


def _fmt(v) -> str:
    return "  -  " if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2, help="held-out phantom cases per fault (default 2)")
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated, from: " + ", ".join(FAULTS))
    parser.add_argument("--json", help="write every structure's row and the figures to this file")
    args = parser.parse_args(argv)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        parser.error(f"unknown faults: {', '.join(unknown)}")
    work = Path(tempfile.mkdtemp(prefix="segrap-bench-quality-"))
    rows_by_fault: dict[str, list[dict]] = {}
    try:
        degraded = str(degraded_bundle(work)) if "degraded-model" in faults else None
        for fault in faults:
            rows = []
            t0 = time.perf_counter()
            for index in range(args.cases):
                size = "full" if fault == "full-size" else "small"
                case = phantom.make_case(index, seed=HELD_OUT_SEED, size=size)
                if FAULTS[fault] is not None:
                    case = FAULTS[fault](case)
                bundle = degraded if fault == "degraded-model" else "demo"
                for row in run_case(case, work / f"{fault}-{index}", bundle):
                    rows.append({"fault": fault, "case": index, **row})
                shutil.rmtree(work / f"{fault}-{index}", ignore_errors=True)
            rows_by_fault[fault] = rows
            f = figures(rows)
            print(f"{fault:15s} {len(rows):4d} structures, {f['dsc_below_0.5']:3d} with DSC < 0.5: AUC {_fmt(f['auc'])}, "
                  f"sensitivity {_fmt(f['sensitivity'])}, false flags {_fmt(f['false_flags'])} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    every = [r for rows in rows_by_fault.values() for r in rows]
    total = figures(every)
    absent = sum(r["absent"] for r in every)
    if absent:
        print(f"left out: {absent} structures absent from the image and found empty (flagged 'empty', DSC 1)")
    print(f"{'all':15s} {len(every):4d} structures, {total['dsc_below_0.5']:3d} with DSC < 0.5: AUC {_fmt(total['auc'])}, "
          f"sensitivity {_fmt(total['sensitivity'])}, false flags {_fmt(total['false_flags'])}")
    print("targets: AUC >= 0.95, sensitivity >= 0.9, false flags <= 0.05")
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": {k: figures(v) for k, v in rows_by_fault.items()},
                                               "all": total, "rows": every}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
