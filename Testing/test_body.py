"""The body box: every structure inside it, the couch and stray objects outside, the same voxels in any storage order."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from SegRapSegmenterLib.arrays import uint8_image
from SegRapSegmenterLib.inference.body import MARGIN_MM, body_box, body_box_of_image, reoriented_box
from SegRapSegmenterLib.phantom import cases as phantom


def _inside(box, mask: np.ndarray) -> bool:
    return not (mask & ~box.as_mask(mask.shape)).any()


@pytest.mark.parametrize("index, direction", [(0, "identity"), (1, "flipped"), (2, "rotated"), (3, "oblique")])
def test_the_box_never_cuts_a_structure(index, direction):
    case = phantom.make_case(index, seed=7, size="small", direction=direction)
    box = body_box_of_image(case.ct)
    assert box.found
    assert _inside(box, case.labelmap > 0)
    assert _inside(box, case.gtv_labelmap > 0)
    contrast_box = body_box_of_image(case.contrast_ct)
    assert _inside(contrast_box, case.gtv_labelmap > 0)


def _padded(ct: np.ndarray, pad: int) -> np.ndarray:
    """The CT in a field of view ``pad`` voxels wider on every in-plane side, filled with air."""
    out = np.full((ct.shape[0], ct.shape[1] + 2 * pad, ct.shape[2] + 2 * pad), -1000.0, np.float32)
    out[:, pad:-pad, pad:-pad] = ct
    return out


def test_a_couch_touching_the_back_and_an_arm_apart_stay_outside():
    case = phantom.make_case(0, seed=7, size="small")
    spacing = case.ct.GetSpacing()[::-1]
    pad = 40
    ct = _padded(sitk.GetArrayFromImage(case.ct).astype(np.float32), pad)
    labels = np.pad(case.labelmap > 0, ((0, 0), (pad, pad), (pad, pad)))
    body_rows = np.flatnonzero((ct > -400).any(axis=(0, 2)))
    back = int(body_rows[-1])  # posterior is +y in LPS, the last row of the body
    ct[:, back + 1:back + 4, :] = 100.0  # a couch 6 mm thick right under the patient, the full width
    ct[:, back:back + 1, 60:64] = 100.0  # touching it through a thin cushion
    ct[:, 20:40, 2:20] = 40.0  # an arm lying beside, not connected
    box = body_box(ct, spacing)
    assert _inside(box, labels)
    margin = int(np.ceil(MARGIN_MM / spacing[2]))
    assert box.start[2] > 20 - margin // 2  # the arm at x < 20 is not in
    assert box.stop[1] <= back + 1 + int(np.ceil(MARGIN_MM / spacing[1]))  # only the margin reaches the couch
    assert box.shape[2] < ct.shape[2]  # the couch's width did not widen the box to the whole image


def test_no_body_gives_the_whole_image():
    air = np.full((10, 32, 32), -1000.0, np.float32)
    box = body_box(air, (3.0, 1.0, 1.0))
    assert not box.found and box.start == (0, 0, 0) and box.stop == (10, 32, 32)


@pytest.mark.parametrize("orientation", ["RPS", "LAS", "LPI", "PLS", "ASL", "IRP"])
def test_reoriented_box_holds_the_same_voxels(orientation):
    case = phantom.make_case(0, seed=7, size="small")
    box = body_box_of_image(case.ct)
    mask = uint8_image(box.as_mask(sitk.GetArrayViewFromImage(case.ct).shape), case.ct)
    moved = sitk.DICOMOrient(mask, orientation)
    expected = sitk.GetArrayFromImage(moved).astype(bool)
    got = reoriented_box(box, case.ct, sitk.DICOMOrient(case.ct, orientation))
    np.testing.assert_array_equal(got.as_mask(expected.shape), expected)


def test_what_lies_outside_the_body_is_measured_against_its_tight_box(small_case):
    from SegRapSegmenterLib.inference.body import body_of_image

    body = body_of_image(small_case.ct)
    assert body.box == body_box_of_image(small_case.ct)
    assert all(b <= t for b, t in zip(body.box.start, body.tight.start))
    assert all(t <= b for b, t in zip(body.box.stop, body.tight.stop))
    masks = small_case.oar_masks()
    for name in masks:  # the truth of every structure, air-filled ones too, lies inside
        assert body.outside_fraction(*masks.crop(name)) < 0.05, name
    corner = np.ones((4, 4, 4), bool)  # a cube of air in the image's corner, far from the patient
    assert body.outside_fraction((slice(0, 4), slice(0, 4), slice(0, 4)), corner) == 1.0
    half = np.ones((1, 1, 4), bool)  # two voxels in the box, two beyond its right edge
    x0 = body.tight.stop[2] - 2
    z, y = body.tight.start[0], body.tight.start[1]
    assert body.outside_fraction((slice(z, z + 1), slice(y, y + 1), slice(x0, x0 + 4)), half) == 0.5
