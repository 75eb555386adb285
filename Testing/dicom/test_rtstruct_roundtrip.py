"""Round trip: phantom masks -> RTSTRUCT -> reader gives the 47 structures back on every DICOM variant."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.errors import DicomError
from SegRapSegmenterLib.formats.rtstruct import read_rtstruct, write_rtstruct
from SegRapSegmenterLib.phantom.dicom_series import VARIANTS


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _common_box(a, b, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Two cropped masks of one structure placed in the union of their boxes (the 1024 masks are big)."""
    (box_a, crop_a), (box_b, crop_b) = a.crop(name), b.crop(name)
    lo = [min(p.start, q.start) for p, q in zip(box_a, box_b)]
    hi = [max(p.stop, q.stop) for p, q in zip(box_a, box_b)]

    def place(box, crop):
        out = np.zeros([h - l for l, h in zip(lo, hi)], dtype=bool)
        out[tuple(slice(s.start - l, s.stop - l) for s, l in zip(box, lo))] = crop
        return out

    return place(box_a, crop_a), place(box_b, crop_b)


@pytest.mark.parametrize("variant", VARIANTS)
def test_all_47_structures_come_back_on_every_variant(dicom_variant, dciodvfy, tmp_path, variant):
    v = dicom_variant(variant)
    assert set(v.masks) == set(S.STRUCTURE_NAMES)
    sizes = {name: int(v.masks.crop(name)[1].sum()) for name in S.STRUCTURE_NAMES}
    assert min(sizes.values()) > 0  # every structure, the smallest included, is there to be tested
    path = write_rtstruct(v.masks, v.volume, tmp_path / "rt.dcm", model_name="m", model_version="1")
    assert dciodvfy(path) == []
    back = read_rtstruct(path, v.volume)
    assert set(back) == set(S.STRUCTURE_NAMES)
    scores, exact = {}, {}
    for name in S.STRUCTURE_NAMES:
        got, want = _common_box(back, v.masks, name)
        scores[name], exact[name] = dice(got, want), np.array_equal(got, want)
    assert min(scores.values()) >= 0.99, {k: s for k, s in scores.items() if s < 0.99}
    assert exact[min(sizes, key=sizes.get)]
    assert all(exact.values())  # exact, in fact


def test_reader_takes_a_folder_and_a_bare_image(standard, tmp_path):
    masks = {k: standard.masks[k] for k in ("Cochlea_L", "Mandible_R")}
    folder = tmp_path / "case"
    shutil.copytree(standard.written.ct_dir, folder)
    write_rtstruct(masks, standard.volume, folder / "RS.dcm", model_name="m", model_version="1")
    back = read_rtstruct(folder, standard.volume.image)
    assert set(back) == set(masks) and all(np.array_equal(back[k], masks[k]) for k in masks)


def test_a_structure_set_of_another_frame_of_reference_is_refused(standard, tmp_path):
    path = write_rtstruct({"Brain": standard.masks["Brain"]}, standard.volume, tmp_path / "rt.dcm",
                          model_name="m", model_version="1")
    ds = pydicom.dcmread(path)
    other = pydicom.uid.generate_uid()
    ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = other
    ds.StructureSetROISequence[0].ReferencedFrameOfReferenceUID = other
    ds.save_as(path)
    with pytest.raises(DicomError, match="another CT"):
        read_rtstruct(path, standard.volume)


def test_a_contour_between_slices_is_refused(standard, tmp_path):
    path = write_rtstruct({"Brain": standard.masks["Brain"]}, standard.volume, tmp_path / "rt.dcm",
                          model_name="m", model_version="1")
    ds = pydicom.dcmread(path)
    contour = ds.ROIContourSequence[0].ContourSequence[0]
    points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
    points[:, 2] += 1.5  # half a slice
    contour.ContourData = [f"{v:.4f}" for v in points.ravel()]
    ds.save_as(path)
    with pytest.raises(DicomError, match="does not lie on a slice"):
        read_rtstruct(path, standard.volume)


def test_roi_names_outside_the_catalogue_keep_their_name(standard, tmp_path):
    path = write_rtstruct({"Brain": standard.masks["Brain"]}, standard.volume, tmp_path / "rt.dcm",
                          model_name="m", model_version="1")
    ds = pydicom.dcmread(path)
    ds.StructureSetROISequence[0].ROIName = "PTV_70"
    ds.save_as(path)
    back = read_rtstruct(path, standard.volume)
    assert list(back) == ["PTV_70"] and np.array_equal(back["PTV_70"], standard.masks["Brain"])


def test_on_a_gantry_tilted_series_contours_lie_on_the_original_slices(standard, tmp_path, dciodvfy):
    """The tilted series is resampled in-plane only, so each contour still lies on (and references) its slice."""
    from SegRapSegmenterLib.formats.dicom import read_ct_series

    folder = tmp_path / "tilted"
    folder.mkdir()
    for path in sorted(standard.written.ct_dir.iterdir()):
        ds = pydicom.dcmread(path)
        k = round((float(ds.ImagePositionPatient[2]) - standard.volume.image.GetOrigin()[2]) / 3.0)
        ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) + 0.5 * k  # about 9.5 degrees
        ds.save_as(folder / path.name)
    volume = read_ct_series(folder)
    assert any("gantry tilt" in n for n in volume.notes)
    masks = {k: standard.masks[k] for k in ("Brain", "SpinalCord", "Lens_L")}
    path = write_rtstruct(masks, volume, tmp_path / "rt.dcm", model_name="m", model_version="1", notes=volume.notes)
    assert dciodvfy(path) == []
    ds = pydicom.dcmread(path)
    assert "gantry tilt" in ds.StructureSetDescription
    planes = {s.sop_instance_uid: s.position[2] for s in volume.series.slices}
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            z = np.array(contour.ContourData, dtype=float)[2::3]
            assert np.allclose(z, planes[contour.ContourImageSequence[0].ReferencedSOPInstanceUID], atol=1e-3)
    back = read_rtstruct(path, volume)
    assert all(np.array_equal(back[k], masks[k]) for k in masks)
