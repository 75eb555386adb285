"""Benchmark bundle at the DKFZ submission's size: ResEnc networks with random weights, 5 folds, both tasks.

Speed and memory do not depend on the weights' values, so this bundle stands in for the models
clinics will install (we have no trained weights of that size). Not shipped: a benchmark tool.

The configuration is the poster's: nnU-Net's residual-encoder U-Net (``nnUNetPlannerResEncL``, the
ResEnc L preset) planned on SegRap's median geometry (126 x 1024 x 1024 voxels at 3 x 0.54 x 0.54 mm,
SEGRAP.md) with the patch the DKFZ team trained, [32, 320, 256] (the poster: "ResEnc preset with a
raised GPU memory target, patch [32, 320, 256]"). Why the poster's patch rather than L's own: L
alone picks [40, 320, 320] on this geometry, but the submission ran [32, 320, 256]; at this spacing
the planner builds the same network for both patches (7 stages, features 32..320, strides
(1,1,1),(1,2,2),(1,2,2),(2,2,2),(2,2,2),(2,2,2),(1,2,2), 141 M parameters), so only the tiles differ
and the poster's are what the submission ran. The planner is nnU-Net's own; it only sees the
median shape capped at the poster's patch, so its first patch is that patch (and it skips the slow
search for a 3d_lowres configuration, which a run-time benchmark never uses). The fingerprint it
plans from is made up from SegRap's published median geometry and typical head-and-neck CT
intensities (they only set the CT normalisation's clipping, which costs the same whatever it is).

Weights: nnU-Net's own initialisation of that network, one seed per fold, float32 as trained
checkpoints are (the host memory of 5 folds is part of what is measured). The bundle is written by
the project's ``build_bundle`` (manifest, labels, checksums, slim checkpoints), so ``segrap models
install`` takes it like any bundle. ``--patch Z Y X`` adds a configuration with a smaller patch
(the project's ``add_configuration``: same network, fewer voxels per tile) for the CPU smoke run.

    python Testing/benchmarks/real_size_bundle.py OUT_DIR [--folds 5] [--tasks oar,gtv] [--patch 16 64 64]
    segrap models install OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SEGRAP_SPACING = (3.0, 0.54, 0.54)  # z, y, x mm: SegRap's median (SEGRAP.md)
SEGRAP_SHAPE = (126, 1024, 1024)  # z, y, x voxels: SegRap's median
TRAINING_CASES = 120  # SegRap's training set
CONFIGURATION = "3d_fullres"
PLANS_NAME = "nnUNetResEncUNetLPlans"
TRAINER = "nnUNetTrainer"
MIRRORING = {"oar": "laterality-aware", "gtv": "plain"}  # as the project's trainers record them
# foreground intensities of a typical head-and-neck CT (HU): they set only the clipping of the CT normalisation
INTENSITIES = {"max": 3071.0, "mean": 45.0, "median": 38.0, "min": -1024.0, "percentile_00_5": -180.0,
               "percentile_99_5": 1150.0, "std": 165.0}


def _dataset_json(task: str) -> dict:
    from SegRapSegmenterLib.anatomy import structures as S
    from SegRapSegmenterLib.inference.bundles import DATASET_ORIENTATION_KEY

    labels = S.class_labels() if task == "oar" else S.gtv_class_labels()
    return {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": TRAINING_CASES, "file_ending": ".nii.gz",
            DATASET_ORIENTATION_KEY: "LPS"}


def plan(work: Path, task: str) -> dict:
    """nnU-Net's ResEnc L plans for SegRap's median geometry with the poster's patch (see the module's docstring)."""
    import numpy as np
    import SimpleITK as sitk
    from SegRapSegmenterLib.training.plans import POSTER_PATCH

    name = "Dataset991_SegRapRealSize"
    raw, pre = work / "raw" / name, work / "preprocessed" / name
    for folder in (raw / "imagesTr", raw / "labelsTr", pre):
        folder.mkdir(parents=True, exist_ok=True)
    (raw / "dataset.json").write_text(json.dumps(_dataset_json(task)))
    # the planner asks one training image which reader to use; a tiny one answers that
    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkInt16), str(raw / "imagesTr" / "case_0000.nii.gz"))
    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkUInt8), str(raw / "labelsTr" / "case.nii.gz"))
    fingerprint = {"spacings": [list(SEGRAP_SPACING)] * TRAINING_CASES,
                   "shapes_after_crop": [list(SEGRAP_SHAPE)] * TRAINING_CASES,
                   "foreground_intensity_properties_per_channel": {"0": INTENSITIES},
                   "median_relative_size_after_cropping": 1.0}
    (pre / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    os.environ.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
                      nnUNet_results=str(work / "results"))
    from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
        nnUNetPlannerResEncL,
    )

    class PosterPatchPlanner(nnUNetPlannerResEncL):
        """ResEnc L whose patch search starts (and, as it fits L's memory target, ends) at the poster's patch."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.lowres_creation_threshold = 0.0  # no 3d_lowres search: slow, and no run here uses it

        def get_plans_for_configuration(self, spacing, median_shape, *args, **kwargs):
            cap = POSTER_PATCH[-len(spacing):]
            return super().get_plans_for_configuration(spacing, np.minimum(median_shape, cap), *args, **kwargs)

    import contextlib

    with contextlib.redirect_stdout(sys.stderr):
        plans = PosterPatchPlanner(name, plans_name=PLANS_NAME).plan_experiment()
    plans = json.loads((pre / f"{PLANS_NAME}.json").read_text())
    fullres = plans["configurations"][CONFIGURATION]
    if tuple(fullres["patch_size"]) != POSTER_PATCH:
        raise RuntimeError(f"nnU-Net's planner chose {fullres['patch_size']}, not the poster's {POSTER_PATCH}")
    fullres["median_image_size_in_voxels"] = list(SEGRAP_SHAPE)  # it planned against the cap
    plans["experiment_planner_used"] = f"nnUNetPlannerResEncL (patch capped at the poster's {list(POSTER_PATCH)})"
    return plans


def _network(plans: dict, task: str, configuration: str = CONFIGURATION):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = plans["configurations"][configuration]["architecture"]
    outputs = len(_dataset_json(task)["labels"])
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1,
                                  outputs, allow_init=True, deep_supervision=False)


