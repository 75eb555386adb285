"""DSC and NSD against cases whose answers are known: geometry of surfels, spheres, boxes, single voxels, empties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.evaluation import metrics as M

ANISO = (3.0, 0.8, 0.5)  # z, y, x mm, like a CT with thick slices


def _bit(a: int, b: int, c: int) -> int:
    """Code bit of corner (a, b, c) of a 2x2x2 block (z, y, x), first corner most significant."""
    return 1 << (7 - (4 * a + 2 * b + c))


def _sphere(shape, spacing, centre, radius) -> np.ndarray:
    z, y, x = np.indices(shape, dtype=float)
    return ((z * spacing[0] - centre[0]) ** 2 + (y * spacing[1] - centre[1]) ** 2
            + (x * spacing[2] - centre[2]) ** 2) <= radius ** 2


def _box(shape, lo, hi) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return mask


def _sphere_nsd(radius: float, offset: float, tau: float) -> float:
    """Surface Dice of two spheres of equal radius whose centres lie ``offset`` apart (continuum)."""
    # a point at angle t from the offset axis lies |sqrt(R^2 + d^2 - 2 R d cos t) - R| from the other sphere
    lo = (offset ** 2 + radius ** 2 - (radius + tau) ** 2) / (2 * radius * offset)
    hi = (offset ** 2 + radius ** 2 - (radius - tau) ** 2) / (2 * radius * offset)
    return max(0.0, min(hi, 1.0) - max(lo, -1.0)) / 2.0  # area is uniform in cos t


# --------------------------------------------------------------------------------------------
# Surfel areas
# --------------------------------------------------------------------------------------------


def test_surfel_areas_are_the_marching_cubes_areas_on_an_anisotropic_grid():
    sz, sy, sx = ANISO
    table = M.surfel_area_table(ANISO)
    corner = math.sqrt((sy * sx) ** 2 + (sz * sx) ** 2 + (sz * sy) ** 2) / 8.0
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                assert table[_bit(a, b, c)] == pytest.approx(corner, rel=1e-12)
    # four corners on one side of a plane: a flat voxel face
    lower_z = sum(_bit(0, b, c) for b in (0, 1) for c in (0, 1))
    lower_y = sum(_bit(a, 0, c) for a in (0, 1) for c in (0, 1))
    lower_x = sum(_bit(a, b, 0) for a in (0, 1) for b in (0, 1))
    assert table[lower_z] == pytest.approx(sy * sx)
    assert table[lower_y] == pytest.approx(sz * sx)
    assert table[lower_x] == pytest.approx(sz * sy)
    # two corners along an edge: a rectangle, edge length times half the face diagonal
    assert table[_bit(0, 0, 0) | _bit(1, 0, 0)] == pytest.approx(sz * math.hypot(sy / 2, sx / 2))
    assert table[_bit(0, 0, 0) | _bit(0, 1, 0)] == pytest.approx(sy * math.hypot(sz / 2, sx / 2))
    assert table[_bit(0, 0, 0) | _bit(0, 0, 1)] == pytest.approx(sx * math.hypot(sz / 2, sy / 2))


def test_a_code_and_its_complement_carry_the_same_surface():
    table = M.surfel_area_table(ANISO)
    assert table[0] == table[255] == 0.0
    np.testing.assert_allclose(table, table[::-1], rtol=1e-12)
    assert np.all(table[1:255] > 0)


def test_box_surface_area_is_exact_on_an_anisotropic_grid():
    n0, n1, n2 = 5, 7, 9
    sz, sy, sx = ANISO
    mask = _box((n0 + 4, n1 + 4, n2 + 4), (2, 2, 2), (2 + n0, 2 + n1, 2 + n2))
    sd = M.surface_distances(mask, mask, ANISO)
    faces = 2 * ((n1 - 1) * (n2 - 1) * sy * sx + (n0 - 1) * (n2 - 1) * sz * sx + (n0 - 1) * (n1 - 1) * sz * sy)
    edges = 4 * ((n0 - 1) * sz * math.hypot(sy, sx) + (n1 - 1) * sy * math.hypot(sz, sx)
                 + (n2 - 1) * sx * math.hypot(sz, sy)) / 2
    vertices = math.sqrt((sy * sx) ** 2 + (sz * sx) ** 2 + (sz * sy) ** 2)
    assert sd.reference_areas.sum() == pytest.approx(faces + edges + vertices, rel=1e-12)
    assert np.all(sd.reference_to_prediction == 0)


# --------------------------------------------------------------------------------------------
# Spheres: NSD as a function of the tolerance
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing,axis", [((1.0, 1.0, 1.0), 2), ((3.0, 1.0, 1.0), 0), ((1.0, 0.6, 0.6), 1)])
def test_offset_spheres_follow_the_analytic_surface_dice(spacing, axis):
    radius, offset = 18.0, 6.0  # the offset is a whole number of voxels along every axis used
    shape = tuple(int((2 * radius + offset + 6) / s) for s in spacing)
    centre = np.full(3, radius + 3.0)
    moved = centre.copy()
    moved[axis] += offset
    ref, pred = _sphere(shape, spacing, centre, radius), _sphere(shape, spacing, moved, radius)
    sd = M.surface_distances(ref, pred, spacing)
    assert sd.reference_areas.sum() / (4 * math.pi * radius ** 2) == pytest.approx(1.1, abs=0.1)
    h = max(spacing)
    curve = [sd.surface_dice(tau) for tau in (1.0, 2.0, 3.0, 4.0, 5.0)]
    assert curve == sorted(curve)
    for tau, value in zip((1.0, 2.0, 3.0, 4.0, 5.0), curve):
        # voxel surfaces sit within a voxel of the true ones: the value lies between the analytic
        # curve at tau and at tau + one voxel
        assert _sphere_nsd(radius, offset, tau) - 1e-9 <= value <= _sphere_nsd(radius, offset, tau + h) + 1e-9
    # a whole-voxel translation moves every surfel exactly `offset` away at most
    assert sd.surface_dice(offset) == 1.0
    assert M.nsd(ref, pred, spacing, offset - 1e-6) < 1.0
    assert M.nsd(ref, ref, spacing, 0.0) == 1.0


# --------------------------------------------------------------------------------------------
# Boxes shifted on anisotropic grids, and the tolerance boundary
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_box_shifted_one_voxel_is_within_exactly_that_voxels_spacing(axis):
    shape = (12, 14, 16)
    lo, hi = [2, 3, 4], [8, 10, 12]
    ref = _box(shape, lo, hi)
    lo[axis] += 1
    hi[axis] += 1
    pred = _box(shape, lo, hi)
    step = ANISO[axis]
    assert M.nsd(ref, pred, ANISO, step) == 1.0  # a distance equal to the tolerance counts
    assert M.nsd(ref, pred, ANISO, step * (1 - 1e-9)) < 1.0
    length = hi[axis] - lo[axis]
    assert M.dice(ref, pred) == pytest.approx((length - 1) / length)


def test_spacing_order_is_z_y_x():
    ref = _box((12, 14, 16), (2, 3, 4), (8, 10, 12))
    along_z = _box((12, 14, 16), (3, 3, 4), (9, 10, 12))
    along_x = _box((12, 14, 16), (2, 3, 5), (8, 10, 13))
    assert M.nsd(ref, along_x, ANISO, 1.0) == 1.0  # 0.5 mm step
    assert M.nsd(ref, along_z, ANISO, 1.0) < 0.9  # 3 mm step


# --------------------------------------------------------------------------------------------
# One-voxel structures and empty masks
# --------------------------------------------------------------------------------------------


def _voxel(z: int, y: int, x: int, shape=(6, 6, 6)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[z, y, x] = True
    return mask


def test_one_voxel_structures():
    here = _voxel(2, 2, 2)
    assert M.dice(here, here) == 1.0 and M.nsd(here, here, ANISO, 1.0) == 1.0
    beside_x, beside_z = _voxel(2, 2, 3), _voxel(3, 2, 2)
    assert M.dice(here, beside_x) == 0.0
    # the two cubes share 4 of their 8 equal-area corner surfels; the other 4 lie one step away
    assert M.nsd(here, beside_x, ANISO, 0.25) == pytest.approx(0.5)
    assert M.nsd(here, beside_x, ANISO, 0.5) == 1.0
    assert M.nsd(here, beside_z, ANISO, 1.0) == pytest.approx(0.5)
    assert M.nsd(here, beside_z, ANISO, 3.0) == 1.0
    assert M.nsd(here, _voxel(5, 5, 5), ANISO, 3.0) == 0.0


def test_empty_masks_follow_the_organizers_rules():
    empty, full = np.zeros((5, 5, 5), bool), _voxel(2, 2, 2, (5, 5, 5))
    both_empty = M.score_structure("Parotid_L", empty, empty, ANISO)
    assert (both_empty.dsc, both_empty.nsd) == (1.0, 1.0)
    false_positive = M.score_structure("Parotid_L", empty, full, ANISO)
    assert (false_positive.dsc, false_positive.nsd) == (0.0, 0.0)
    missed = M.score_structure("Parotid_L", full, empty, ANISO)
    assert (missed.dsc, missed.nsd) == (0.0, 0.0)
    assert (missed.reference_voxels, missed.prediction_voxels) == (1, 0)


# --------------------------------------------------------------------------------------------
# Scores, tolerances, rounding, crops
# --------------------------------------------------------------------------------------------


def test_tolerance_comes_from_the_catalogue():
    mask = _voxel(2, 2, 2)
    assert M.score_structure("Larynx", mask, mask, ANISO).tolerance_mm == 2.0
    assert M.score_structure("Cavity_Oral", mask, mask, ANISO).tolerance_mm == 3.0
    assert M.score_structure("GTVnd", mask, mask, ANISO).tolerance_mm == 1.0
    assert M.score_structure("Brain", mask, mask, ANISO, tolerance_mm=5).tolerance_mm == 5.0


def test_scores_are_rounded_to_four_decimals_and_kept_exact():
    ref = _box((4, 4, 8), (1, 1, 0), (2, 2, 3))  # 3 voxels
    pred = _box((4, 4, 8), (1, 1, 1), (2, 2, 3))  # 2 of them
    score = M.score_structure("Chiasm", ref, pred, ANISO)
    assert score.dsc_exact == pytest.approx(0.8)
    ref = _box((4, 4, 8), (1, 1, 0), (2, 2, 6))  # 6 voxels, 5 shared, 5 predicted -> 10/11
    pred = _box((4, 4, 8), (1, 1, 1), (2, 2, 6))
    score = M.score_structure("Chiasm", ref, pred, ANISO, tolerance_mm=0.25)  # below the 0.5 mm x step
    assert score.dsc_exact == 10 / 11 and score.dsc == 0.9091
    assert score.nsd == round(score.nsd_exact, 4) and 0 < score.nsd < 1
    assert score.reference_ml == pytest.approx(6 * 3.0 * 0.8 * 0.5 / 1000)


def test_crops_score_like_full_masks(small_case):
    masks = small_case.oar_masks()
    spacing = small_case.ct.GetSpacing()[::-1]
    for name in ("Brain", "Parotid_L", "Lens_R"):
        full = masks[name]
        shifted = np.roll(full, 1, axis=2)
        crop = M.Crop.from_box(full.shape, *masks.crop(name))
        assert crop.count() == int(full.sum())
        np.testing.assert_array_equal(crop.full(), full)
        a = M.score_structure(name, crop, M.Crop.of(shifted), spacing)
        b = M.score_structure(name, full, shifted, spacing)
        assert (a.dsc_exact, a.nsd_exact) == (b.dsc_exact, b.nsd_exact)


def test_grids_must_match():
    with pytest.raises(Exception, match="shape"):
        M.dice(np.zeros((3, 3, 3), bool), np.zeros((3, 3, 4), bool))


# --------------------------------------------------------------------------------------------
# The 54-class Dice
# --------------------------------------------------------------------------------------------


def test_class_dice_of_label_maps(small_case):
    lm = small_case.labelmap
    same = M.class_dice(lm, lm)
    present = np.isin(np.arange(1, S.NUM_CLASSES + 1), np.unique(lm))
    assert np.all(same[present] == 1.0) and np.all(np.isnan(same[~present]))
    damaged = lm.copy()
    damaged[lm == 46] = 0  # the spinal cord (class 46) missed entirely
    scores = M.class_dice(lm, damaged)
    assert scores[45] == 0.0
    assert M.mean_class_dice([scores]) == pytest.approx((present.sum() - 1) / present.sum())
