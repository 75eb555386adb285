"""Bad DICOM input: each case fails with a DicomError naming the folder or file and the fix, never the patient."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid
from SegRapSegmenterLib.errors import DicomError
from SegRapSegmenterLib.formats.dicom import read_ct_series

PATIENT = ("Phantom^SegRap0000", "PHANTOM-0000")


def _copy(standard, tmp_path: Path) -> list[Path]:
    """The standard phantom CT series copied to tmp_path, files in slice order."""
    for path in standard.written.ct_dir.iterdir():
        shutil.copy(path, tmp_path / path.name)
    return sorted(tmp_path.iterdir())


def _edit(path: Path, **values) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def _fails(folder: Path, *expected: str, series_uid: str | None = None) -> str:
    with pytest.raises(DicomError) as info:
        read_ct_series(folder, series_uid=series_uid)
    message = str(info.value)
    for text in expected:
        assert text in message, message
    for secret in PATIENT:
        assert secret not in message
    return message


def test_not_a_folder(tmp_path):
    _fails(tmp_path / "missing", "not a folder")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "scan.nii.gz").write_bytes(b"\x1f\x8b" + bytes(100))
    _fails(tmp_path, str(tmp_path), "no DICOM files found")


def test_only_non_ct_series(standard, tmp_path):
    for path in _copy(standard, tmp_path):
        _edit(path, Modality="MR")
    _fails(tmp_path, "no CT series", "MR", standard.volume.series.series_uid)


def test_several_ct_series_without_a_choice_are_listed(standard):
    message = _fails(standard.written.root, "2 CT series found", "--ct-series", standard.written.ct_series_uid,
                     standard.written.contrast_series_uid, "48 files")
    assert "Plain CT" in message


def test_unknown_series_uid_lists_the_series(standard):
    _fails(standard.written.root, "no series with SeriesInstanceUID 1.2.3.4", standard.written.ct_series_uid,
           series_uid="1.2.3.4")


def test_chosen_series_that_is_not_ct(standard, tmp_path):
    for path in _copy(standard, tmp_path):
        _edit(path, Modality="PT")
    _fails(tmp_path, "is PT, not CT", series_uid=standard.written.ct_series_uid)


def test_missing_slice_names_the_gap(standard, tmp_path):
    files = _copy(standard, tmp_path)
    files[20].unlink()
    _fails(tmp_path, "1 slice(s) missing", files[19].name, files[21].name, "gap of 6.00 mm", "steps 3.00 mm")


def test_two_missing_slices(standard, tmp_path):
    files = _copy(standard, tmp_path)
    files[10].unlink()
    files[11].unlink()
    _fails(tmp_path, "2 slice(s) missing", files[9].name, files[12].name)


def test_duplicate_slice(standard, tmp_path):
    files = _copy(standard, tmp_path)
    ds = pydicom.dcmread(files[5])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "copy.dcm")
    _fails(tmp_path, "duplicate slice", "two images at the same position", files[5].name, "copy.dcm")


def test_same_image_twice(standard, tmp_path):
    files = _copy(standard, tmp_path)
    shutil.copy(files[5], tmp_path / "again.dcm")
    _fails(tmp_path, "duplicate slice", "same SOPInstanceUID")


def test_mixed_orientations(standard, tmp_path):
    files = _copy(standard, tmp_path)
    _edit(files[7], ImageOrientationPatient=[1, 0, 0, 0, 0.9848, -0.1736])
    _fails(tmp_path, "mixed slice orientations", files[7].name)


def test_mixed_frames_of_reference(standard, tmp_path):
    files = _copy(standard, tmp_path)
    other = generate_uid()
    for path in files[:10]:
        _edit(path, FrameOfReferenceUID=other)
    _fails(tmp_path, "mixes frames of reference", other, "(10 slices)", standard.volume.series.frame_of_reference_uid)


def test_corrupt_file_with_a_cut_header(standard, tmp_path):
    files = _copy(standard, tmp_path)
    files[3].write_bytes(files[3].read_bytes()[:400])
    _fails(tmp_path, str(files[3]), "damaged")


def test_corrupt_file_with_cut_pixel_data(standard, tmp_path):
    files = _copy(standard, tmp_path)
    files[30].write_bytes(files[30].read_bytes()[:-5000])
    _fails(tmp_path, str(files[30]), "pixel data cannot be decoded", "truncated")


def test_undecodable_transfer_syntax_is_named(standard, tmp_path):
    """A syntax no installed plugin decodes (MPEG-2 video) keeps a clear refusal naming it."""
    files = _copy(standard, tmp_path)
    ds = pydicom.dcmread(files[0])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile / Main Level
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3"])
    ds.save_as(files[0])
    _fails(tmp_path, str(files[0]), "MPEG2", "1.2.840.10008.1.2.4.100", "Export the CT uncompressed")


def test_uneven_slice_spacing(standard, tmp_path):
    files = _copy(standard, tmp_path)
    ds = pydicom.dcmread(files[24])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 1.0
    ds.save_as(files[24])
    _fails(tmp_path, "uneven slice spacing", files[24].name)


def test_single_slice(standard, tmp_path):
    shutil.copy(sorted(standard.written.ct_dir.iterdir())[0], tmp_path / "only.dcm")
    _fails(tmp_path, "1 image(s)", "at least two slices")


def test_multiframe_ct_is_refused(standard, tmp_path):
    files = _copy(standard, tmp_path)
    _edit(files[0], NumberOfFrames=2)
    _fails(tmp_path, str(files[0]), "single-frame CT Image Storage")


def test_missing_image_position(standard, tmp_path):
    files = _copy(standard, tmp_path)
    ds = pydicom.dcmread(files[2])
    del ds.ImagePositionPatient
    ds.save_as(files[2])
    _fails(tmp_path, str(files[2]), "ImagePositionPatient is missing")


def _without_frame_of_reference(standard, tmp_path: Path) -> Path:
    folder = tmp_path / "ct"
    folder.mkdir()
    for path in _copy(standard, folder):
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID
        ds.save_as(path)
    return folder


def test_a_ct_without_frame_of_reference_is_read_and_noted(standard, tmp_path):
    volume = read_ct_series(_without_frame_of_reference(standard, tmp_path))
    assert volume.series.frame_of_reference_uid == ""
    assert any("no FrameOfReferenceUID" in n for n in volume.notes)


def test_a_ct_without_frame_of_reference_is_refused_for_an_rtstruct_before_inference(standard, tmp_path, capsys):
    """Refused with exit 3 before any model runs, and the refused run leaves no --out folder behind."""
    from SegRapSegmenterLib import cli

    out = tmp_path / "not-yet" / "out"
    rc = cli.main(["segment", "--ct", str(_without_frame_of_reference(standard, tmp_path)), "--tasks", "oar",
                   "--rtstruct", "--out", str(out), "--bundle", "demo", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 3, err[-2000:]
    assert "no FrameOfReferenceUID" in err and "leave out --rtstruct" in err
    assert not out.exists() and not out.parent.exists()


def test_a_slice_without_frame_of_reference_among_others_is_refused(standard, tmp_path):
    files = _copy(standard, tmp_path)
    ds = pydicom.dcmread(files[4])
    del ds.FrameOfReferenceUID
    ds.save_as(files[4])
    _fails(tmp_path, str(files[4]), "no FrameOfReferenceUID, while other slices")
