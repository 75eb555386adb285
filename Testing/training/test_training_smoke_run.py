"""The whole recipe on the CPU in minutes: convert, plan, preprocess, staged training, bundle, segment.

Two small phantom cases, nnU-Net's own planning and preprocessing (the session's ``planned_oar``, which
test_finetune_resenc trains on too: planning twice proved nothing more), then a plans edit to a tiny
network (features 2-16, patch 16 x 64 x 64) and 3 epochs of 2 iterations (1 heads-only, 1 warm-up,
1 poly) with the staged trainer started from a checkpoint trained for another class count. The
model learns nothing; the test checks that every step of the recipe runs and hands over to the next.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from SegRapSegmenterLib import cli
from SegRapSegmenterLib.formats.segfile import read_seg_nrrd
from SegRapSegmenterLib.phantom import cases as phantom
from SegRapSegmenterLib.training.pretrained import check_pretrained, network_from_plans
from training_helpers import PLANNED_DATASET as DATASET
from training_helpers import planned_copy
SMOKE_ARCH = {
    "n_stages": 4, "features_per_stage": [2, 4, 8, 16],
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
    "n_conv_per_stage": [1, 1, 1, 1], "n_conv_per_stage_decoder": [1, 1, 1],
}


def _run(cmd, env, timeout=240):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_recipe_from_phantom_release_to_segmenting_with_the_installed_bundle(planned_oar, tmp_path, monkeypatch):
    # 1. convert, then nnU-Net's own planning and preprocessing (planned_oar, asserted there); a copy of our own
    t0 = time.monotonic()
    env_dirs = planned_copy(planned_oar, tmp_path, monkeypatch)
    env = dict(os.environ)
    dataset_dir = env_dirs["nnUNet_raw"] / planned_oar[2]
    plans = env_dirs["nnUNet_preprocessed"] / dataset_dir.name / "nnUNetPlans.json"
    print(f"smoke run: converted, planned, preprocessed (copied) at {time.monotonic() - t0:.0f} s")

    # 2. a tiny configuration inheriting the preprocessed 3d_fullres data
    arch = [f"{k}={json.dumps(v)}" for k, v in SMOKE_ARCH.items()]
    assert cli.main(["train", "edit-plans", str(plans), "--name", "3d_smoke", "--patch-size", "16", "64", "64",
                     "--batch-size", "2", *sum((["--arch", a] for a in arch), [])]) == 0

    # 3. a "pre-trained" checkpoint of the same network for another task (3 classes: heads must be re-initialised)
    gtv_json = tmp_path / "gtv_dataset.json"
    gtv_json.write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "GTVp": 1, "GTVnd": 2},
                                    "numTraining": 3, "file_ending": ".nii.gz"}))
    torch.manual_seed(0)
    pretrained = tmp_path / "pretrained.pth"
    torch.save({"network_weights": network_from_plans(plans, gtv_json, "3d_smoke").state_dict()}, pretrained)
    print(f"smoke run: plans edited, checkpoint made at {time.monotonic() - t0:.0f} s")

    # 4. staged training through `segrap train run` (nnU-Net's run_training, trainer found by name)
    _run([sys.executable, "-m", "SegRapSegmenterLib.cli", "train", "run", str(DATASET), "3d_smoke", "all",
          "--device", "cpu", "--pretrained", str(pretrained), "--epochs", "3", "--stage-epochs", "1", "1",
          "--iterations", "2", "--val-iterations", "1"], {**env, "nnUNet_n_proc_DA": "0"})  # augment in-process
    result = env_dirs["nnUNet_results"] / dataset_dir.name / "SegRapStagedTrainer__nnUNetPlans__3d_smoke"
    print(f"smoke run: trained at {time.monotonic() - t0:.0f} s")
    fold = result / "fold_all"
    report = json.loads((fold / "pretrained_weights.json").read_text())
    assert report["loaded"] and not report["heads_loaded"]
    assert all("seg_layers" in name for name, _, _ in report["shape_mismatch"]) and report["shape_mismatch"]
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == "SegRapStagedTrainer" and checkpoint["current_epoch"] == 3
    assert checkpoint["logging"]["lrs"] == pytest.approx([1e-3, 1e-2, 1e-2])  # heads peak, warm-up peak, poly start
    log = next(fold.glob("training_log_*.txt")).read_text()
    for stage, epoch in (("heads", 0), ("warmup", 1), ("poly", 2)):
        assert f"stage {stage} from epoch {epoch}" in log
    assert "mirroring in training: laterality-aware (cases stored LPS" in log
    # a trained nnU-Net checkpoint is itself usable as pre-training (read without pickled code)
    assert check_pretrained(fold / "checkpoint_final.pth", plans, dataset_dir / "dataset.json", "3d_smoke").heads_loaded

    # 5. export, install, segment a held-out phantom case with the installed bundle
    bundle = tmp_path / "bundle"
    assert cli.main(["train", "export-bundle", "--oar", str(result), "--name", "smoke", "--version", "0.0.1",
                     "--license", "CC0-1.0", "--out", str(bundle)]) == 0
    manifest = json.loads((bundle / "segrap-model.json").read_text())
    assert manifest["tasks"]["oar"]["folds"] == ["all"]
    assert manifest["tasks"]["oar"]["training_mirroring"] == "laterality-aware"  # trained with flip-and-swap
    assert manifest["tasks"]["oar"]["orientation"] == "LPS"  # from the converted dataset's dataset.json
    assert "SegRapStagedTrainer" in manifest["description"]
    assert cli.main(["models", "install", str(bundle)]) == 0
    print(f"smoke run: exported and installed at {time.monotonic() - t0:.0f} s")
    case = phantom.write_case(phantom.make_case(0, seed=99, size="small"), tmp_path / "heldout")
    out = tmp_path / "segmented"
    assert cli.main(["segment", "--ct", str(case.ct), "--out", str(out), "--bundle", "smoke", "--tasks", "oar",
                     "--device", "cpu", "--json"]) == 0
    (seg,) = out.glob("*.seg.nrrd")
    result_file = read_seg_nrrd(seg)
    assert result_file.reference.GetSize() == phantom.make_case(0, seed=99, size="small").ct.GetSize()
    assert time.monotonic() - t0 < 240, "the smoke run must stay within the CI budget"
