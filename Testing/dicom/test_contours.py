"""contours.trace / contours.fill: the 0.5 iso-line of each slice and its even-odd fill give the mask back exactly."""

from __future__ import annotations

import numpy as np
import pytest
from SegRapSegmenterLib.formats.contours import Contours, fill, keyhole, signed_areas, trace


def _roundtrip(mask: np.ndarray) -> tuple[Contours, np.ndarray]:
    found = trace(mask)
    return found, fill(found, mask.shape)


def test_random_masks_come_back_exactly():
    rng = np.random.default_rng(4)
    for _ in range(300):
        shape = (int(rng.integers(1, 4)), int(rng.integers(1, 14)), int(rng.integers(1, 14)))
        mask = rng.random(shape) < rng.uniform(0.05, 0.95)
        assert np.array_equal(_roundtrip(mask)[1], mask)


@pytest.mark.parametrize("box", [(1, 1), (2, 2), (1, 3), (5, 1)])
def test_tiny_structures_survive(box):
    mask = np.zeros((3, 8, 8), dtype=bool)
    mask[1, 3:3 + box[0], 2:2 + box[1]] = True
    found, back = _roundtrip(mask)
    assert len(found) == 1 and found.slices.tolist() == [1]
    assert np.array_equal(back, mask)


def test_two_by_two_contour_is_the_octagon_through_the_edge_midpoints():
    mask = np.zeros((1, 6, 6), dtype=bool)
    mask[0, 2:4, 2:4] = True
    pts = trace(mask).contour(0)
    expected = {(1.5, 2.0), (1.5, 3.0), (2.0, 3.5), (3.0, 3.5), (3.5, 3.0), (3.5, 2.0), (3.0, 1.5), (2.0, 1.5)}
    assert {tuple(p) for p in pts.tolist()} == expected


def test_vertices_lie_on_voxel_edge_midpoints_away_from_every_centre():
    rng = np.random.default_rng(1)
    mask = rng.random((2, 20, 20)) < 0.5
    pts = trace(mask).points
    frac = np.abs(pts - np.round(pts))
    # one coordinate on the voxel grid, the other half-way between two voxel centres
    assert np.all(np.sort(frac, axis=1) == np.array([0.0, 0.5]))


def test_holes_are_separate_contours_and_even_odd_fill_keeps_them_empty():
    mask = np.zeros((1, 9, 9), dtype=bool)
    mask[0, 1:8, 1:8] = True
    mask[0, 3:6, 3:6] = False  # hole
    mask[0, 4, 4] = True  # island inside the hole
    found, back = _roundtrip(mask)
    assert len(found) == 3
    assert np.array_equal(back, mask)


def test_diagonal_neighbours_are_separate_contours_that_share_no_vertex():
    mask = np.zeros((1, 6, 6), dtype=bool)
    mask[0, 2, 2] = mask[0, 3, 3] = True
    found, back = _roundtrip(mask)
    assert len(found) == 2
    a, b = ({tuple(p) for p in found.contour(k).tolist()} for k in range(2))
    assert not a & b
    assert np.array_equal(back, mask)


def test_no_vertex_is_shared_by_two_contours_of_a_slice():
    rng = np.random.default_rng(2)
    mask = rng.random((1, 30, 30)) < 0.45
    pts = trace(mask).points
    assert len({tuple(p) for p in pts.tolist()}) == len(pts)


def test_structures_touching_the_image_border_close_outside_it():
    mask = np.zeros((2, 5, 7), dtype=bool)
    mask[0] = True
    mask[1, 0:2, 5:7] = True
    found, back = _roundtrip(mask)
    assert np.array_equal(back, mask)
    assert found.points.min() == -0.5


def test_collinear_vertices_are_dropped():
    mask = np.zeros((1, 40, 40), dtype=bool)
    mask[0, 5:35, 5:35] = True
    assert len(trace(mask).contour(0)) == 8  # a square with its four corners cut


def test_empty_mask_gives_no_contours():
    found = trace(np.zeros((3, 4, 4), dtype=bool))
    assert len(found) == 0
    assert not fill(found, (3, 4, 4)).any()


def _union_fill(contours: Contours, shape) -> np.ndarray:
    """Each contour filled on its own and OR-ed: how readers that union a slice's contours read them."""
    out = np.zeros(shape, dtype=bool)
    for k in range(len(contours)):
        one = Contours(contours.slices[k:k + 1], np.array([0, contours.offsets[k + 1] - contours.offsets[k]]),
                       contours.contour(k))
        out |= fill(one, shape)
    return out


def test_keyhole_contours_read_the_same_by_even_odd_and_union_readers():
    """Rings, holes with islands in them, many holes per region: no hole contour is left after the cut."""
    rng = np.random.default_rng(7)
    holes_seen = 0
    for _ in range(12):
        mask = rng.random((2, 40, 40)) > 0.35  # dense noise: regions riddled with holes and islands
        contours = trace(mask)
        holes_seen += int((signed_areas(contours) < 0).sum())
        cut = keyhole(contours)
        assert not (signed_areas(cut) < 0).any()
        assert np.array_equal(fill(cut, mask.shape), mask)
        assert np.array_equal(_union_fill(cut, mask.shape), mask)
    assert holes_seen > 100
