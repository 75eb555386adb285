"""Laterality-aware mirroring augmentation: a left-right flip also swaps the paired labels.

Stock nnU-Net mirrors along every axis without touching the labels, so a flipped left parotid
becomes a parotid on the right still labelled left, and the network learns to ignore laterality.
Here a flip along the left-right axis maps every label through ``class_mirror_permutation``
(Parotid_L <-> Parotid_R, ...) in the same step; flips along the other axes are unchanged.
"""

from __future__ import annotations

import torch
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform

from ..anatomy.structures import class_mirror_permutation
from ..inference.predictor import left_right_axis


class LateralityMirrorTransform(MirrorTransform):
    """nnU-Net's MirrorTransform whose left-right flips also permute the segmentation's labels."""

    def __init__(self, allowed_axes: tuple[int, ...], lr_axis: int, permutation: list[int]):
        super().__init__(allowed_axes)
        self.lr_axis = lr_axis
        # a lookup table over label + 1, so that nnU-Net's -1 (outside the crop) stays -1
        self._lut = torch.as_tensor([-1] + list(permutation), dtype=torch.int16)

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> torch.Tensor:
        flipped = super()._apply_to_segmentation(segmentation, **params)
        if self.lr_axis not in params["axes"]:
            return flipped
        lut = self._lut.to(flipped.device)
        return lut[(flipped.long() + 1)].to(flipped.dtype)


def make_laterality_aware(transforms, orientation: str, transpose_forward, num_classes: int) -> bool:
    """Replace the MirrorTransform in nnU-Net's training transforms by the laterality-aware one.

    Returns False (and changes nothing) when the transforms hold no mirroring. Task 1 (55 labels)
    swaps its paired classes; other label sets have no pairs and are left as stock.
    """
    permutation = list(class_mirror_permutation()) if num_classes == 55 else list(range(num_classes))
    lr_axis = left_right_axis(orientation, transpose_forward)
    for i, t in enumerate(transforms.transforms):
        if isinstance(t, MirrorTransform) and not isinstance(t, LateralityMirrorTransform):
            transforms.transforms[i] = LateralityMirrorTransform(t.allowed_axes, lr_axis, permutation)
            return True
    return False
