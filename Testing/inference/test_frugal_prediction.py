"""The frugal prediction path: the same labels as stock nnU-Net's whole-volume predictor, a fraction of the memory.

Stock here is nnU-Net's own ``nnUNetPredictor.predict_single_npy_array`` with the same network,
weights and settings (``TaskPredictor._predict_stock``), on the same reoriented array.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg
from scipy import ndimage
from SegRapSegmenterLib.arrays import uint8_image
from SegRapSegmenterLib.errors import ModelError
from SegRapSegmenterLib.inference.body import body_box_of_image
from SegRapSegmenterLib.inference.bundles import resolve_bundle
from SegRapSegmenterLib.inference.predictor import InferenceOptions, TaskPredictor
from SegRapSegmenterLib.inference.scores import SliceLabeler, axis_map
from SegRapSegmenterLib.phantom import cases as phantom


@pytest.fixture(scope="module")
def case():
    return phantom.make_case(1, seed=99, size="small")


@pytest.fixture(scope="module")
def oar_predictor():
    return TaskPredictor(resolve_bundle("demo"), "oar", InferenceOptions(device="cpu"))


def _stock(predictor: TaskPredictor, image: sitk.Image) -> np.ndarray:
    """Stock nnU-Net's labels for ``image`` (reoriented like ours, mapped back)."""
    fed = sitk.DICOMOrient(image, predictor.orientation)
    labels = predictor._predict_stock(sitk.GetArrayFromImage(fed).astype(np.float32)[None],
                                      list(fed.GetSpacing())[::-1], None)
    out = uint8_image(labels, fed)
    stored = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    return sitk.GetArrayFromImage(sitk.DICOMOrient(out, stored))


def _on_grid(image: sitk.Image, spacing_xyz, size_xyz=None, origin=None) -> sitk.Image:
    size = size_xyz or [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing_xyz)]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, origin or image.GetOrigin(), spacing_xyz,
                         image.GetDirection(), -1000.0, image.GetPixelID())


def _two_heads(image: sitk.Image) -> sitk.Image:
    """The case stacked on itself along z: taller than the demo's whole-head patch, so the sliding
    window needs several slabs (the demo patch is the small phantom's 48 slices)."""
    array = sitk.GetArrayFromImage(image)
    tall = sitk.GetImageFromArray(np.concatenate([array, array], axis=0))
    tall.SetSpacing(image.GetSpacing())
    tall.SetOrigin(image.GetOrigin())
    tall.SetDirection(image.GetDirection())
    return tall


def test_slab_wise_prediction_equals_stock_whole_volume(case):
    # without the body crop, so that the tiles lie where stock's do (the crop has its own test below)
    predictor = TaskPredictor(resolve_bundle("demo"), "oar", InferenceOptions(device="cpu", crop_to_body=False))
    ct = _two_heads(case.ct)
    ours = predictor.predict(ct)
    assert ours.shape == sitk.GetArrayViewFromImage(ct).shape
    np.testing.assert_array_equal(ours, _stock(predictor, ct))
    run = predictor.last_run
    assert run["path"] == "frugal"
    held, depth = run["score_slices_held"]
    assert held <= predictor.configuration.patch_size[0] < depth  # never the whole volume's scores
    stages = run["timings_s"]  # where the time went, for the provenance and the benchmarks
    assert set(stages) == {"preprocess", "network", "labels", "scores"}
    assert stages["network"] > 0 and min(stages.values()) >= 0


def test_resampled_scores_give_stock_labels_on_a_finer_input_grid(case, oar_predictor):
    finer = _on_grid(case.ct, (1.5, 1.5, 3.0))  # the network runs at 2 mm, the labels come back at 1.5 mm
    ours = oar_predictor.predict(finer)
    np.testing.assert_array_equal(ours, _stock(oar_predictor, finer))
    assert oar_predictor.last_run["interpolated_voxels"] > 0  # label boundaries went through full interpolation


def test_contrast_task_equals_stock(case):
    predictor = TaskPredictor(resolve_bundle("demo"), "gtv", InferenceOptions(device="cpu"))
    ours = predictor.predict(case.contrast_ct)
    assert (ours > 0).any()
    np.testing.assert_array_equal(ours, _stock(predictor, case.contrast_ct))


