"""The staged trainers on a tiny network: what trains in each stage, variants, settings, discovery by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from SegRapSegmenterLib.errors import InputError
from SegRapSegmenterLib.training import registry
from SegRapSegmenterLib.training.pretrained import is_head
from SegRapSegmenterLib.training.trainers import (
    TRAINERS,
    SegRapStagedTrainer,
    SegRapStagedTrainer_2000ep,
    SegRapStagedTrainer_2000ep_fg33,
    SegRapStagedTrainer_fg33,
)
from training_helpers import dataset_json, tiny_plans


def make_trainer(cls, nnunet_dirs, task="oar", continue_training=False):
    """A trainer initialised by nnU-Net's own initialize() (network, optimizer, loss) on the tiny plan."""
    plans = tiny_plans()
    # initialize() only infers the dataset format from the preprocessed folder's file endings
    data = nnunet_dirs["nnUNet_preprocessed"] / plans["dataset_name"] / "nnUNetPlans_3d_fullres"
    data.mkdir(parents=True, exist_ok=True)
    (data / "case.b2nd").write_bytes(b"")
    plans["continue_training"] = continue_training
    trainer = cls(plans, "3d_fullres", 0, dataset_json(task), device=torch.device("cpu"))
    trainer.initialize()
    return trainer


def random_batch(trainer, seed=0):
    """A batch of random CT-like data and labels, with the deep-supervision targets nnU-Net's loader makes."""
    gen = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    data = torch.randn((2, 1, *patch), generator=gen)
    labels = torch.randint(0, trainer.label_manager.num_segmentation_heads, (2, 1, *patch), generator=gen).float()
    targets = []
    for scale in trainer._get_deep_supervision_scales():
        size = [int(round(p * s)) for p, s in zip(patch, scale)]
        targets.append(torch.nn.functional.interpolate(labels, size=size, mode="nearest"))
    return {"data": data, "target": targets}


def snapshot(trainer):
    return {n: p.detach().clone() for n, p in trainer.network.named_parameters()}


def changed(before, after):
    return {n for n in before if not torch.equal(before[n], after[n])}


def test_first_stage_moves_only_the_segmentation_heads_then_everything(nnunet_dirs):
    torch.manual_seed(0)
    trainer = make_trainer(SegRapStagedTrainer, nnunet_dirs)
    names = [n for n, _ in trainer.network.named_parameters()]
    heads = {n for n in names if is_head(n)}
    assert heads and len(heads) < len(names)

    before = snapshot(trainer)
    trainer.current_epoch = 0
    trainer.on_train_epoch_start()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    losses = [trainer.train_step(random_batch(trainer, seed))["loss"] for seed in (1, 2)]
    assert np.all(np.isfinite(losses))
    moved = changed(before, snapshot(trainer))
    # heads only; the full-resolution head surely (nnU-Net weights the coarsest deep-supervision output 0)
    final_head = max(heads, key=lambda n: int(n.split(".")[2]))
    assert final_head in moved and moved <= heads

    trainer.current_epoch = 10  # first epoch of the whole-network warm-up
    trainer.on_train_epoch_start()
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([2e-4, 2e-4])
    before = snapshot(trainer)
    trainer.train_step(random_batch(trainer, 3))
    moved = changed(before, snapshot(trainer))
    assert moved - heads and len(moved) > 0.9 * len(names)  # the body trains now


def test_resume_in_the_heads_stage_refreezes_the_body(nnunet_dirs):
    trainer = make_trainer(SegRapStagedTrainer, nnunet_dirs)
    trainer.current_epoch = 20
    trainer.on_train_epoch_start()
    trainer.current_epoch = 5  # as if a checkpoint of epoch 5 was loaded
    trainer.on_train_epoch_start()
    body = [p for n, p in trainer.network.named_parameters() if not is_head(n)]
    assert not any(p.requires_grad for p in body)
    assert trainer.optimizer.param_groups[1]["lr"] == 0.0


