"""DICOM size bombs (issue 20): deflated data sets and declared pixel counts are refused before they are
inflated or decoded."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
from SegRapSegmenterLib.errors import DicomError
from SegRapSegmenterLib.formats.dicom import read_ct_series
from SegRapSegmenterLib.formats.pydicom_compat import save_file

CT = "1.2.840.10008.5.1.4.1.1.2"


def write_deflated_series(folder, count: int, rows: int, columns: int, pixel_spacing: float = 0.5,
                          step: float = 2.0) -> None:
    """``count`` deflated CT slices of rows x columns zeros: a few KB each on disk, rows*columns*2 bytes inflated."""
    folder.mkdir()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    pixels = bytes(rows * columns * 2)
    for k in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CT
        ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CT, uid, "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, step * k]
        ds.PixelSpacing, ds.Rows, ds.Columns = [pixel_spacing, pixel_spacing], rows, columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = pixels
        save_file(ds, folder / f"CT{k:04d}.dcm")  # pydicom 2.4 and 3 alike


def test_a_deflated_series_over_the_voxel_limit_is_refused_with_bounded_memory(tmp_path, rss_growth):
    """8 slices of 4096 x 4096: ~1 MB on disk, 256 MiB inflated, over 1 GiB once decoded, stacked and rescaled."""
    write_deflated_series(tmp_path / "ct", 8, 4096, 4096)
    assert sum(p.stat().st_size for p in (tmp_path / "ct").iterdir()) < 4 << 20
    rc, err, growth = rss_growth("from SegRapSegmenterLib.formats.dicom import read_ct_series",
                                 f"read_ct_series({str(tmp_path / 'ct')!r})", env={"SEGRAP_MAX_VOXELS": str(1 << 25)})
    assert rc != 0 and "DicomError" in err and "over the limit of 33,554,432" in err and "CT0002.dcm" in err
    assert growth < 200, f"peak RSS grew by {growth:.0f} MiB"


def test_a_deflated_file_inflating_past_one_slice_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("SegRapSegmenterLib.formats.dicom.DEFLATED_FILE_LIMIT", 1 << 20)
    write_deflated_series(tmp_path / "ct", 2, 1024, 1024)  # 2 MiB inflated each
    with pytest.raises(DicomError, match=r"CT0000.dcm: refused: the deflated data set inflates past 1 MiB"):
        read_ct_series(tmp_path / "ct")


def test_a_small_deflated_series_still_reads(tmp_path):
    write_deflated_series(tmp_path / "ct", 3, 32, 32)
    volume = read_ct_series(tmp_path / "ct")
    assert volume.image.GetSize() == (32, 32, 3)


@pytest.mark.parametrize("pixel_spacing, step, refused", [
    (2e-7, 2.0, r"CT0000.dcm: PixelSpacing: a voxel spacing of 2e-07 mm along rows is not a CT's"),
    (0.5, 50.0, r"the step between slices \(CT0000.dcm to CT0002.dcm\): a voxel spacing of 50 mm"),
])
def test_a_series_with_an_absurd_spacing_is_refused_before_resampling(tmp_path, pixel_spacing, step, refused):
    """A 52 KB CT of 2e-7 mm pixels cost the worker 2.7 GB once resampled to the network's millimetres."""
    write_deflated_series(tmp_path / "ct", 3, 32, 32, pixel_spacing, step)
    with pytest.raises(DicomError, match=refused):
        read_ct_series(tmp_path / "ct")
