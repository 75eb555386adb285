"""DSC and NSD per structure exactly as the SegRap 2023 organizers compute them, and the 54-class Dice.

The organizers' evaluation (SEGRAP.md, "Evaluation") scores each structure of each case with

* DSC: ``2 |R & P| / (|R| + |P|)`` (medpy's ``dc``);
* NSD: the surface Dice at tolerance tau of Nikolov et al. (the DeepMind surface-distance
  definition): both masks' surfaces are cut into surface elements ("surfels") at the corners of the
  voxel grid, each carrying the area of the marching-cubes surface inside its 2x2x2 neighbourhood;
  NSD = (area of R's surfels within tau of P's surfels + area of P's surfels within tau of R's)
  / (total surfel area of R + of P). Distances and areas use the image's (z, y, x) spacing;
* both masks empty: 1 and 1; exactly one empty: 0 and 0; each value rounded to 4 decimals.

Each structure pair is cropped to the bounding box of the two masks (plus the one-voxel rim of
corners), which holds every surfel, so the distance maps are exact while their cost follows the
structure's size, not the image's.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from ..arrays import Box, Crop, bounding_box  # noqa: F401  (Crop: re-exported for the evaluation)
from ..errors import InputError

Spacing = tuple[float, float, float]  # mm, z, y, x

# --------------------------------------------------------------------------------------------
# Cropped masks
# --------------------------------------------------------------------------------------------


def _as_crop(mask: np.ndarray | Crop) -> Crop:
    return mask if isinstance(mask, Crop) else Crop.of(mask)


def _union_box(a: Crop, b: Crop) -> Box | None:
    boxes = [c.box for c in (a, b) if c.box is not None]
    if not boxes:
        return None
    return tuple(slice(min(bx[d].start for bx in boxes), max(bx[d].stop for bx in boxes)) for d in range(3))


def _check_pair(reference: Crop, prediction: Crop) -> None:
    if reference.shape != prediction.shape:
        raise InputError(f"Reference and prediction masks differ in shape: {reference.shape} vs "
                         f"{prediction.shape}; both must be on the same grid.")


def _check_spacing(spacing: Sequence[float]) -> Spacing:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise InputError(f"Voxel spacing must be three positive numbers (z, y, x mm), got {spacing!r}.")
    return sp


# --------------------------------------------------------------------------------------------
# Surfels: neighbour codes and their marching-cubes areas
# --------------------------------------------------------------------------------------------

# Bit of corner (a, b, c) of a 2x2x2 neighbourhood, a/b/c = 0 for the lower index along z/y/x.
# The first corner is the most significant bit, as in the organizers' evaluation code.
_CORNER_BITS = {(a, b, c): 7 - (4 * a + 2 * b + c) for a in (0, 1) for b in (0, 1) for c in (0, 1)}


@lru_cache(maxsize=None)
def _triangle_area_vectors() -> np.ndarray:
    """Area vectors (256, T, 3; index units, z, y, x) of the marching-cubes triangles of each neighbour code.

    The triangles come from the classic (Lorensen) marching cubes of a 2x2x2 block at iso-level 0.5,
    so every vertex is an edge midpoint. A code with more than four corners inside is triangulated
    as its complement (the same surface), so a code and its complement always get the same
    surface: the convention of the surface-distance definition the organizers use. Vertices are
    snapped to exact half-integers, making every area vector a multiple of 1/8.
    """
    from skimage.measure import marching_cubes  # local: only this table needs scikit-image

    per_code: list[np.ndarray] = []
    for code in range(256):
        inside = code if bin(code).count("1") <= 4 else 255 - code
        if inside in (0, 255):
            per_code.append(np.zeros((0, 3)))
            continue
        block = np.zeros((2, 2, 2), dtype=np.float64)
        for corner, bit in _CORNER_BITS.items():
            block[corner] = (inside >> bit) & 1
        verts, faces, _, _ = marching_cubes(block, level=0.5, method="lorensen", allow_degenerate=False)
        tri = np.round(verts[faces].astype(np.float64) * 2.0) / 2.0  # (T, 3 vertices, 3 axes)
        per_code.append(0.5 * np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]))
    most = max(len(v) for v in per_code)
    table = np.zeros((256, most, 3))
    for code, vectors in enumerate(per_code):
        table[code, :len(vectors)] = vectors
    return table


@lru_cache(maxsize=64)
def _surfel_area_table(spacing: Spacing) -> np.ndarray:
    table = _triangle_area_vectors()
    sz, sy, sx = spacing
    # an area vector transforms with the cofactor of the scaling: (sy sx, sz sx, sz sy)
    scaled = table * np.array([sy * sx, sz * sx, sz * sy])
    areas = np.linalg.norm(scaled, axis=2).sum(axis=1)
    areas.setflags(write=False)
    return areas


def surfel_area_table(spacing: Sequence[float]) -> np.ndarray:
    """Area in mm^2 of the surface inside a 2x2x2 neighbourhood, for each of the 256 neighbour codes."""
    return _surfel_area_table(_check_spacing(spacing))


def neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """The 8-bit code of every voxel corner of ``mask`` (shape + 1 along each axis).

    Corner (i, j, k) lies between voxels i-1 and i (and likewise along y and x); voxels outside
    the array count as outside.
    """
    padded = np.pad(np.asarray(mask, dtype=np.uint8), 1)
    n0, n1, n2 = (s + 1 for s in mask.shape)
    codes = np.zeros((n0, n1, n2), dtype=np.uint8)
    for (a, b, c), bit in _CORNER_BITS.items():
        codes |= padded[a:a + n0, b:b + n1, c:c + n2] << np.uint8(bit)
    return codes


# --------------------------------------------------------------------------------------------
# Surface distances
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SurfaceDistances:
    """Every surfel of both surfaces with its area (mm^2) and its distance (mm) to the other surface."""

    reference_to_prediction: np.ndarray  # distance of each reference surfel to the prediction's surfels
    reference_areas: np.ndarray
    prediction_to_reference: np.ndarray
    prediction_areas: np.ndarray

    def surface_dice(self, tolerance_mm: float) -> float:
        """Surface Dice at ``tolerance_mm`` (distances equal to the tolerance count as within it)."""
        total = self.reference_areas.sum() + self.prediction_areas.sum()
        if total == 0:
            return float("nan")
        within = (self.reference_areas[self.reference_to_prediction <= tolerance_mm].sum()
                  + self.prediction_areas[self.prediction_to_reference <= tolerance_mm].sum())
        return float(within / total)

    def overlap_fractions(self, tolerance_mm: float) -> tuple[float, float]:
        """Fraction of the reference's and of the prediction's surface area within the tolerance."""
        ref = self.reference_areas.sum()
        pred = self.prediction_areas.sum()
        a = self.reference_areas[self.reference_to_prediction <= tolerance_mm].sum() / ref if ref else float("nan")
        b = self.prediction_areas[self.prediction_to_reference <= tolerance_mm].sum() / pred if pred else float("nan")
        return float(a), float(b)


def _distance_to(borders: np.ndarray, spacing: Spacing) -> np.ndarray:
    if not borders.any():
        return np.full(borders.shape, np.inf)
    return ndimage.distance_transform_edt(~borders, sampling=spacing)


def surface_distances(reference: np.ndarray | Crop, prediction: np.ndarray | Crop,
                      spacing: Sequence[float]) -> SurfaceDistances:
    """Surfels of both masks with areas and distances to the other surface, on the (z, y, x) ``spacing``."""
    sp = _check_spacing(spacing)
    ref, pred = _as_crop(reference), _as_crop(prediction)
    _check_pair(ref, pred)
    box = _union_box(ref, pred)
    if box is None:
        empty = np.zeros(0)
        return SurfaceDistances(empty, empty, empty, empty)
    area = _surfel_area_table(sp)
    ref_codes = neighbour_codes(ref.within(box))
    pred_codes = neighbour_codes(pred.within(box))
    ref_borders = (ref_codes != 0) & (ref_codes != 255)
    pred_borders = (pred_codes != 0) & (pred_codes != 255)
    # each distance map is needed only at the other surface's surfels
    to_pred = _distance_to(pred_borders, sp)[ref_borders]
    to_ref = _distance_to(ref_borders, sp)[pred_borders]
    return SurfaceDistances(to_pred, area[ref_codes[ref_borders]], to_ref, area[pred_codes[pred_borders]])


# --------------------------------------------------------------------------------------------
# DSC, NSD and the per-structure score
# --------------------------------------------------------------------------------------------


def _overlap_counts(ref: Crop, pred: Crop) -> tuple[int, int, int]:
    """(|R & P|, |R|, |P|) from the crops, touching only their boxes."""
    n_ref, n_pred = ref.count(), pred.count()
    if ref.box is None or pred.box is None:
        return 0, n_ref, n_pred
    lo = [max(a.start, b.start) for a, b in zip(ref.box, pred.box)]
    hi = [min(a.stop, b.stop) for a, b in zip(ref.box, pred.box)]
    if any(h <= l for l, h in zip(lo, hi)):
        return 0, n_ref, n_pred
    box = tuple(slice(l, h) for l, h in zip(lo, hi))
    both = np.count_nonzero(ref.within(box) & pred.within(box))
    return int(both), n_ref, n_pred


def dice(reference: np.ndarray | Crop, prediction: np.ndarray | Crop) -> float:
    """Unrounded DSC with the organizers' empty-mask rules (both empty 1, one empty 0)."""
    ref, pred = _as_crop(reference), _as_crop(prediction)
    _check_pair(ref, pred)
    both, n_ref, n_pred = _overlap_counts(ref, pred)
    if n_ref == 0:
        return 1.0 if n_pred == 0 else 0.0
    return 2.0 * both / float(n_ref + n_pred)


