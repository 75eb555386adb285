"""Reading CT series: every phantom variant comes back in HU on its own geometry, with its UIDs in z order."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import RLELossless, generate_uid
from SegRapSegmenterLib.formats.dicom import discover_series, read_ct_series
from SegRapSegmenterLib.formats.pydicom_compat import save_bare_dataset
from SegRapSegmenterLib.phantom.dicom_series import VARIANTS, patient_of, variant_case, write_phantom_dicom

PATIENT = ("Phantom^SegRap0000", "PHANTOM-0000")


def _same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_reads_back_in_hu_on_its_own_geometry(dicom_variant, variant):
    v = dicom_variant(variant)
    truth = v.written.case.ct
    assert _same_geometry(v.volume.image, truth)
    got = sitk.GetArrayViewFromImage(v.volume.image)
    assert got.dtype == np.int16
    assert np.array_equal(got, np.round(sitk.GetArrayViewFromImage(truth)).astype(np.int16))


@pytest.mark.parametrize("variant", ["anisotropic", "nonsquare", "reversed", "oblique"])
def test_geometry_agrees_with_gdcm_through_simpleitk(dicom_variant, variant):
    """An independent reader (GDCM) places the same voxels at the same points."""
    v = dicom_variant(variant)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(v.written.ct_dir)))
    gdcm = reader.Execute()
    assert _same_geometry(v.volume.image, gdcm)
    assert np.array_equal(sitk.GetArrayViewFromImage(v.volume.image), sitk.GetArrayViewFromImage(gdcm))


def test_anisotropic_pixel_spacing_keeps_rows_and_columns_apart(dicom_variant):
    v = dicom_variant("anisotropic")
    ds = pydicom.dcmread(v.volume.series.slices[0].path, stop_before_pixels=True)
    row_spacing, column_spacing = (float(x) for x in ds.PixelSpacing)
    assert row_spacing != column_spacing
    sx, sy, _ = v.volume.image.GetSpacing()
    assert (sx, sy) == pytest.approx((column_spacing, row_spacing))


def test_reversed_numbering_is_sorted_by_position_not_instance_number(dicom_variant):
    v = dicom_variant("reversed")
    slices = v.volume.series.slices
    numbers = [int(pydicom.dcmread(s.path, stop_before_pixels=True).InstanceNumber) for s in slices]
    assert numbers == sorted(numbers, reverse=True)
    heights = [s.position[2] for s in slices]
    assert heights == sorted(heights)


@pytest.mark.parametrize("variant", ["standard", "oblique"])
def test_slices_are_listed_in_the_image_z_order_with_their_original_uids(dicom_variant, variant):
    v = dicom_variant(variant)
    image, series = v.volume.image, v.volume.series
    assert len(series.slices) == image.GetSize()[2]
    for k, s in enumerate(series.slices):
        assert np.allclose(s.position, image.TransformIndexToPhysicalPoint((0, 0, k)), atol=1e-4)
        ds = pydicom.dcmread(s.path, stop_before_pixels=True)
        assert s.sop_instance_uid == ds.SOPInstanceUID and s.sop_class_uid == ds.SOPClassUID
    first = pydicom.dcmread(series.slices[0].path, stop_before_pixels=True)
    assert (series.study_uid, series.series_uid, series.frame_of_reference_uid) == (
        first.StudyInstanceUID, first.SeriesInstanceUID, first.FrameOfReferenceUID)
    assert "PixelData" not in series.header and series.header.PatientID == first.PatientID


@pytest.mark.parametrize("variant", VARIANTS)
def test_phantom_series_pass_dciodvfy(dicom_variant, dciodvfy, variant):
    v = dicom_variant(variant)
    for folder in (v.written.ct_dir, v.written.contrast_dir):
        files = sorted(folder.iterdir())
        for path in (files[0], files[len(files) // 2], files[-1]):
            assert dciodvfy(path) == [], path


def test_contrast_ct_is_its_own_series_in_the_same_study_and_frame_of_reference(standard):
    found = discover_series(standard.written.root)
    assert [s.modality for s in found] == ["CT", "CT"]
    assert len({s.series_uid for s in found}) == 2 and len({s.study_uid for s in found}) == 1
    contrast = read_ct_series(standard.written.root, series_uid=standard.written.contrast_series_uid)
    assert contrast.series.frame_of_reference_uid == standard.volume.series.frame_of_reference_uid
    assert contrast.series.series_uid != standard.volume.series.series_uid
    assert np.array_equal(sitk.GetArrayViewFromImage(contrast.image),
                          sitk.GetArrayViewFromImage(standard.written.case.contrast_ct))


def test_series_in_nested_subfolders_are_found_and_other_files_ignored(standard, tmp_path):
    files = sorted(standard.written.ct_dir.iterdir())
    for k, path in enumerate(files):
        target = tmp_path / f"part{k % 3}" / "deeper" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    (tmp_path / "README.txt").write_text("exported from the PACS\n")
    (tmp_path / "part0" / "image.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    volume = read_ct_series(tmp_path)
    assert np.array_equal(sitk.GetArrayViewFromImage(volume.image), sitk.GetArrayViewFromImage(standard.volume.image))


def test_rescale_slope_and_intercept_are_applied_per_slice(standard, tmp_path):
    for k, path in enumerate(sorted(standard.written.ct_dir.iterdir())):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float64) - 1024
        intercept = -1024.0 - k  # varies from slice to slice
        ds.PixelData = np.round((hu - intercept) * 2).astype(np.uint16).tobytes()
        ds.BitsStored, ds.HighBit = 16, 15
        ds.RescaleSlope, ds.RescaleIntercept = "0.5", str(intercept)
        ds.save_as(tmp_path / path.name)
    volume = read_ct_series(tmp_path)
    got = sitk.GetArrayFromImage(volume.image)
    assert got.dtype == np.float32
    assert np.array_equal(got, sitk.GetArrayViewFromImage(standard.volume.image).astype(np.float32))


def test_rle_compressed_series_reads_like_the_uncompressed_one(tmp_path):
    case = variant_case("standard", slices=6)
    written = write_phantom_dicom(case, tmp_path, transfer_syntax=RLELossless)
    first = pydicom.dcmread(next(written.ct_dir.iterdir()), stop_before_pixels=True)
    assert first.file_meta.TransferSyntaxUID == RLELossless
    volume = read_ct_series(written.ct_dir)
    assert volume.series.transfer_syntax == RLELossless
    assert np.array_equal(sitk.GetArrayViewFromImage(volume.image), sitk.GetArrayViewFromImage(case.ct))


def test_gantry_tilt_is_resampled_onto_an_untilted_grid_and_noted(standard, tmp_path):
    """Slice k's position moves k rows (2 mm each) posterior: each slice is shifted back in-plane."""
    for path in sorted(standard.written.ct_dir.iterdir()):
        ds = pydicom.dcmread(path)
        k = round((float(ds.ImagePositionPatient[2]) - standard.volume.image.GetOrigin()[2]) / 3.0)
        ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) + 2.0 * k
        ds.GantryDetectorTilt = "-33.7"
        ds.save_as(tmp_path / path.name)
    volume = read_ct_series(tmp_path)
    assert any("gantry tilt of 33.7 degrees" in n for n in volume.notes)
    assert _same_geometry(volume.image, standard.volume.image)
    tilted = sitk.GetArrayViewFromImage(volume.image)
    plain = sitk.GetArrayViewFromImage(standard.volume.image)
    for k in (1, 10, 30):
        assert np.array_equal(tilted[k, k:], plain[k, :-k])  # content moved k rows down (posterior)
    assert volume.series.slices[10].position[1] == pytest.approx(standard.volume.series.slices[10].position[1] + 20)


