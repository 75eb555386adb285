"""The staged trainers' mirroring: laterality-aware on Task 1 (axis from the dataset's orientation), plain on
Task 2, off in the _noMirroring variants; rotations capped where laterality is learned; export records it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.training.laterality import LateralityMirrorTransform
from SegRapSegmenterLib.training.trainers import (
    MAX_ROTATION_LATERAL,
    SegRapStagedTrainer,
    SegRapStagedTrainer_2000ep_fg33_noMirroring,
    SegRapStagedTrainer_fg33,
)
from training_helpers import dataset_json, tiny_plans


def _trainer(cls, task="oar", orientation="LPS", transpose=(0, 1, 2), patch=(8, 16, 16)):
    plans = tiny_plans(patch=patch)
    plans["transpose_forward"] = plans["transpose_backward"] = list(transpose)
    plans["continue_training"] = False
    dataset = dataset_json(task)
    if orientation:
        dataset["segrap_orientation"] = orientation
    return cls(plans, "3d_fullres", 0, dataset, device=torch.device("cpu"))


def _transforms(trainer):
    """nnU-Net's training pipeline as the trainer builds it in get_dataloaders, and the mirror axes."""
    rotation, dummy_2d, _, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    patch = trainer.configuration_manager.patch_size
    pipeline = trainer.get_training_transforms(patch, rotation, trainer._get_deep_supervision_scales(), mirror_axes,
                                               dummy_2d)
    return pipeline.transforms, mirror_axes


def _mirrors(transforms):
    return [t for t in transforms if isinstance(t, MirrorTransform)]


def test_task1_mirrors_every_axis_and_swaps_pairs_on_left_right_flips(nnunet_dirs, small_case):
    trainer = _trainer(SegRapStagedTrainer)
    assert trainer.training_mirroring == "laterality-aware"
    transforms, mirror_axes = _transforms(trainer)
    (mirror,) = _mirrors(transforms)
    assert isinstance(mirror, LateralityMirrorTransform) and mirror_axes == (0, 1, 2)
    assert tuple(mirror.allowed_axes) == (0, 1, 2) and mirror.lr_axis == 2
    assert trainer.inference_allowed_mirroring_axes == (0, 1, 2)  # test-time mirroring may use every axis
    seg = torch.from_numpy(small_case.labelmap.astype(np.int16))[None]
    perm = torch.as_tensor(S.class_mirror_permutation())
    flipped = mirror.apply({"segmentation": seg.clone()}, axes=[2])["segmentation"]
    assert torch.equal(flipped, perm[torch.flip(seg, [3]).long()].to(seg.dtype))
    other = mirror.apply({"segmentation": seg.clone()}, axes=[0, 1])["segmentation"]
    assert torch.equal(other, torch.flip(seg, [1, 2]))


@pytest.mark.parametrize("orientation, transpose, lr_axis", [
    (None, (0, 1, 2), 2),  # a dataset converted before the orientation was recorded: LPS assumed
    ("PLS", (0, 1, 2), 1),  # left-right along index y: array axis 1
    ("LPS", (2, 1, 0), 0),  # nnU-Net's plans put x first
])
def test_left_right_axis_follows_the_dataset_orientation_and_the_plans(nnunet_dirs, orientation, transpose, lr_axis):
    trainer = _trainer(SegRapStagedTrainer_fg33, orientation=orientation, transpose=transpose)
    (mirror,) = _mirrors(_transforms(trainer)[0])
    assert mirror.lr_axis == lr_axis


def test_task2_mirrors_as_stock_and_the_no_mirroring_variant_not_at_all(nnunet_dirs):
    gtv = _trainer(SegRapStagedTrainer, task="gtv")
    assert gtv.training_mirroring == "plain"
    (mirror,) = _mirrors(_transforms(gtv)[0])
    assert type(mirror) is MirrorTransform  # no pairs: nothing to swap
    off = _trainer(SegRapStagedTrainer_2000ep_fg33_noMirroring)
    assert off.training_mirroring == "none" and off.num_epochs == 2000
    transforms, mirror_axes = _transforms(off)
    assert mirror_axes is None and not _mirrors(transforms) and off.inference_allowed_mirroring_axes is None
    sided = {"background": 0, "Parotid_L": 1, "Parotid_R": 2}  # pairs this trainer does not know: no mirroring
    assert SegRapStagedTrainer.training_mirroring_for({"labels": sided}) == "none"


def test_half_turns_are_left_out_where_laterality_is_learned(nnunet_dirs):
    # an anisotropic patch: nnU-Net rotates in-plane by up to 180 degrees, which moves left to right
    oar = _trainer(SegRapStagedTrainer, patch=(8, 32, 32))
    rotation, dummy_2d, initial, _ = oar.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert dummy_2d and rotation == (-MAX_ROTATION_LATERAL, MAX_ROTATION_LATERAL)
    expected = get_patch_size((8, 32, 32), rotation, rotation, rotation, (0.85, 1.25))  # nnU-Net's sizing
    assert list(initial) == [8, *expected[1:]]
    gtv = _trainer(SegRapStagedTrainer, task="gtv", patch=(8, 32, 32))
    rotation, *_ = gtv.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert rotation[1] == pytest.approx(np.pi)  # stock for plain mirroring
