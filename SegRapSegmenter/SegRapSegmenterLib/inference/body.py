"""The patient's body in a CT, and the box around it that inference has to look at.

Everything outside the body is air, the couch or arms; no head-and-neck structure lies there, so
the network need not see it. The body is the largest connected region above ``THRESHOLD_HU`` after
an opening that cuts thin bridges (a couch touching the back, a headrest); it is found on an
in-plane subsampled copy, which is faster and lighter than the full grid and is covered by the margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

THRESHOLD_HU = -400.0  # between air (-1000) and fat (-100); lung-like tissue in the neck stays inside the box
MARGIN_MM = 20.0  # around the body, so that the network sees the skin with its context
OPENING_MM = 6.0  # bridges thinner than this (couch, cushions, cables) are cut before picking the body
WORK_SPACING_MM = 2.0  # in-plane spacing of the subsampled copy the body is found on


@dataclass(frozen=True)
class BodyBox:
    """Voxel box (z, y, x; start inclusive, stop exclusive) around the body, on the CT's own grid."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    found: bool = True  # False: no body was found and the box is the whole image

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    def fraction_of(self, shape) -> float:
        """The box's share of an image of ``shape`` (for logs: how much work the crop saved)."""
        return float(np.prod(self.shape)) / float(np.prod(shape))

    def as_mask(self, shape) -> np.ndarray:
        mask = np.zeros(shape, bool)
        mask[self.slices] = True
        return mask


def body_mask(ct: np.ndarray, spacing_zyx, threshold_hu: float = THRESHOLD_HU,
              opening_mm: float = OPENING_MM) -> tuple[np.ndarray, int]:
    """Body mask of ``ct`` (HU, z, y, x) on an in-plane subsampled grid, and the subsampling step."""
    step = max(1, int(WORK_SPACING_MM // max(min(spacing_zyx[1:]), 1e-3)))
    small = ct[:, ::step, ::step] > threshold_hu
    ry, rx = (max(1, int(round(opening_mm / 2 / (s * step)))) for s in spacing_zyx[1:])
    yy, xx = np.ogrid[-ry:ry + 1, -rx:rx + 1]
    disk = ((yy / ry) ** 2 + (xx / rx) ** 2 <= 1.0)[None]  # in-plane only: slices stay independent
    opened = ndimage.binary_opening(small, disk)
    labels, count = ndimage.label(opened)
    if count == 0:
        return np.zeros_like(small), step
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes)), step


@dataclass(frozen=True)
class Body:
    """The boxes around the body: ``box`` with the margin inference looks at, ``tight`` without it."""

    box: BodyBox
    tight: BodyBox

    def outside_fraction(self, box: tuple[slice, ...], mask: np.ndarray) -> float:
        """The share of a cropped mask's voxels (``box`` on the CT grid) outside the body's tight box: no
        head-and-neck structure lies there, only air, the couch or the margin the network saw beside the skin.
        A box rather than the body's outline: air open to the outside (ear canals, nostrils, an open mouth)
        would otherwise count as outside, and the outline costs seconds at full size."""
        if not self.tight.found or not mask.any():
            return 0.0
        inside = mask.copy()
        for axis, (part, lo, hi) in enumerate(zip(box, self.tight.start, self.tight.stop)):
            index = np.arange(part.start, part.start + mask.shape[axis])
            keep = (index >= lo) & (index < hi)
            shape = [1, 1, 1]
            shape[axis] = -1
            inside &= keep.reshape(shape)
        return 1.0 - float(np.count_nonzero(inside)) / float(np.count_nonzero(mask))


def body_of_image(ct: sitk.Image, margin_mm: float = MARGIN_MM) -> Body:
    """The CT's body boxes, both from one body mask."""
    spacing_zyx = tuple(ct.GetSpacing())[::-1]
    array = sitk.GetArrayViewFromImage(ct)
    mask, step = body_mask(array, spacing_zyx)
    return Body(_box_of_mask(mask, step, array.shape, spacing_zyx, margin_mm),
                _box_of_mask(mask, step, array.shape, spacing_zyx, 0.0))


def body_box(ct: np.ndarray, spacing_zyx, margin_mm: float = MARGIN_MM) -> BodyBox:
    """The box around the body plus ``margin_mm``, clipped to the image (the whole image when no body is found)."""
    mask, step = body_mask(ct, spacing_zyx)
    return _box_of_mask(mask, step, ct.shape, spacing_zyx, margin_mm)


def _box_of_mask(mask: np.ndarray, step: int, shape, spacing_zyx, margin_mm: float) -> BodyBox:
    if not mask.any():
        return BodyBox((0, 0, 0), tuple(int(n) for n in shape), found=False)
    start, stop = [], []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=others))
        scale = 1 if axis == 0 else step
        lo, hi = present[0] * scale, (present[-1] + 1) * scale  # a subsampled voxel stands for `step` voxels
        pad = int(np.ceil(margin_mm / spacing_zyx[axis]))
        start.append(int(max(0, lo - pad)))
        stop.append(int(min(shape[axis], hi + pad)))
    return BodyBox(tuple(start), tuple(stop))


def body_box_of_image(ct: sitk.Image, margin_mm: float = MARGIN_MM) -> BodyBox:
    """``body_box`` of a SimpleITK CT on its own grid."""
    return body_box(sitk.GetArrayViewFromImage(ct), tuple(ct.GetSpacing())[::-1], margin_mm)


def reoriented_box(box: BodyBox, image: sitk.Image, reoriented: sitk.Image) -> BodyBox:
    """The same voxels' box on ``reoriented`` (``image`` after ``sitk.DICOMOrient``: axes permuted and flipped)."""
    size = image.GetSize()  # x, y, z
    d_in = np.array(image.GetDirection()).reshape(3, 3)
    d_out = np.array(reoriented.GetDirection()).reshape(3, 3)
    signed = np.rint(d_in.T @ d_out).astype(int)  # column k: which input axis (and sign) output axis k runs along
    start_xyz, stop_xyz = box.start[::-1], box.stop[::-1]
    new_start, new_stop = [0, 0, 0], [0, 0, 0]
    for k in range(3):
        axis = int(np.flatnonzero(signed[:, k])[0])
        if signed[axis, k] > 0:
            new_start[k], new_stop[k] = start_xyz[axis], stop_xyz[axis]
        else:
            new_start[k], new_stop[k] = size[axis] - stop_xyz[axis], size[axis] - start_xyz[axis]
    return BodyBox(tuple(new_start[::-1]), tuple(new_stop[::-1]), box.found)
