"""Laterality-aware mirroring augmentation: left-right flips swap the paired labels, other flips do not."""

from __future__ import annotations

import numpy as np
import torch
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.training.laterality import LateralityMirrorTransform


class _Fixed(LateralityMirrorTransform):
    """The transform with its random choice of axes pinned, to test each case."""

    def __init__(self, axes, *args):
        super().__init__(*args)
        self._axes = list(axes)

    def get_parameters(self, **data_dict) -> dict:
        return {"axes": self._axes}


def _sample(case):
    image = torch.from_numpy(case.labelmap.astype(np.float32))[None]
    seg = torch.from_numpy(case.labelmap.astype(np.int16))[None]
    return image, seg


def _centroid_x(seg: torch.Tensor, label: int) -> float:
    return float(torch.nonzero(seg[0] == label).float()[:, 2].mean())


def test_left_right_flip_swaps_labels_and_keeps_them_on_their_side(small_case):
    image, seg = _sample(small_case)
    out = _Fixed([2], (0, 1, 2), 2, list(S.class_mirror_permutation()))(image=image, segmentation=seg)
    flipped_seg = out["segmentation"]
    assert torch.equal(out["image"], torch.flip(image, [3]))
    left, right = S.class_labels()["Parotid_L"], S.class_labels()["Parotid_R"]
    # in LPS storage +x (higher index) is the patient's left: after flip and swap it still is
    assert _centroid_x(flipped_seg, left) > _centroid_x(flipped_seg, right)
    assert _centroid_x(seg, left) > _centroid_x(seg, right)
    stock = torch.flip(seg, [3])  # what nnU-Net's MirrorTransform gives: left labels on the right
    assert _centroid_x(stock, left) < _centroid_x(stock, right)
    perm = torch.as_tensor(S.class_mirror_permutation())
    assert torch.equal(flipped_seg, perm[stock.long()].to(stock.dtype))


def test_flips_along_other_axes_do_not_swap(small_case):
    image, seg = _sample(small_case)
    out = _Fixed([0, 1], (0, 1, 2), 2, list(S.class_mirror_permutation()))(image=image, segmentation=seg)
    assert torch.equal(out["segmentation"], torch.flip(seg, [1, 2]))


def test_flip_and_swap_twice_is_the_identity_and_outside_stays_outside(small_case):
    _, seg = _sample(small_case)
    seg = seg.clone()
    seg[0, 0, 0, 0] = -1  # nnU-Net marks voxels outside the crop with -1
    t = _Fixed([2], (0, 1, 2), 2, list(S.class_mirror_permutation()))
    once = t(segmentation=seg)["segmentation"]
    twice = t(segmentation=once)["segmentation"]
    assert torch.equal(twice, seg) and once[0, 0, 0, -1] == -1
