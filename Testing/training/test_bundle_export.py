"""Bundle export from result folders: folds found or checked, mirroring recorded, the bundle loads and verifies."""

from __future__ import annotations

import json

import pytest
import torch
from SegRapSegmenterLib.errors import ModelError
from SegRapSegmenterLib.inference.bundles import load_bundle, verify_bundle
from SegRapSegmenterLib.training.export import export_bundle
from SegRapSegmenterLib.training.pretrained import network_from_plans
from training_helpers import dataset_json, tiny_plans


def _result_folder(root, trainer, task, folds, mirror_axes, orientation=None):
    """An nnU-Net result folder with final checkpoints of the tiny network, as training leaves it."""
    folder = root / f"Dataset60{1 if task == 'oar' else 2}_X" / f"{trainer}__nnUNetPlans__3d_fullres"
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(tiny_plans()))
    dataset = dataset_json(task)
    if orientation:
        dataset["segrap_orientation"] = orientation
    (folder / "dataset.json").write_text(json.dumps(dataset))
    weights = network_from_plans(folder / "plans.json", folder / "dataset.json", "3d_fullres").state_dict()
    for fold in folds:
        (folder / f"fold_{fold}").mkdir()
        torch.save({"network_weights": weights, "trainer_name": trainer, "current_epoch": 1000,
                    "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": mirror_axes},
                   folder / f"fold_{fold}" / "checkpoint_final.pth")
    (folder / "fold_4").mkdir()  # a fold still training: no final checkpoint
    return folder


def test_export_takes_the_finished_folds_and_records_how_each_model_mirrored(tmp_path):
    oar = _result_folder(tmp_path, "SegRapStagedTrainer_2000ep_fg33", "oar", ["0", "1"], None)
    gtv = _result_folder(tmp_path, "nnUNetTrainer", "gtv", ["0", "1"], (0, 1, 2))
    out = export_bundle(tmp_path / "bundle", results={"oar": oar, "gtv": gtv}, folds=None, name="test",
                        version="1.0.0", license="CC-BY-4.0", description="Test models.")
    bundle = load_bundle(out)
    verify_bundle(bundle)
    assert bundle.tasks["oar"].folds == ("0", "1") and bundle.tasks["gtv"].folds == ("0", "1")
    assert bundle.tasks["oar"].training_mirroring == "laterality-aware"  # what the SegRap trainer did on Task 1
    assert bundle.tasks["gtv"].training_mirroring == "plain"  # stock nnU-Net: from the checkpoint's axes
    assert bundle.tasks["oar"].orientation == "LPS"  # our trainer assumed LPS for a dataset recording none
    assert bundle.tasks["gtv"].orientation is None  # stock trainer, dataset without orientation: unknown
    assert bundle.description.startswith("Test models. Trained with oar: SegRapStagedTrainer_2000ep_fg33")
    assert bundle.license == "CC-BY-4.0"
    # what `segrap train export-bundle` writes passes every install check (plans allow-list, listed files, limits)
    import shutil

    from SegRapSegmenterLib.inference.bundles import install_bundle

    assert install_bundle(out, store=tmp_path / "store").name == "test"
    archive = shutil.make_archive(str(tmp_path / "bundle-zip"), "zip", tmp_path, "bundle")
    assert install_bundle(archive, store=tmp_path / "store", force=True).name == "test"


def test_export_refuses_unfinished_folds_and_mirroring_a_model_never_saw(tmp_path):
    oar = _result_folder(tmp_path, "SegRapStagedTrainer_noMirroring", "oar", ["0"], None)
    with pytest.raises(ModelError, match="no final checkpoint for fold\\(s\\) 4; finished folds: 0"):
        export_bundle(tmp_path / "b1", results={"oar": oar}, folds=["0", "4"], name="t", version="1", license="x")
    with pytest.raises(ModelError, match="Test-time mirroring needs a model trained with mirroring"):
        export_bundle(tmp_path / "b2", results={"oar": oar}, folds=None, name="t", version="1", license="x",
                      test_time_mirroring=True)
    with pytest.raises(ModelError, match="not an nnU-Net result folder name"):
        export_bundle(tmp_path / "b3", results={"oar": oar.parent}, folds=None, name="t", version="1", license="x")
    assert not any(tmp_path.glob("b[123]"))


def test_staged_trainers_record_laterality_aware_task1_plain_task2_and_the_dataset_orientation(tmp_path):
    oar = _result_folder(tmp_path, "SegRapStagedTrainer_fg33", "oar", ["0"], (0, 1, 2), orientation="RAS")
    gtv = _result_folder(tmp_path, "SegRapStagedTrainer_fg33", "gtv", ["0"], (0, 1, 2), orientation="LPS")
    bundle = load_bundle(export_bundle(tmp_path / "bundle", results={"oar": oar, "gtv": gtv}, folds=None, name="t",
                                       version="1", license="x", test_time_mirroring=True))
    assert {t: (m.training_mirroring, m.orientation) for t, m in bundle.tasks.items()} == {
        "oar": ("laterality-aware", "RAS"), "gtv": ("plain", "LPS")}


def test_exported_checkpoints_store_a_tensor_the_network_names_twice_once(tmp_path):
    # U-Nets name their encoder twice in the state dict (the decoder holds it); a copy per name would make a
    # ResEnc L checkpoint 3.7x larger on disk and in memory (2.1 GB instead of 0.56 GB per fold)
    folder = _result_folder(tmp_path / "results", "nnUNetTrainer", "oar", ["0"], (0, 1, 2))
    weights = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=True)["network_weights"]
    names_by_storage: dict = {}
    for name, tensor in weights.items():
        names_by_storage.setdefault(tensor.untyped_storage().data_ptr(), []).append(name)
    shared = [names for names in names_by_storage.values() if len(names) > 1]
    assert shared, "the test network names no tensor twice; the test shows nothing"
    bundle = export_bundle(tmp_path / "bundle", results={"oar": folder}, folds=["0"], name="b", version="1",
                           license="CC0-1.0")
    path = bundle / "oar" / "fold_0" / "checkpoint_final.pth"
    exported = torch.load(path, weights_only=True)["network_weights"]
    for names in shared:
        assert len({exported[n].untyped_storage().data_ptr() for n in names}) == 1, names
    unique_bytes = sum(weights[names[0]].untyped_storage().nbytes() for names in names_by_storage.values())
    assert path.stat().st_size < unique_bytes + 200_000