def test_localizer_images_in_the_series_are_left_out(standard, tmp_path):
    for path in standard.written.ct_dir.iterdir():
        shutil.copy(path, tmp_path / path.name)
    scout = pydicom.dcmread(next(standard.written.ct_dir.iterdir()))
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    scout.save_as(tmp_path / "scout.dcm")
    volume = read_ct_series(tmp_path)
    assert volume.image.GetSize() == standard.volume.image.GetSize()
    assert any("1 localizer" in n for n in volume.notes)


def test_no_patient_name_or_id_in_notes_or_representation(standard):
    text = " ".join(standard.volume.notes) + repr(standard.volume) + repr(standard.volume.series)
    for secret in PATIENT:
        assert secret not in text
    assert patient_of(standard.written.case)["PatientName"] == PATIENT[0]


def test_files_without_preamble_are_read(standard, tmp_path):
    for path in standard.written.ct_dir.iterdir():
        ds = pydicom.dcmread(path)
        del ds.file_meta
        ds.preamble = None
        save_bare_dataset(ds, tmp_path / path.stem, implicit_vr=True)
    assert (tmp_path / "CT0001").read_bytes()[128:132] != b"DICM"
    volume = read_ct_series(tmp_path)
    assert np.array_equal(sitk.GetArrayViewFromImage(volume.image), sitk.GetArrayViewFromImage(standard.volume.image))
