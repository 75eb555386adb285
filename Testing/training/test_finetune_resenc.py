"""Fine-tuning from public ResEnc L weights: `segrap train run ... --pretrained FILE` on a checkpoint of the
architecture of MultiTalent's nnUNetResEncUNetLPlansIso1x1x1 (random weights made here, no download),
a few iterations on the phantom, export with the checkpoint's sha256, install, `segrap segment`.

Shrunk so that it runs on a CPU within the CI budget: the network keeps the plan's topology
(``RESENC_L_ISO``: residual encoder, 6 stages, 1-3-4-6-6-6 blocks, 3x3x3 kernels, stride 2 in every
axis from stage 2) but has 2-4-8-8-8-8 features instead of 32-64-128-256-320-320, the patch is
32 x 64 x 64 instead of 192^3, and it trains on the small phantom at 3 x 2 x 2 mm (the nnUNetPlans
preprocessing of the session's ``planned_oar``, which the smoke run trains on too) instead of 1 mm isotropic.
A checkpoint of another topology is refused before nnU-Net starts (in this process: nothing of nnU-Net runs).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys

import torch
from SegRapSegmenterLib import cli
from SegRapSegmenterLib.errors import EXIT_MODEL
from SegRapSegmenterLib.formats.segfile import read_seg_nrrd
from SegRapSegmenterLib.phantom import cases as phantom
from SegRapSegmenterLib.training.pretrained import RESENC_L_ISO, network_from_plans
from training_helpers import PLANNED_DATASET as DATASET
from training_helpers import planned_copy

PLANS = "nnUNetResEncUNetLPlansTiny"
TRAINER = "SegRapStagedTrainer_noMirroring"
TINY_FEATURES = [2, 4, 8, 8, 8, 8]
PATCH = [32, 64, 64]


def _resenc_plans(base: dict, blocks=None) -> dict:
    """The dataset's nnUNetPlans with 3d_fullres's network replaced by the ResEnc L topology (shrunk)."""
    plans = copy.deepcopy(base)
    plans["plans_name"] = PLANS
    conf = plans["configurations"]["3d_fullres"]  # data_identifier kept: the preprocessed cases are reused
    conf["patch_size"], conf["batch_size"] = PATCH, 2
    kwargs = {k: v for k, v in RESENC_L_ISO.items() if k not in ("network_class_name", "norm_op", "nonlin")}
    kwargs.update(features_per_stage=TINY_FEATURES, conv_op="torch.nn.modules.conv.Conv3d",
                  norm_op=RESENC_L_ISO["norm_op"], norm_op_kwargs={"eps": 1e-05, "affine": True},
                  dropout_op=None, dropout_op_kwargs=None, nonlin=RESENC_L_ISO["nonlin"],
                  nonlin_kwargs={"inplace": True})
    if blocks:
        kwargs["n_blocks_per_stage"] = blocks
    conf["architecture"] = {"network_class_name": RESENC_L_ISO["network_class_name"], "arch_kwargs": kwargs,
                            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    for name in [n for n in plans["configurations"] if n != "3d_fullres"]:
        del plans["configurations"][name]
    return plans


def _checkpoint(tmp_path, plans: dict, name: str, classes: int = 10):
    """A "pre-trained" nnU-Net checkpoint of the plans' network for another task (``classes`` labels), random."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "plans.json").write_text(json.dumps(plans))
    labels = {"background": 0, **{f"structure_{i}": i for i in range(1, classes)}}
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                     "numTraining": 1, "file_ending": ".nii.gz"}))
    torch.manual_seed(0)
    network = network_from_plans(folder / "plans.json", folder / "dataset.json", "3d_fullres")
    path = folder / "checkpoint_final.pth"
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer", "current_epoch": 4000},
               path)
    return path


def _train(args, env):
    """`segrap train run` in its own process, augmenting in-process (nnUNet_n_proc_DA=0)."""
    return subprocess.run([sys.executable, "-m", "SegRapSegmenterLib.cli", "train", "run", *args],
                          env={**env, "nnUNet_n_proc_DA": "0"},
                          capture_output=True, text=True, timeout=300)