def nsd(reference: np.ndarray | Crop, prediction: np.ndarray | Crop, spacing: Sequence[float],
        tolerance_mm: float) -> float:
    """Unrounded NSD at ``tolerance_mm`` with the organizers' empty-mask rules (both empty 1, one empty 0)."""
    ref, pred = _as_crop(reference), _as_crop(prediction)
    if ref.is_empty:
        _check_pair(ref, pred)
        return 1.0 if pred.is_empty else 0.0
    if pred.is_empty:
        _check_pair(ref, pred)
        return 0.0
    return surface_distances(ref, pred, spacing).surface_dice(tolerance_mm)


def round_dsc(value: float) -> float:
    """DSC rounded to 4 decimals as the organizers' script does (Python ``round`` on a float)."""
    return round(float(value), 4)


def round_nsd(value: float) -> float:
    """NSD rounded to 4 decimals as the organizers' script does (``round`` on a NumPy float64)."""
    return float(round(np.float64(value), 4))


@dataclass(frozen=True)
class StructureScore:
    """One structure of one case: DSC and NSD, rounded as in the challenge tables and unrounded."""

    structure: str
    dsc_exact: float
    nsd_exact: float
    tolerance_mm: float
    reference_voxels: int
    prediction_voxels: int
    voxel_volume_mm3: float

    @property
    def dsc(self) -> float:
        return round_dsc(self.dsc_exact)

    @property
    def nsd(self) -> float:
        return round_nsd(self.nsd_exact)

    @property
    def reference_ml(self) -> float:
        return self.reference_voxels * self.voxel_volume_mm3 / 1000.0

    @property
    def prediction_ml(self) -> float:
        return self.prediction_voxels * self.voxel_volume_mm3 / 1000.0


