"""nnU-Net's preprocessing in blocks of slices: the same array as ``run_case_npy``, without whole-volume float copies."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from SegRapSegmenterLib.inference.bundles import resolve_bundle
from SegRapSegmenterLib.inference.predictor import InferenceOptions, TaskPredictor
from SegRapSegmenterLib.inference.preprocess import preprocess_in_blocks
from SegRapSegmenterLib.phantom import cases as phantom


@pytest.fixture(scope="module")
def plans():
    result = resolve_bundle("demo").result_path("oar")
    manager = PlansManager(json.loads((result / "plans.json").read_text()))
    return manager, manager.get_configuration("3d_fullres"), json.loads((result / "dataset.json").read_text())


@pytest.fixture(scope="module")
def ct():
    return phantom.make_case(2, seed=99, size="small").ct


def _on_grid(image: sitk.Image, spacing_xyz, pixel=None) -> sitk.Image:
    size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing_xyz)]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing_xyz,
                         image.GetDirection(), -1000.0, pixel or image.GetPixelID())


def _both(image: sitk.Image, plans):
    manager, configuration, dataset = plans
    array = sitk.GetArrayViewFromImage(image)[None]
    spacing = list(image.GetSpacing())[::-1]
    ours = preprocess_in_blocks(array, spacing, manager, configuration, dataset, configuration.preprocessor_class)
    data, _, props = configuration.preprocessor_class(verbose=False).run_case_npy(
        array, None, {"spacing": list(spacing)}, manager, configuration, dataset)
    return ours, data, props


# the demo plans' 3 x 2 x 2 mm; in-plane voxels 3.75 times finer than the slices, so nnU-Net resamples
# in plane slice by slice; then slices of 2.5 mm (6 more output slices, nearest-neighbour) and float voxels
@pytest.mark.parametrize("spacing, pixel", [((2.0, 2.0, 3.0), None), ((0.8, 0.8, 3.0), None),
                                            ((0.8, 0.8, 2.5), None), ((0.8, 0.8, 3.7), sitk.sitkFloat32)],
                         ids=["native", "in-plane", "in-plane-and-slices", "float-thick-slices"])
def test_blocks_give_run_case_npys_array_bit_for_bit(ct, plans, spacing, pixel):
    image = _on_grid(ct, spacing, pixel)
    ours, data, props = _both(image, plans)
    assert ours is not None, "this plan and grid are ones the block path covers"
    assert ours[0].dtype == data.dtype == np.float32
    assert ours[0].shape == data.shape
    assert np.array_equal(ours[0], data)
    for key in ("shape_before_cropping", "bbox_used_for_cropping", "shape_after_cropping_and_before_resampling"):
        assert np.array_equal(np.asarray(ours[1][key]), np.asarray(props[key])), key


def test_a_crop_to_non_zero_voxels_is_the_same_as_nnunets(ct, plans):
    array = sitk.GetArrayFromImage(_on_grid(ct, (0.8, 0.8, 3.0)))
    array[:, :20, :] = 0  # a band of exact zeros at the edge: nnU-Net crops it away
    array[10:20, 100:140, 100:140] = 0  # and a hole of zeros inside, which its mask fills
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(_on_grid(ct, (0.8, 0.8, 3.0)))
    ours, data, props = _both(image, plans)
    assert props["bbox_used_for_cropping"][1][0] == 20
    assert ours[1]["bbox_used_for_cropping"] == props["bbox_used_for_cropping"]
    assert np.array_equal(ours[0], data)


def test_an_image_of_zeros_is_left_to_nnunet(ct, plans):
    image = sitk.Image(ct.GetSize(), sitk.sitkInt16)
    image.CopyInformation(ct)
    manager, configuration, dataset = plans
    assert preprocess_in_blocks(sitk.GetArrayViewFromImage(image)[None], [3.0, 2.0, 2.0], manager, configuration,
                                dataset, configuration.preprocessor_class) is None


def test_interpolation_across_slices_is_left_to_nnunet(ct, plans):
    # 1.5 mm in plane and 3 mm slices: not anisotropic enough, nnU-Net resamples in 3D (cubic across slices)
    ours, _, _ = _both(_on_grid(ct, (1.5, 1.5, 3.0)), plans)
    assert ours is None


def test_blocks_hold_a_fraction_of_nnunets_copies(ct, plans):
    manager, configuration, dataset = plans
    image = _on_grid(ct, (0.8, 0.8, 3.0))
    array = sitk.GetArrayViewFromImage(image)[None]
    spacing = list(image.GetSpacing())[::-1]
    peaks = {}
    for name, run in {"blocks": lambda: preprocess_in_blocks(array, spacing, manager, configuration, dataset,
                                                             configuration.preprocessor_class),
                      "nnU-Net": lambda: configuration.preprocessor_class(verbose=False).run_case_npy(
                          array, None, {"spacing": list(spacing)}, manager, configuration, dataset)}.items():
        tracemalloc.start()
        run()
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    float32_copy = array.size * 4
    assert peaks["nnU-Net"] > 2 * float32_copy  # its float32 copy and the resampling's float64 one
    assert peaks["blocks"] < float32_copy, peaks  # less than one float32 copy of the image


def test_the_predictor_uses_the_blocks_and_gives_stocks_labels(ct):
    image = _on_grid(ct, (0.8, 0.8, 3.0))
    predictor = TaskPredictor(resolve_bundle("demo"), "gtv", InferenceOptions(device="cpu", mirror=False))
    ours = predictor.predict(image)
    assert predictor.last_run["preprocessing"] == "in blocks of slices"
    fed = sitk.DICOMOrient(image, predictor.orientation)
    stock = predictor._predict_stock(sitk.GetArrayFromImage(fed).astype(np.float32)[None],
                                     list(fed.GetSpacing())[::-1], None)
    from SegRapSegmenterLib.arrays import uint8_image

    stored = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    stock = sitk.GetArrayFromImage(sitk.DICOMOrient(uint8_image(stock, fed), stored))
    assert np.count_nonzero(stock) > 0
    assert np.array_equal(ours, stock)
