"""`segrap models import`: stock nnU-Net v2 result folders -> an installed, checksummed bundle that segments.

The result folders are made here the way stock ``nnUNetTrainer`` leaves them (full checkpoints with the
optimizer state, the trainer's init arguments and its log), for a tiny network so that the test runs in seconds.
"""

from __future__ import annotations

import json

import pytest
import torch
from SegRapSegmenterLib.cli import main
from SegRapSegmenterLib.errors import EXIT_MODEL, ModelError
from SegRapSegmenterLib.inference import bundles as M
from SegRapSegmenterLib.phantom import cases as phantom
from SegRapSegmenterLib.training.export import import_results
from SegRapSegmenterLib.training.pretrained import network_from_plans
from training_helpers import dataset_json, tiny_plans

WHOLE_SMALL_PHANTOM = (48, 96, 96)  # one tile per case: the tiny network segments the small phantom in a second


def _stock_results(root, task: str, folds=("0",), plans: dict | None = None, dataset: dict | None = None):
    """$nnUNet_results/DatasetXXX_Name/nnUNetTrainer__nnUNetPlans__3d_fullres as stock nnU-Net v2 writes it."""
    dataset_id = 601 if task == "oar" else 602
    folder = root / f"Dataset{dataset_id}_SegRap{task.upper()}" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    folder.mkdir(parents=True)
    dataset = dataset or dataset_json(task)
    (folder / "plans.json").write_text(json.dumps(tiny_plans(patch=WHOLE_SMALL_PHANTOM)))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    network = network_from_plans(folder / "plans.json", folder / "dataset.json", "3d_fullres")
    plans = plans or tiny_plans(patch=WHOLE_SMALL_PHANTOM)
    (folder / "plans.json").write_text(json.dumps(plans))  # what the folder says, whatever the network was
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    for fold in folds:
        (folder / f"fold_{fold}").mkdir()
        torch.save({"network_weights": network.state_dict(), "optimizer_state": optimizer.state_dict(),
                    "grad_scaler_state": None, "logging": {"mean_fg_dice": [0.5], "ema_fg_dice": [0.5]},
                    "_best_ema": 0.5, "current_epoch": 1000,
                    "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": int(fold),
                                  "dataset_json": dataset, "device": torch.device("cpu")},
                    "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)},
                   folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


def test_import_installs_both_tasks_checksummed_and_the_bundle_segments(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEGRAP_HOME", str(tmp_path / "home"))
    oar = _stock_results(tmp_path / "results", "oar", folds=("0", "1"))
    gtv = _stock_results(tmp_path / "results", "gtv", folds=("0",))
    assert main(["models", "import", str(gtv), str(oar), "--name", "clinic-nnunet", "--license",
                 "CC-BY-NC-SA-4.0"]) == 0
    assert "imported and installed clinic-nnunet 1.0.0" in capsys.readouterr().out
    installed = M.store_root() / "clinic-nnunet"
    bundle = M.load_bundle(installed)
    M.verify_bundle(bundle)  # every file listed with its sha256, nothing unlisted
    assert set(bundle.tasks) == {"oar", "gtv"}  # each folder's task read from its dataset.json labels
    assert bundle.tasks["oar"].folds == ("0", "1") and bundle.tasks["gtv"].folds == ("0",)
    assert bundle.tasks["oar"].training_mirroring == "plain"  # stock nnU-Net mirrors: from the checkpoint's axes
    slim = torch.load(installed / "oar" / "fold_0" / "checkpoint_final.pth", weights_only=True)
    assert "optimizer_state" not in slim and set(slim["network_weights"]) == set(
        torch.load(oar / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"])

    case = phantom.write_case(phantom.make_case(0, seed=99, size="small"), tmp_path / "case")
    assert main(["segment", "--ct", str(case.ct), "--contrast-ct", str(case.contrast_ct), "--out",
                 str(tmp_path / "out"), "--bundle", "clinic-nnunet", "--device", "cpu", "--json"]) == 0
    provenance = json.loads(next((tmp_path / "out").rglob("*provenance.json")).read_text())
    assert "clinic-nnunet" in json.dumps(provenance)


def test_import_refuses_what_install_refuses_and_leaves_the_store_empty(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEGRAP_HOME", str(tmp_path / "home"))
    plans = tiny_plans(patch=WHOLE_SMALL_PHANTOM)
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "os.system"
    bad_plans = _stock_results(tmp_path / "a", "gtv", plans=plans)
    with pytest.raises(ModelError, match="os.system"):
        import_results([bad_plans], name="bad", version="1", license="x")
    other = dataset_json("gtv")
    other["labels"] = {"background": 0, "tumour": 1}
    unknown_labels = _stock_results(tmp_path / "b", "gtv", dataset=other)
    assert main(["models", "import", str(unknown_labels), "--name", "bad", "--license", "x"]) == EXIT_MODEL
    assert "are neither SegRap Task 1's 54 classes" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(ModelError, match="second gtv model"):
        import_results([_stock_results(tmp_path / "c", "gtv"), _stock_results(tmp_path / "d", "gtv")],
                       name="two", version="1", license="x")
    with pytest.raises(ModelError, match="no final checkpoint for fold"):
        import_results([_stock_results(tmp_path / "e", "gtv")], name="nofold", version="1", license="x", folds=["3"])
    assert not [p for p in M.store_root().iterdir() if not p.name.startswith(".")]
    _stock_results(tmp_path / "f", "gtv")
    assert main(["models", "import", str(tmp_path / "f"), "--name", "x", "--license", "x"]) == EXIT_MODEL  # not a result folder