def score_structure(name: str, reference: np.ndarray | Crop, prediction: np.ndarray | Crop,
                    spacing: Sequence[float], tolerance_mm: float | None = None) -> StructureScore:
    """DSC and NSD of one structure; the tolerance defaults to the catalogue's for ``name``."""
    from ..anatomy import structures as S

    sp = _check_spacing(spacing)
    structure = S.get(name)
    tol = structure.nsd_tolerance_mm if tolerance_mm is None else float(tolerance_mm)
    ref, pred = _as_crop(reference), _as_crop(prediction)
    _check_pair(ref, pred)
    return StructureScore(structure.name, dice(ref, pred), nsd(ref, pred, sp, tol), tol, ref.count(),
                          pred.count(), sp[0] * sp[1] * sp[2])


# --------------------------------------------------------------------------------------------
# The 54-class Dice (DKFZ poster: mean over the classes of a Task 1 label map)
# --------------------------------------------------------------------------------------------


def class_dice(reference: np.ndarray, prediction: np.ndarray, num_classes: int = 54) -> np.ndarray:
    """Dice of each class 1..num_classes of two label maps; NaN where the class is absent from both.

    NaN for absent classes follows nnU-Net's summaries, which the poster's cross-validation
    figure comes from: such a class is left out of the means rather than counted as 1.
    """
    ref = np.asarray(reference)
    pred = np.asarray(prediction)
    if ref.shape != pred.shape:
        raise InputError(f"Label maps differ in shape: {ref.shape} vs {pred.shape}.")
    for what, lm in (("reference", ref), ("prediction", pred)):
        if lm.size and (lm.min() < 0 or lm.max() > num_classes):
            raise InputError(f"The {what} label map holds values {int(lm.min())}..{int(lm.max())}; "
                             f"expected 0..{num_classes}.")
    n = num_classes + 1
    r = ref.ravel().astype(np.intp, copy=False)
    p = pred.ravel().astype(np.intp, copy=False)
    n_ref = np.bincount(r, minlength=n)
    n_pred = np.bincount(p, minlength=n)
    agree = r[r == p]
    n_both = np.bincount(agree, minlength=n)
    denom = (n_ref + n_pred)[1:].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = 2.0 * n_both[1:] / denom
    out[denom == 0] = np.nan
    return out


def mean_class_dice(per_case: Sequence[np.ndarray]) -> float:
    """Mean over classes of each class's mean over cases (NaNs left out), as nnU-Net's foreground mean."""
    stack = np.vstack([np.asarray(c, dtype=float) for c in per_case])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class absent everywhere: its mean is NaN
        per_class = np.nanmean(stack, axis=0)
        return float(np.nanmean(per_class))
