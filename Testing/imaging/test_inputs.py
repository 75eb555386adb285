"""Reading and checking the CT and contrast CT: each kind of bad input gets a specific error."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from SegRapSegmenterLib.errors import GeometryError, InputError
from SegRapSegmenterLib.formats.imaging import contrast_on_ct_grid, read_volume, register_rigid
from SegRapSegmenterLib.phantom import cases as phantom


def _write(img: sitk.Image, path) -> str:
    sitk.WriteImage(img, str(path))
    return str(path)


def test_phantom_ct_reads_in_every_format(tmp_path, small_case):
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        source = read_volume(_write(small_case.ct, tmp_path / f"ct{suffix}"))
        assert source.image.GetSize() == small_case.ct.GetSize() and source.kind == "file"


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(InputError, match=r"nowhere\.nii\.gz: no such file"):
        read_volume(tmp_path / "nowhere.nii.gz")
    (tmp_path / "scan.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(InputError, match="unsupported file type"):
        read_volume(tmp_path / "scan.jpg")


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii", "ct.nrrd", "ct.mha"])
def test_truncated_file_is_named(tmp_path, small_case, name):
    # ITK reads a truncated NIfTI without complaint, filling the rest with zeros: we must not
    path = tmp_path / name
    sitk.WriteImage(small_case.ct, str(path), useCompression=name.endswith(".gz"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match=f"{name}: (the file is truncated|cannot be read)"):
        read_volume(path)


def test_2d_4d_and_rgb_images_are_refused(tmp_path, small_case):
    array = sitk.GetArrayFromImage(small_case.ct)
    with pytest.raises(InputError, match="2D image"):
        read_volume(_write(sitk.GetImageFromArray(array[10]), tmp_path / "slice.nrrd"))
    with pytest.raises(InputError, match="4D image"):
        read_volume(_write(sitk.GetImageFromArray(np.stack([array, array]), isVector=False), tmp_path / "series.nii.gz"))
    rgb = sitk.GetImageFromArray(np.stack([array] * 3, axis=-1).astype(np.uint8), isVector=True)
    with pytest.raises(InputError, match="RGB or vector"):
        read_volume(_write(rgb, tmp_path / "rgb.nrrd"))


def test_mr_like_intensities_are_not_a_ct(tmp_path, small_case):
    mr = sitk.GetArrayFromImage(small_case.ct).astype(np.float32) + 1024.0
    img = sitk.GetImageFromArray(mr)
    img.CopyInformation(small_case.ct)
    with pytest.raises(InputError, match="do not look like a CT"):
        read_volume(_write(img, tmp_path / "mr.nii.gz"))


def test_nan_voxels_are_refused(tmp_path, small_case):
    array = sitk.GetArrayFromImage(small_case.ct).astype(np.float32)
    array[3, 4, 5] = np.nan
    img = sitk.GetImageFromArray(array)
    img.CopyInformation(small_case.ct)
    with pytest.raises(InputError, match="1 voxels are NaN"):
        read_volume(_write(img, tmp_path / "nan.nrrd"))


def test_contrast_ct_on_the_ct_grid(tmp_path):
    case = phantom.make_case(0, seed=4, size="small", contrast="resampled")
    ct = read_volume(_write(case.ct, tmp_path / "ct.nrrd"))
    ce = read_volume(_write(case.contrast_ct, tmp_path / "ce.nrrd"), "Contrast CT")
    on_grid, alignment = contrast_on_ct_grid(ct, ce)
    assert alignment.method == "resampled" and on_grid.GetSize() == case.ct.GetSize()
    assert np.allclose(on_grid.GetOrigin(), case.ct.GetOrigin())
    same, alignment = contrast_on_ct_grid(ct, ct)
    assert alignment.method == "same-grid" and same is ct.image


def test_contrast_ct_elsewhere_in_space_is_refused(tmp_path, small_case):
    ct = read_volume(_write(small_case.ct, tmp_path / "ct.nrrd"))
    far = sitk.Image(small_case.contrast_ct)
    far.SetOrigin(tuple(np.array(far.GetOrigin()) + np.array([0.0, 0.0, 800.0])))
    ce = read_volume(_write(far, tmp_path / "far.nrrd"), "Contrast CT")
    with pytest.raises(GeometryError, match=r"far\.nrrd covers only 0% of the CT .*--register"):
        contrast_on_ct_grid(ct, ce)


def test_registration_recovers_the_patients_motion():
    case = phantom.make_case(0, seed=4, size="small", contrast="shifted")
    euler, _ = register_rigid(case.ct, case.contrast_ct)
    truth = case.info["contrast_motion"]
    centre = np.zeros(3)
    moved = np.array(euler.TransformPoint(tuple(centre)))
    expected = np.array(truth["rotation"]).reshape(3, 3) @ centre + np.array(truth["translation_mm"])
    assert np.linalg.norm(moved - expected) < 2.0  # mm, on a 2 x 2 x 3 mm grid
    # the registered contrast CT lines the GTV up with its truth on the CT grid
    aligned = sitk.Resample(case.contrast_ct, case.ct, euler, sitk.sitkLinear, -1024.0)
    enhancing = sitk.GetArrayFromImage(aligned) > 90
    gtv = case.gtv_labelmap > 0
    assert np.count_nonzero(enhancing & gtv) / np.count_nonzero(gtv) > 0.6


def test_a_bad_contrast_ct_is_refused_before_task_1_runs(tmp_path, small_case):
    # the pipeline reads the contrast CT's voxels only when Task 2 starts; its header is checked first
    from SegRapSegmenterLib.pipeline import SegmentRequest, run

    ct = _write(small_case.ct, tmp_path / "ct.nii.gz")
    rgb = sitk.Compose([small_case.contrast_ct] * 3)
    contrast = _write(rgb, tmp_path / "contrast.nrrd")
    stages = []
    with pytest.raises(InputError, match=r"Contrast CT .*contrast\.nrrd: has 3 values per voxel"):
        run(SegmentRequest(ct=ct, contrast_ct=contrast, out_dir=str(tmp_path / "out"), bundle="demo", device="cpu"),
            progress=lambda stage, fraction, message: stages.append(stage))
    assert "oar-model" not in stages and not (tmp_path / "out").exists()


def test_a_contrast_ct_that_only_its_voxels_betray_is_refused_when_task_2_starts(tmp_path, small_case):
    from SegRapSegmenterLib.pipeline import SegmentRequest, run

    ct = _write(small_case.ct, tmp_path / "ct.nii.gz")
    mr_like = sitk.Cast(sitk.Abs(small_case.contrast_ct), sitk.sitkInt16)  # no air below -500: not HU
    contrast = _write(mr_like, tmp_path / "contrast.nii.gz")
    with pytest.raises(InputError, match=r"Contrast CT .*contrast\.nii\.gz: values .* do not look like a CT"):
        run(SegmentRequest(ct=ct, contrast_ct=contrast, out_dir=str(tmp_path / "out"), bundle="demo", device="cpu"))
    assert not (tmp_path / "out").exists()