def test_resenc_l_checkpoint_fine_tunes_exports_with_its_checksum_and_segments(planned_oar, tmp_path, monkeypatch,
                                                                               capsys):
    dirs = planned_copy(planned_oar, tmp_path, monkeypatch)
    env = dict(os.environ)
    dataset_dir = dirs["nnUNet_raw"] / planned_oar[2]
    preprocessed = dirs["nnUNet_preprocessed"] / dataset_dir.name
    base = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    (preprocessed / f"{PLANS}.json").write_text(json.dumps(_resenc_plans(base)))

    # another topology (fewer residual blocks): refused before nnU-Net starts, nothing trained
    other = _checkpoint(tmp_path, _resenc_plans(base, blocks=[1, 2, 2, 2, 2, 2]), "other")
    capsys.readouterr()
    assert cli.main(["train", "run", str(DATASET), "3d_fullres", "all", "-p", PLANS, "--pretrained", str(other),
                     "--device", "cpu", "--epochs", "3", "--stage-epochs", "1", "1", "--iterations", "2"]) == EXIT_MODEL
    message = " ".join(capsys.readouterr().err.split())
    assert "refused: its architecture differs from the network of the plans" in message
    # residual blocks of two convolutions, plus a 1x1 projection where a stage changes the features
    assert "Checkpoint encoder: 6 stages, features [2, 4, 8, 8, 8, 8], convolutions per stage [2, 5, 5, 4, 4, 4]" \
        in message
    assert "the plans' network: 6 stages, features [2, 4, 8, 8, 8, 8], convolutions per stage [2, 7, 9, 12, 12, 12]" \
        in message
    assert not (dirs["nnUNet_results"] / dataset_dir.name).exists()

    # the same topology, 10 "pre-training" classes: body loaded, heads re-initialised for the 55 outputs
    pretrained = _checkpoint(tmp_path, _resenc_plans(base), "resenc")
    # a heads-only epoch, then one of the whole network; without mirroring, so that nnU-Net's final validation
    # predicts each case once, not eight times (mirroring is the smoke run's, test_training_smoke_run.py)
    trained = _train([str(DATASET), "3d_fullres", "all", "-p", PLANS, "-tr", TRAINER, "--pretrained", str(pretrained),
                      "--device", "cpu", "--epochs", "2", "--stage-epochs", "1", "0", "--iterations", "2",
                      "--val-iterations", "1"], env)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    result = dirs["nnUNet_results"] / dataset_dir.name / f"{TRAINER}__{PLANS}__3d_fullres"
    report = json.loads((result / "fold_all" / "pretrained_weights.json").read_text())
    sha = hashlib.sha256(pretrained.read_bytes()).hexdigest()
    assert report["sha256"] == sha and report["loaded"] and not report["heads_loaded"]
    assert all("seg_layers" in name for name, _, _ in report["shape_mismatch"]) and not report["adapted"]
    assert any(name.startswith("encoder.stages.5.blocks.5.") for name in report["loaded"])  # the deepest block

    bundle = tmp_path / "bundle"
    assert cli.main(["train", "export-bundle", "--oar", str(result), "--name", "resenc-tiny", "--version", "0.0.1",
                     "--license", "CC0-1.0", "--out", str(bundle)]) == 0
    manifest = json.loads((bundle / "segrap-model.json").read_text())
    assert manifest["tasks"]["oar"]["pretrained_weights"] == [{"file": "checkpoint_final.pth", "sha256": sha}]
    assert cli.main(["models", "install", str(bundle)]) == 0
    case = phantom.make_case(0, seed=99, size="small")
    paths = phantom.write_case(case, tmp_path / "heldout")
    out = tmp_path / "segmented"
    assert cli.main(["segment", "--ct", str(paths.ct), "--out", str(out), "--bundle", "resenc-tiny", "--tasks", "oar",
                     "--device", "cpu", "--json"]) == 0
    (seg,) = out.glob("*.seg.nrrd")
    assert read_seg_nrrd(seg).reference.GetSize() == case.ct.GetSize()
    provenance = json.loads(next(out.glob("*provenance.json")).read_text())
    assert sha in json.dumps(provenance)  # the result names the weights its model started from