def result_folder(work: Path, task: str, plans: dict, folds: int, patch: tuple[int, int, int] | None = None) -> Path:
    """An nnU-Net result folder with ``folds`` randomly initialised checkpoints (seed = fold).

    With ``patch``, the checkpoints name a configuration with that patch that inherits everything
    else (the network too) from the planned one.
    """
    import torch
    from SegRapSegmenterLib.training.plans import add_configuration

    configuration = CONFIGURATION if patch is None else f"{CONFIGURATION}_p{'x'.join(str(p) for p in patch)}"
    folder = work / "results" / task / f"{TRAINER}__{PLANS_NAME}__{configuration}"
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(_dataset_json(task), indent=1))
    if patch is not None:
        add_configuration(folder / "plans.json", configuration, patch_size=tuple(patch))
    for fold in range(folds):
        torch.manual_seed(1000 * (task == "gtv") + fold)
        network = _network(plans, task)  # nnU-Net's initialisation of a fresh network
        checkpoint = {"network_weights": network.state_dict(), "trainer_name": TRAINER,
                      "init_args": {"configuration": configuration},
                      "inference_allowed_mirroring_axes": (0, 1, 2), "current_epoch": 0}
        (folder / f"fold_{fold}").mkdir()
        torch.save(checkpoint, folder / f"fold_{fold}" / "checkpoint_final.pth")
        del network, checkpoint
    return folder


def build(out: Path, folds: int = 5, tasks: tuple[str, ...] = ("oar", "gtv"),
          patch: tuple[int, int, int] | None = None, name: str = "segrap-real-size") -> Path:
    """Write the benchmark bundle to ``out`` (a new folder); returns it."""
    from SegRapSegmenterLib.inference.bundles import build_bundle

    out = Path(out)
    work = Path(tempfile.mkdtemp(prefix="real-size-plans-", dir=out.parent if out.parent.exists() else None))
    try:
        # the plans hold no labels and the planner's patch is capped, so one planning serves both tasks
        plans = plan(work / "plans", tasks[0])
        results = {task: result_folder(work, task, plans, folds, patch) for task in tasks}
        patch_note = (f" Smoke variant: patch {list(patch)} instead of the poster's (same network)."
                      if patch is not None else "")
        return build_bundle(
            out, name=name, version="0.0-random", license="CC0-1.0",
            description="Benchmark only: randomly initialised weights of the DKFZ configuration (nnU-Net ResEnc L "
                        "planned on SegRap's median geometry, the poster's patch [32, 320, 256]); labels are "
                        f"meaningless.{patch_note}",
            result_folders=results, folds={t: list(range(folds)) for t in tasks},
            training_mirroring={t: MIRRORING[t] for t in tasks}, trainer_name=TRAINER, orientation="LPS")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="new folder for the bundle (outside the repository: weights are GBs)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--tasks", default="oar,gtv")
    parser.add_argument("--patch", type=int, nargs=3, metavar=("Z", "Y", "X"),
                        help="a smaller patch for CPU smoke runs (the network stays the same)")
    parser.add_argument("--name", default="segrap-real-size")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    out = build(args.out, args.folds, tuple(args.tasks.split(",")), tuple(args.patch) if args.patch else None,
                args.name)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 2**30:.2f} GiB, {time.perf_counter() - t0:.0f} s); install it with "
          f"`segrap models install {out}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
