"""Benchmark: with several folds, how often the frugal path's labels differ from stock nnU-Net's.

The frugal path averages the folds per tile (one pass over the tiles); stock nnU-Net runs every
fold over the whole volume and averages the half-precision results. The two round differently, so
near-ties can go either way. The demo bundle has one fold, so this builds a two-fold bundle from
the demo weights and a copy perturbed by 5% of each tensor's standard deviation (a synthetic second
fold: it tests the arithmetic, not accuracy) and compares Task 1 labels on a small and a full
phantom case.

    python Testing/benchmarks/bench_fold_ensemble.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from SegRapSegmenterLib.inference.bundles import CHECKPOINT_NAME, Bundle, build_bundle, load_bundle, resolve_bundle
from SegRapSegmenterLib.inference.predictor import InferenceOptions, TaskPredictor
from SegRapSegmenterLib.phantom import cases as phantom


def two_fold_bundle(work: Path, perturbation: float = 0.05) -> Bundle:
    """The demo's Task 1 with fold 0 = its weights and fold 1 = the weights plus Gaussian noise."""
    demo = resolve_bundle("demo")
    result = work / "Dataset601_TwoFolds" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    result.mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copyfile(demo.result_path("oar") / name, result / name)
    checkpoint = torch.load(demo.checkpoint_path("oar", "all"), weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for fold, scale in (("0", 0.0), ("1", perturbation)):
        weights = {}
        for key, value in checkpoint["network_weights"].items():
            if value.is_floating_point() and value.numel() > 1:
                value = value + scale * value.float().std() * torch.randn(value.shape, generator=generator)
            weights[key] = value
        (result / f"fold_{fold}").mkdir()
        torch.save({**checkpoint, "network_weights": weights}, result / f"fold_{fold}" / CHECKPOINT_NAME)
    path = build_bundle(work / "bundle", name="two-folds", version="0", license="test only",
                        description="demo weights and a perturbed copy", result_folders={"oar": result},
                        folds={"oar": ["0", "1"]}, training_mirroring={"oar": "none"}, orientation="LPS")
    return load_bundle(path)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-folds-"))
    predictor = TaskPredictor(two_fold_bundle(work), "oar", InferenceOptions(device="cpu"))
    for size in ("small", "full"):
        case = phantom.make_case(1, seed=99, size=size)
        ours = predictor.predict(case.ct)
        fed = sitk.DICOMOrient(case.ct, "LPS")
        stock = predictor._predict_stock(sitk.GetArrayFromImage(fed).astype(np.float32)[None],
                                         list(fed.GetSpacing())[::-1], None)
        differ = int((ours != stock).sum())
        print(f"{size} {case.ct.GetSize()}, 2 folds: labels differ on {differ} of {ours.size} voxels "
              f"({differ / ours.size:.5%})", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
