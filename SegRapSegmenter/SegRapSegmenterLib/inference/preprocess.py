"""nnU-Net's preprocessing of one image (crop to non-zero, CT normalisation, resampling), a few slices at a time.

``DefaultPreprocessor.run_case_npy`` makes a float32 copy of the whole image and its resampling
a float64 one (1.5 times the CT's int16 size, then 3 times more), and resamples a segmentation
that inference never reads, in float64 again. With the plans our bundles use (CT normalisation,
which is voxel-wise, and nnU-Net's default resampling with the in-plane axes resampled slice by
slice because the spacing is anisotropic) every output voxel depends on one input slice, so the
same steps run here on blocks of ``SLICES_PER_BLOCK`` slices through nnU-Net's own normaliser and
resampling function: the same float32 values, bit for bit, from a few slices' worth of copies.
The out-of-plane step of that resampling is nearest-neighbour (``order_z`` 0): each output slice
is one in-plane-resampled input slice, chosen with scipy's own order-0 rounding.

Any other plan (another normaliser or preprocessor, order_z > 0, isotropic resampling, which
interpolates across slices) returns None, and the caller runs nnU-Net's preprocessor instead.
"""

from __future__ import annotations

import numpy as np

SLICES_PER_BLOCK = 8  # one block of a 512 x 512 CT: 8 MB float32, 16 MB float64 inside the resampling


def _plan_supported(preprocessor_class, configuration, channels: int) -> bool:
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    resampling = configuration.resampling_fn_data
    kwargs = dict(getattr(resampling, "keywords", {}) or {})
    return (preprocessor_class is DefaultPreprocessor and channels == 1
            and list(configuration.normalization_schemes) == [CTNormalization.__name__]
            and not any(configuration.use_mask_for_norm)
            and getattr(resampling, "func", None) is resample_data_or_seg_to_shape
            and not kwargs.get("is_seg", False) and kwargs.get("order_z", 0) == 0)


def _slice_source(n_in: int, n_out: int) -> np.ndarray:
    """For each of ``n_out`` output slices, the input slice nnU-Net's order-0 step along z takes it from.

    nnU-Net samples input coordinate ``(n_in / n_out) * (i + 0.5) - 0.5`` with scipy's
    ``map_coordinates(order=0, mode='nearest')``; asking that function for the index itself
    gives its own rounding of every coordinate.
    """
    from scipy.ndimage import map_coordinates

    scale = float(n_in) / n_out
    coordinates = scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5
    chosen = map_coordinates(np.arange(n_in, dtype=np.float64), coordinates[None], order=0, mode="nearest")
    return chosen.astype(np.int64)


def preprocess_in_blocks(array: np.ndarray, spacing, plans_manager, configuration, dataset_json,
                         preprocessor_class) -> tuple[np.ndarray, dict] | None:
    """``(data, properties)`` as ``run_case_npy(array, None, {"spacing": spacing}, ...)`` returns them, or None.

    ``array``: the image (1, z, y, x) in any dtype, typically a view of the SimpleITK image (not
    modified); ``spacing``: its spacing in the same axis order. None when the plan is one this
    path does not reproduce exactly (see the module docstring).
    """
    from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice
    from nnunetv2.preprocessing.resampling.default_resampling import (ANISO_THRESHOLD, compute_new_shape,
                                                                      determine_do_sep_z_and_axis)

    if array.ndim != 4 or len(configuration.spacing) != 3 or not _plan_supported(
            preprocessor_class, configuration, array.shape[0]):
        return None
    forward = list(plans_manager.transpose_forward)
    data = array.transpose([0, *[a + 1 for a in forward]])  # a view, as nnU-Net transposes its copy
    original_spacing = [float(spacing[a]) for a in forward]
    target_spacing = list(configuration.spacing)
    kwargs = dict(configuration.resampling_fn_data.keywords)
    separate, axis = determine_do_sep_z_and_axis(kwargs.get("force_separate_z"), original_spacing, target_spacing,
                                                 kwargs.get("separate_z_anisotropy_threshold", ANISO_THRESHOLD))
    shape = data.shape[1:]
    depth = shape[0]

    def blocks(n: int):
        for start in range(0, n, SLICES_PER_BLOCK):
            yield start, min(start + SLICES_PER_BLOCK, n)

    # crop to non-zero: nnU-Net's box around its float32 copy's non-zero voxels after filling the holes
    # of that mask. A hole is enclosed by the mask, so filling cannot move the box (every voxel outside
    # the box reaches the image's edge through voxels outside it): the box of the non-zero voxels
    # themselves, from per-block projections, without a whole-volume mask or the fill (0.3 s at 512^2)
    found = [np.zeros(n, dtype=bool) for n in shape]
    for a, b in blocks(depth):
        nonzero = data[0, a:b].astype(np.float32) != 0
        found[0][a:b] = nonzero.any(axis=(1, 2))
        found[1] |= nonzero.any(axis=(0, 2))
        found[2] |= nonzero.any(axis=(0, 1))
    if not found[0].any():
        return None  # nothing but zeros: as nnU-Net handles it
    bbox = [[int(np.argmax(f)), int(len(f) - np.argmax(f[::-1]))] for f in found]
    crop = bounding_box_to_slice(bbox)
    cropped = data[(slice(None), *crop)]
    cropped_shape = cropped.shape[1:]
    new_shape = [int(n) for n in compute_new_shape(cropped_shape, original_spacing, target_spacing)]
    resamples = list(new_shape) != list(cropped_shape)
    if resamples and not (separate and axis == 0):
        return None  # interpolation across slices (or along another axis): nnU-Net's whole-volume path
    normalizer = _normalizer(configuration, plans_manager)
    in_plane = new_shape[1:]
    planar = np.empty((1, cropped_shape[0], *in_plane), dtype=np.float32)
    for a, b in blocks(cropped_shape[0]):
        block = cropped[:, a:b].astype(np.float32)  # the copy nnU-Net's run_case_npy makes, a block of it
        block[0] = normalizer.run(block[0], None)
        if resamples:
            block = configuration.resampling_fn_data(block, [b - a, *in_plane], original_spacing, target_spacing)
        planar[:, a:b] = block
    if new_shape[0] != cropped_shape[0]:
        out = planar[:, _slice_source(cropped_shape[0], new_shape[0])]
    else:
        out = planar
    properties = {"spacing": list(spacing), "shape_before_cropping": shape, "bbox_used_for_cropping": bbox,
                  "shape_after_cropping_and_before_resampling": cropped_shape}
    return out, properties


def _normalizer(configuration, plans_manager):
    """The plans' CT normaliser for channel 0, with the dataset's intensity properties."""
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

    return CTNormalization(use_mask_for_norm=False,
                           intensityproperties=plans_manager.foreground_intensity_properties_per_channel["0"])
