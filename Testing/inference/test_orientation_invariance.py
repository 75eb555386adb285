"""The same CT stored with each index axis flipped, or turned 90 degrees in-plane, gives the same structures in
patient space (equal label maps on a common grid, Dice 1.0 per structure), with and without test-time mirroring.

``sitk.DICOMOrient`` changes how the voxels are stored (axis order and direction), not the anatomy. The
predictions are mapped onto the original grid by nearest-neighbour resampling through physical space,
independently of the predictor's own reorientation. Tiles do not overlap (tile step 1.0) to keep the
file within a minute on two CPU cores; the property does not depend on the tiling.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.arrays import uint8_image
from SegRapSegmenterLib.evaluation import metrics
from SegRapSegmenterLib.inference.bundles import resolve_bundle
from SegRapSegmenterLib.inference.predictor import InferenceOptions, TaskPredictor
from SegRapSegmenterLib.phantom import cases as phantom

# flip x (left-right), flip y, flip z, and x <-> y (a 90-degree in-plane turn)
STORAGES = ("RPS", "LAS", "LPI", "PLS")


def _options(mirror: bool) -> InferenceOptions:
    return InferenceOptions(device="cpu", mirror=mirror, tile_step_size=1.0)


@pytest.fixture(scope="module")
def case() -> phantom.PhantomCase:
    return phantom.make_case(0, seed=21, size="small")


@pytest.fixture(scope="module", params=[False, True], ids=["no-mirroring", "left-right-mirroring"])
def oar(request, case):
    """(predictor, its prediction of the CT as stored by the phantom, in LPS) for one mirroring mode."""
    predictor = TaskPredictor(resolve_bundle("demo"), "oar", _options(mirror=request.param))
    assert predictor.mirroring_axes == ((2,) if request.param else ())  # demo: left-right flips only,
    assert predictor.swaps_left_right == request.param  # with the paired classes swapped
    return predictor, predictor.predict(case.ct)


def _on_grid(labels: np.ndarray, stored: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """A label map on ``stored``'s grid resampled (nearest) onto ``reference``'s grid through physical space."""
    image = uint8_image(labels, stored)
    return sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 255))


def _centroid_x(labels: np.ndarray, name: str) -> float:
    return float(np.nonzero(labels == S.class_labels()[name])[2].mean())


@pytest.mark.parametrize("storage", STORAGES)
def test_flipped_or_turned_storage_gives_the_same_structures(oar, case, storage):
    predictor, expected = oar
    stored = sitk.DICOMOrient(case.ct, storage)
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(stored.GetDirection()) == storage
    assert not np.array_equal(sitk.GetArrayViewFromImage(stored), sitk.GetArrayViewFromImage(case.ct))
    labels = _on_grid(predictor.predict(stored), stored, case.ct)
    assert np.array_equal(labels, expected)
    found, truth = S.recompose(labels), S.recompose(expected)
    scored = [n for n in S.OAR_NAMES if truth[n].any()]
    assert len(scored) >= 10 and all(metrics.dice(truth[n], found[n]) == 1.0 for n in scored)


@pytest.mark.parametrize("oar", [False], indirect=True, ids=["no-mirroring"])
def test_a_mirrored_patient_is_not_the_same_patient(oar, case):
    """The check has teeth: the flipped voxels presented as LPS (a mirrored anatomy) change the labels."""
    predictor, expected = oar
    mirrored = sitk.GetImageFromArray(sitk.GetArrayFromImage(case.ct)[:, :, ::-1].copy())
    mirrored.CopyInformation(case.ct)
    labels = predictor.predict(mirrored)[:, :, ::-1]  # flipped back onto the patient, labels not swapped
    assert not np.array_equal(labels, expected)
    # the demo network places left and right by position: unswapped, Mandible_L now lies on the patient's right
    assert _centroid_x(expected, "Mandible_L") > _centroid_x(expected, "Mandible_R")  # LPS: +x is left
    assert _centroid_x(labels, "Mandible_L") < _centroid_x(labels, "Mandible_R")


@pytest.fixture(scope="module")
def gtv(case):
    """(GTV predictor without mirroring, its prediction of the contrast CT as stored by the phantom)."""
    predictor = TaskPredictor(resolve_bundle("demo"), "gtv", _options(mirror=False))
    return predictor, predictor.predict(case.contrast_ct)


@pytest.mark.parametrize("storage", ["RPS", "PLS"])
def test_gtvs_on_the_contrast_ct_do_not_depend_on_storage(gtv, case, storage):
    predictor, expected = gtv
    stored = sitk.DICOMOrient(case.contrast_ct, storage)
    labels = _on_grid(predictor.predict(stored), stored, case.contrast_ct)
    assert np.array_equal(labels, expected) and set(np.unique(expected)) >= {0, 1}