def test_pretrained_weights_load_unless_a_checkpoint_of_the_fold_will_be_resumed(nnunet_dirs, tmp_path, monkeypatch):
    torch.manual_seed(1)
    donor = make_trainer(SegRapStagedTrainer, nnunet_dirs, task="gtv")
    ckpt = tmp_path / "pretrained.pth"
    torch.save({"network_weights": donor.network.state_dict()}, ckpt)
    monkeypatch.setenv("SEGRAP_PRETRAINED_WEIGHTS", str(ckpt))
    fresh = make_trainer(SegRapStagedTrainer, nnunet_dirs)
    assert fresh.pretrained_report.loaded and not fresh.pretrained_report.heads_loaded
    report = json.loads((Path(fresh.output_folder) / "pretrained_weights.json").read_text())
    assert report["loaded"] == fresh.pretrained_report.loaded
    continued_without_checkpoint = make_trainer(SegRapStagedTrainer, nnunet_dirs, continue_training=True)
    assert continued_without_checkpoint.pretrained_report is not None  # nothing to resume: start from pre-training
    (Path(fresh.output_folder) / "checkpoint_latest.pth").write_bytes(b"")
    resumed = make_trainer(SegRapStagedTrainer, nnunet_dirs, continue_training=True)
    assert resumed.pretrained_report is None  # nnU-Net loads the fold's own checkpoint instead


def test_variants_set_epochs_and_oversampling(nnunet_dirs):
    base = make_trainer(SegRapStagedTrainer, nnunet_dirs)
    assert base.num_epochs == 1000 and not base.probabilistic_oversampling
    assert base.oversample_foreground_percent == pytest.approx(0.33)  # nnU-Net's default: last third of a batch
    assert SegRapStagedTrainer_2000ep.total_epochs == 2000
    fg = make_trainer(SegRapStagedTrainer_fg33, nnunet_dirs)
    assert fg.probabilistic_oversampling and fg.oversample_foreground_percent == pytest.approx(0.33)
    both = make_trainer(SegRapStagedTrainer_2000ep_fg33, nnunet_dirs)
    assert both.num_epochs == 2000 and both.probabilistic_oversampling
    assert both.schedule().lr(1999) == pytest.approx(1e-2 * (1 / 1940) ** 0.9)
    *_, mirror_axes = base.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert mirror_axes == (0, 1, 2) and base.training_mirroring == "laterality-aware"  # see test_trainer_mirroring


def test_settings_come_from_the_environment_and_are_checked(nnunet_dirs, monkeypatch):
    monkeypatch.setenv("SEGRAP_TRAINER_OPTIONS", json.dumps(
        {"num_epochs": 3, "heads_epochs": 1, "warmup_epochs": 1, "num_iterations_per_epoch": 2}))
    trainer = make_trainer(SegRapStagedTrainer, nnunet_dirs)
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch) == (3, 2)
    assert [trainer.schedule().stage(e) for e in range(3)] == ["heads", "warmup", "poly"]
    monkeypatch.setenv("SEGRAP_TRAINER_OPTIONS", json.dumps({"num_epoch": 3}))
    with pytest.raises(InputError, match="unknown setting"):
        make_trainer(SegRapStagedTrainer, nnunet_dirs)
    monkeypatch.setenv("SEGRAP_TRAINER_OPTIONS", json.dumps({"num_epochs": 30}))
    with pytest.raises(InputError, match="leave none for the poly stage"):
        make_trainer(SegRapStagedTrainer, nnunet_dirs)


def test_nnunet_finds_every_trainer_by_name_through_the_registered_folder(tmp_path, monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    monkeypatch.setenv("SEGRAP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    folder = registry.register_trainers()
    assert folder == tmp_path / "home" / "nnunet_trainers"
    assert (folder / registry.SHIM_NAME).read_text() == registry.SHIM_TEXT
    for name, cls in TRAINERS.items():
        assert recursive_find_trainer_class_by_name(name) is cls


def test_shim_install_and_uninstall_touch_only_our_module(tmp_path, monkeypatch):
    package = tmp_path / "nnUNetTrainer"
    package.mkdir()
    monkeypatch.setattr(registry, "nnunet_trainer_package", lambda: package)
    path = registry.install_shim()
    assert path.parent == package and "SegRapSegmenterLib.training.trainers import" in path.read_text()
    assert registry.remove_shim() == path and not path.exists()
    assert registry.remove_shim() is None
    path.write_text("class Other: pass\n")
    with pytest.raises(Exception, match="not the module segrap wrote"):
        registry.remove_shim()