def test_air_around_the_patient_is_skipped_and_labels_pasted_back(case, oar_predictor):
    # the same patient in a field of view three times as wide: the tiles over air only are never evaluated (three,
    # not four: stock's whole-volume run, the test's cost, covers 9 fields, not 16; at two no tile is air only)
    size = [3 * case.ct.GetSize()[0], 3 * case.ct.GetSize()[1], case.ct.GetSize()[2]]
    origin = case.ct.TransformContinuousIndexToPhysicalPoint((-1.0 * case.ct.GetSize()[0],
                                                              -1.0 * case.ct.GetSize()[1], 0))
    wide = _on_grid(case.ct, case.ct.GetSpacing(), size, origin)
    ours = oar_predictor.predict(wide)
    done, total = oar_predictor.last_run["tiles"]
    assert done < total
    assert oar_predictor.last_run["box_fraction"] < 0.25
    inside = body_box_of_image(wide).as_mask(ours.shape)
    stock = _stock(oar_predictor, wide)
    np.testing.assert_array_equal(ours[inside], stock[inside])
    assert not ours[~inside].any()
    # stock nnU-Net, run on the air as well, finds "structures" there (the demo network has never seen
    # so much air); the crop keeps those false positives out
    assert stock[~inside].any()


def test_scores_resampling_equals_nnunets_for_each_axis_treatment():
    rng = np.random.default_rng(3)
    cases = [((10, 20, 24), (10, 45, 50), 0, 1, 0), ((13, 20, 24), (20, 45, 50), 0, 1, 0),
             ((13, 20, 24), (7, 45, 50), 0, 1, 0), ((13, 20, 24), (20, 11, 50), None, 1, 0),
             ((13, 20, 24), (20, 45, 50), 2, 1, 0), ((13, 20, 24), (26, 40, 48), None, 0, 0)]
    for shape_in, shape_out, separate_axis, order, order_z in cases:
        scores = (ndimage.gaussian_filter(rng.normal(size=(7, *shape_in)), (0, 1.5, 1.5, 1.5)) * 10).astype(np.float16)
        stock = np.argmax(resample_data_or_seg(scores, shape_out, False, separate_axis, order,
                                               separate_axis is not None, order_z=order_z), axis=0)
        orders = [order] * 3
        if separate_axis is not None:
            orders[separate_axis] = order_z
        labeler = SliceLabeler(tuple(axis_map(a, b, o) for a, b, o in zip(shape_in, shape_out, orders)))
        labels = np.argmax(scores, axis=0).astype(np.uint8)
        ours = np.zeros(shape_out, np.uint8)
        for z in range(shape_in[0]):
            for j, out in labeler.add(z, scores[:, z], labels[z]):
                ours[j] = out
        assert labeler.complete
        np.testing.assert_array_equal(ours, stock, err_msg=f"{shape_in} -> {shape_out}, separate z {separate_axis}")


class _OutOfMemoryOnce(TaskPredictor):
    """The demo predictor whose first tile runs out of GPU memory (as a full 16 GB card would)."""

    failures = 1

    def _evaluate(self, tile):
        if self.failures:
            self.failures -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return super()._evaluate(tile)


def test_out_of_memory_falls_back_to_low_memory_with_a_warning(case, oar_predictor):
    expected = oar_predictor.predict(case.ct)
    predictor = _OutOfMemoryOnce(resolve_bundle("demo"), "oar", InferenceOptions(device="cpu"))
    warnings = []
    labels = predictor.predict(case.ct, warn=warnings.append)
    np.testing.assert_array_equal(labels, expected)
    assert predictor.last_run["low_memory"] and predictor.last_run["low_memory_fallback"]
    assert len(warnings) == 1 and "low-memory" in warnings[0] and "--low-memory" in warnings[0]


def test_out_of_memory_in_low_memory_mode_is_a_clear_error(case):
    predictor = _OutOfMemoryOnce(resolve_bundle("demo"), "oar", InferenceOptions(device="cpu", low_memory=True))
    with pytest.raises(ModelError, match="even in low-memory mode.*--device cpu"):
        predictor.predict(case.ct)
