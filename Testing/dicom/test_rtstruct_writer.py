"""The RTSTRUCT writer: every module of the RT Structure Set IOD, every reference to the CT's original UIDs."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.errors import GeometryError, InputError
from SegRapSegmenterLib.formats import rtstruct
from SegRapSegmenterLib.formats.contours import Contours, fill
from SegRapSegmenterLib.formats.dicom import read_ct_series
from SegRapSegmenterLib.formats.rtstruct import RT_STRUCTURE_SET_STORAGE, read_rtstruct, write_rtstruct
from SegRapSegmenterLib.phantom.dicom_series import write_series

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MODEL = ("SegRap DKFZ nnU-Net ResEnc", "2.0.1")


@pytest.fixture(scope="module")
def written(standard, tmp_path_factory):
    """The standard phantom's 47 structures written as an RTSTRUCT, and the dataset read back."""
    path = write_rtstruct(standard.masks, standard.volume, tmp_path_factory.mktemp("rt") / "rt.dcm",
                          model_name=MODEL[0], model_version=MODEL[1])
    return path, pydicom.dcmread(path)


@pytest.fixture(scope="module")
def ct_files(standard):
    """The CT files' headers, read directly (independent of the reader under test)."""
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(standard.written.ct_dir.iterdir())]


# Type 1 (present, not empty) and Type 2 (present) attributes of each module (PS3.3 A.19, C.7, C.8.8, C.12.1).
MODULES = {
    "Patient": ((), ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")),
    "General Study": (("StudyInstanceUID",), ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                                              "AccessionNumber")),
    "RT Series": (("Modality", "SeriesInstanceUID"), ("SeriesNumber", "OperatorsName")),
    "General Equipment": ((), ("Manufacturer",)),
    "Frame of Reference": (("FrameOfReferenceUID",), ("PositionReferenceIndicator",)),
    "Structure Set": (("StructureSetLabel", "StructureSetROISequence"), ("StructureSetDate", "StructureSetTime")),
    "ROI Contour": (("ROIContourSequence",), ()),
    "RT ROI Observations": (("RTROIObservationsSequence",), ()),
    "Approval": (("ApprovalStatus",), ()),
    "SOP Common": (("SOPClassUID", "SOPInstanceUID"), ()),
}


@pytest.mark.parametrize("module", MODULES)
def test_every_module_has_its_type1_and_type2_attributes(written, module):
    ds = written[1]
    type1, type2 = MODULES[module]
    for keyword in type1:
        assert keyword in ds and ds.data_element(keyword).value not in (None, "", []), keyword
    for keyword in type2:
        assert keyword in ds, keyword


def test_item_level_required_attributes(written):
    ds = written[1]
    for item in ds.StructureSetROISequence:
        for keyword in ("ROINumber", "ReferencedFrameOfReferenceUID", "ROIGenerationAlgorithm"):
            assert item.data_element(keyword).value not in (None, "")
        assert "ROIName" in item
    for item in ds.ROIContourSequence:
        assert item.ReferencedROINumber and len(item.ROIDisplayColor) == 3
        for contour in item.ContourSequence:
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            assert int(contour.NumberOfContourPoints) * 3 == len(contour.ContourData)
            assert len(contour.ContourImageSequence) == 1
    for item in ds.RTROIObservationsSequence:
        assert item.ObservationNumber and item.ReferencedROINumber
        assert "RTROIInterpretedType" in item and "ROIInterpreter" in item


def test_sop_class_and_new_uids(written, standard):
    ds = written[1]
    series = standard.volume.series
    assert ds.SOPClassUID == RT_STRUCTURE_SET_STORAGE == ds.file_meta.MediaStorageSOPClassUID
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.Modality == "RTSTRUCT"
    old = {series.series_uid, standard.written.contrast_series_uid, *(s.sop_instance_uid for s in series.slices)}
    assert ds.SeriesInstanceUID not in old and ds.SOPInstanceUID not in old
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian


def test_patient_and_study_are_copied_from_the_ct(written, ct_files):
    ds, ct = written[1], ct_files[0]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription",
                    "SpecificCharacterSet"):
        assert ds.data_element(keyword).value == ct.data_element(keyword).value, keyword
    assert ds.FrameOfReferenceUID == ct.FrameOfReferenceUID


def test_references_lead_to_every_ct_slice_by_its_original_uids(written, ct_files):
    ds = written[1]
    ct = ct_files[0]
    (frame,) = ds.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == ct.FrameOfReferenceUID
    (study,) = frame.RTReferencedStudySequence
    assert study.ReferencedSOPInstanceUID == ct.StudyInstanceUID
    assert study.ReferencedSOPClassUID == "1.2.840.10008.3.1.2.3.1"
    (series,) = study.RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == ct.SeriesInstanceUID
    listed = [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in series.ContourImageSequence]
    assert sorted(listed) == sorted((f.SOPClassUID, f.SOPInstanceUID) for f in ct_files)
    assert {c for c, _ in listed} == {CT_IMAGE_STORAGE}
    for item in ds.StructureSetROISequence:
        assert item.ReferencedFrameOfReferenceUID == ct.FrameOfReferenceUID


def test_each_contour_references_the_slice_it_lies_on(written, ct_files):
    ds = written[1]
    by_uid = {f.SOPInstanceUID: f for f in ct_files}
    normal = np.cross(*np.array(ct_files[0].ImageOrientationPatient, dtype=float).reshape(2, 3))
    checked = 0
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            (ref,) = contour.ContourImageSequence
            ct = by_uid[ref.ReferencedSOPInstanceUID]
            assert ref.ReferencedSOPClassUID == ct.SOPClassUID
            points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
            plane = np.array(ct.ImagePositionPatient, dtype=float) @ normal
            assert np.allclose(points @ normal, plane, atol=1e-3)
            checked += 1
    assert checked > 47


def test_rois_carry_names_colors_types_and_codes_from_the_catalogue(written):
    ds = written[1]
    rois = {int(r.ROINumber): r for r in ds.StructureSetROISequence}
    contours = {int(r.ReferencedROINumber): r for r in ds.ROIContourSequence}
    observations = {int(r.ReferencedROINumber): r for r in ds.RTROIObservationsSequence}
    assert len(rois) == len(contours) == len(observations) == 47
    names = [r.ROIName for r in ds.StructureSetROISequence]
    assert names == [s.tg263 for s in S.STRUCTURES]  # TG-263 by default, catalogue order
    for number, roi in rois.items():
        s = S.get(roi.ROIName)
        assert [int(c) for c in contours[number].ROIDisplayColor] == list(s.color)
        obs = observations[number]
        assert obs.RTROIInterpretedType == ("GTV" if s.task == "gtv" else "ORGAN")
        (code,) = obs.RTROIIdentificationCodeSequence
        assert (code.CodingSchemeDesignator, code.CodeValue, code.CodeMeaning) == (s.type.scheme, s.type.value,
                                                                                   s.type.meaning)
        if s.modifier is not None:
            (modifier,) = code.SegmentedPropertyTypeModifierCodeSequence
            assert modifier.CodeValue == s.modifier.value
        (category,) = obs.SegmentedPropertyCategoryCodeSequence
        assert category.CodeValue == s.category.value


def test_generation_is_automatic_with_the_model_name_and_version(written):
    for roi in written[1].StructureSetROISequence:
        assert roi.ROIGenerationAlgorithm == "AUTOMATIC"
        assert MODEL[0] in roi.ROIGenerationDescription and MODEL[1] in roi.ROIGenerationDescription
        (algorithm,) = roi.ROIDerivationAlgorithmIdentificationSequence
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == MODEL
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"


def test_label_and_description_say_auto_generated_and_review_needed(written):
    ds = written[1]
    assert "AUTO" in ds.StructureSetLabel
    assert "review" in ds.StructureSetName.lower()
    assert "Auto-generated" in ds.StructureSetDescription and "reviewed" in ds.StructureSetDescription
    assert MODEL[0] in ds.StructureSetDescription
    assert "NOT REVIEWED" in ds.SeriesDescription
    assert ds.ApprovalStatus == "UNAPPROVED"


def test_rtstruct_passes_dciodvfy(written, dciodvfy):
    assert dciodvfy(written[0]) == []


def test_segrap_names_on_request(standard, tmp_path):
    masks = {k: standard.masks[k] for k in ("Parotid_L", "GTVnd", "Brain")}
    path = write_rtstruct(masks, standard.volume, tmp_path / "rt.dcm", model_name="m", model_version="1",
                          roi_names="segrap")
    ds = pydicom.dcmread(path)
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["Brain", "Parotid_L", "GTVnd"]
    assert set(read_rtstruct(path, standard.volume)) == {"Brain", "Parotid_L", "GTVnd"}


def test_any_catalogue_spelling_is_accepted(standard, tmp_path):
    masks = {"Glnd_Submand_L": standard.masks["Submandibular_L"], "optic chiasm": standard.masks["Chiasm"]}
    path = write_rtstruct(masks, standard.volume, tmp_path / "rt.dcm", model_name="m", model_version="1")
    back = read_rtstruct(path, standard.volume)
    assert np.array_equal(back["Submandibular_L"], masks["Glnd_Submand_L"])
    assert np.array_equal(back["Chiasm"], masks["optic chiasm"])


def test_other_names_are_written_as_given_without_codes(standard, tmp_path, dciodvfy):
    masks = {"Boost_Region": standard.masks["OralCavity"], "Brain": standard.masks["Brain"]}
    path = write_rtstruct(masks, standard.volume, tmp_path / "rt.dcm", model_name="m", model_version="1")
    ds = pydicom.dcmread(path)
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["Brain", "Boost_Region"]
    assert "RTROIIdentificationCodeSequence" not in ds.RTROIObservationsSequence[1]
    assert np.array_equal(read_rtstruct(path, standard.volume)["Boost_Region"], masks["Boost_Region"])
    assert dciodvfy(path) == []


def test_an_empty_structure_is_an_roi_without_contours(standard, tmp_path):
    masks = {"Lens_L": np.zeros_like(standard.masks["Lens_L"]), "Eye_L": standard.masks["Eye_L"]}
    path = write_rtstruct(masks, standard.volume, tmp_path / "rt.dcm", model_name="m", model_version="1")
    ds = pydicom.dcmread(path)
    assert "ContourSequence" not in ds.ROIContourSequence[1]
    assert not read_rtstruct(path, standard.volume)["Lens_L"].any()


def _single_voxel(volume, k: int, j: int, i: int) -> np.ndarray:
    mask = np.zeros(volume.image.GetSize()[::-1], dtype=bool)
    mask[k, j, i] = True
    return mask


@pytest.mark.parametrize("variant", ["anisotropic", "oblique"])
def test_a_single_voxel_contour_sits_on_its_voxel_in_patient_coordinates(dicom_variant, tmp_path, variant):
    """Rows and columns in PixelSpacing order, and the direction cosines, put the contour around the voxel."""
    v = dicom_variant(variant)
    image = v.volume.image
    path = write_rtstruct({"Lens_R": _single_voxel(v.volume, 20, 40, 30)}, v.volume, tmp_path / "rt.dcm",
                          model_name="m", model_version="1")
    points = np.array(pydicom.dcmread(path).ROIContourSequence[0].ContourSequence[0].ContourData,
                      dtype=float).reshape(-1, 3)
    centre = np.array(image.TransformIndexToPhysicalPoint((30, 40, 20)))
    assert np.allclose(points.mean(axis=0), centre, atol=1e-3)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    along_row = (points - centre) @ direction[:, 0]  # along a row: columns, PixelSpacing[1]
    along_column = (points - centre) @ direction[:, 1]  # down a column: rows, PixelSpacing[0]
    sx, sy, _ = image.GetSpacing()
    assert np.ptp(along_row) == pytest.approx(sx, abs=1e-3)
    assert np.ptp(along_column) == pytest.approx(sy, abs=1e-3)


def test_two_by_two_and_single_voxel_structures_survive(standard, tmp_path):
    two = np.zeros(standard.volume.image.GetSize()[::-1], dtype=bool)
    two[10, 20:22, 30:32] = True
    masks = {"Lens_L": two, "Lens_R": _single_voxel(standard.volume, 11, 50, 60)}
    path = write_rtstruct(masks, standard.volume, tmp_path / "rt.dcm", model_name="m", model_version="1")
    back = read_rtstruct(path, standard.volume)
    assert np.array_equal(back["Lens_L"], two) and np.array_equal(back["Lens_R"], masks["Lens_R"])


def _ring(volume) -> np.ndarray:
    ring = np.zeros(volume.image.GetSize()[::-1], dtype=bool)
    ring[15, 30:50, 30:50] = True
    ring[15, 36:44, 36:44] = False
    ring[15, 39:41, 39:41] = True  # an island in the hole: a region of its own
    return ring


def _union_of_contours(path, volume) -> np.ndarray:
    """The voxels inside any one contour of the first ROI: how readers that OR a slice's contours fill them."""
    placement = rtstruct._Placement(volume)
    shape = volume.image.GetSize()[::-1]
    out = np.zeros(shape, dtype=bool)
    for item in pydicom.dcmread(path).ROIContourSequence[0].ContourSequence:
        idx = placement.index(np.array(item.ContourData, dtype=float).reshape(-1, 3))
        one = Contours(np.array([int(round(idx[0, 2]))]), np.array([0, len(idx)]), idx[:, [1, 0]])
        out |= fill(one, shape)
    return out


def test_holes_are_keyhole_cut_by_default(standard, tmp_path):
    """A ring with an island: one keyhole contour for the ring, one for the island; a union reader reads it right."""
    ring = _ring(standard.volume)
    path = write_rtstruct({"Trachea": ring}, standard.volume, tmp_path / "rt.dcm", model_name="m", model_version="1")
    contours = pydicom.dcmread(path).ROIContourSequence[0].ContourSequence
    assert len(contours) == 2 and {c.ContourGeometricType for c in contours} == {"CLOSED_PLANAR"}
    refs = {c.ContourImageSequence[0].ReferencedSOPInstanceUID for c in contours}
    assert refs == {standard.volume.series.slices[15].sop_instance_uid}
    assert np.array_equal(read_rtstruct(path, standard.volume)["Trachea"], ring)
    assert np.array_equal(_union_of_contours(path, standard.volume), ring)


def test_holes_as_closedplanar_xor(standard, tmp_path):
    ring = _ring(standard.volume)
    ring[20, 30:35, 30:35] = True  # a slice without a hole stays CLOSED_PLANAR
    path = write_rtstruct({"Trachea": ring}, standard.volume, tmp_path / "rt.dcm", model_name="m", model_version="1",
                          contour_holes="xor")
    contours = pydicom.dcmread(path).ROIContourSequence[0].ContourSequence
    types = sorted(c.ContourGeometricType for c in contours)
    assert types == ["CLOSEDPLANAR_XOR"] * 3 + ["CLOSED_PLANAR"]
    assert np.array_equal(read_rtstruct(path, standard.volume)["Trachea"], ring)


def test_an_unknown_hole_encoding_is_refused(standard, tmp_path):
    with pytest.raises(InputError, match="contour_holes"):
        write_rtstruct({"Trachea": _ring(standard.volume)}, standard.volume, tmp_path / "rt.dcm", model_name="m",
                       model_version="1", contour_holes="union")


@pytest.fixture(scope="module")
def wide_ct(tmp_path_factory):
    """A two-slice 1024 x 1024 CT, for a contour far longer than Explicit VR's 64 KiB DS limit."""
    image = sitk.GetImageFromArray(np.full((2, 1024, 1024), -1000, dtype=np.int16))
    image.SetSpacing((0.25, 0.25, 3.0))
    image.SetOrigin((-128.0, -128.0, -30.0))
    folder = tmp_path_factory.mktemp("wide") / "CT"
    write_series(image, folder, patient={"PatientName": "Test^Comb", "PatientID": "COMB"},
                 study_uid=pydicom.uid.generate_uid(), series_uid=pydicom.uid.generate_uid(),
                 frame_of_reference_uid=pydicom.uid.generate_uid(), series_number=1, description="comb test")
    comb = np.zeros((2, 1024, 1024), dtype=bool)
    comb[0, 10:1014, 10:14] = True
    for row in range(10, 1014, 2):
        comb[0, row, 14:34 + (row * 37) % 900] = True
    return read_ct_series(folder), comb


@pytest.mark.parametrize("explicit_vr", [False, True])
def test_contour_data_longer_than_64_kib_stays_valid(wide_ct, tmp_path, dciodvfy, explicit_vr):
    volume, comb = wide_ct
    path = write_rtstruct({"Comb": comb}, volume, tmp_path / "rt.dcm", model_name="m", model_version="1",
                          explicit_vr=explicit_vr)
    ds = pydicom.dcmread(path)
    (contour,) = ds.ROIContourSequence[0].ContourSequence
    raw = contour.get_item(0x30060050)
    assert raw.length > 0xFFFF
    # implicit VR: DS from the dictionary; explicit VR: UN with a 32-bit length, as PS3.5 6.2.2 requires
    assert raw.VR == ("UN" if explicit_vr else None)
    assert int(contour.NumberOfContourPoints) > 2000
    assert dciodvfy(path) == []
    assert np.array_equal(read_rtstruct(path, volume)["Comb"], comb)


def test_masks_on_another_grid_are_refused_and_nothing_is_written(standard, tmp_path):
    wrong = np.zeros((10, 20, 30), dtype=bool)
    with pytest.raises(GeometryError, match="Parotid_L"):
        write_rtstruct({"Parotid_L": wrong}, standard.volume, tmp_path / "rt.dcm", model_name="m", model_version="1")
    assert list(tmp_path.iterdir()) == []


def test_a_structure_given_twice_is_refused(standard, tmp_path):
    mask = standard.masks["Parotid_L"]
    with pytest.raises(InputError, match="twice"):
        write_rtstruct({"Parotid_L": mask, "Parotid L": mask}, standard.volume, tmp_path / "rt.dcm",
                       model_name="m", model_version="1")
    assert list(tmp_path.iterdir()) == []


def test_writing_is_atomic(standard, tmp_path):
    target = tmp_path / "rt.dcm"
    target.write_bytes(b"old")
    write_rtstruct({"Brain": standard.masks["Brain"]}, standard.volume, target, model_name="m", model_version="1")
    assert [p.name for p in tmp_path.iterdir()] == ["rt.dcm"]
    assert pydicom.dcmread(target).SOPClassUID == RT_STRUCTURE_SET_STORAGE


def test_an_empty_structure_is_kept_as_a_roi_without_contours_and_said_so(standard, tmp_path, dciodvfy):
    """A planner must see "not found", not a structure that silently went missing."""
    masks = {"Brain": standard.masks["Brain"], "Chiasm": np.zeros(standard.volume.image.GetSize()[::-1], bool)}
    path = write_rtstruct(masks, standard.volume, tmp_path / "rt.dcm", model_name="m", model_version="1")
    ds = pydicom.dcmread(path)
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["Brain", "OpticChiasm"]
    brain, chiasm = ds.ROIContourSequence
    assert "ContourSequence" in brain and "ContourSequence" not in chiasm
    observations = {o.ReferencedROINumber: o for o in ds.RTROIObservationsSequence}
    assert "EMPTY" in observations[chiasm.ReferencedROINumber].ROIObservationDescription
    assert "ROIObservationDescription" not in observations[brain.ReferencedROINumber]
    assert "Empty (ROIs without contours, not found by the model): OpticChiasm." in ds.StructureSetDescription
    assert dciodvfy(path) == []
    back = read_rtstruct(path, standard.volume)
    assert not back["Chiasm"].any() and np.array_equal(back["Brain"], masks["Brain"])


def test_a_flagged_structure_carries_the_review_in_its_roi_observation(standard, tmp_path, dciodvfy):
    review = {"Parotid_L": "low network certainty (expected Dice 0.41); 44% removed by post-processing "
                           "(confidence 0.23)"}
    path = write_rtstruct(standard.masks, standard.volume, tmp_path / "rt.dcm", model_name=MODEL[0],
                          model_version=MODEL[1], review=review)
    ds = pydicom.dcmread(path)
    number = {r.ROIName: r.ROINumber for r in ds.StructureSetROISequence}
    observations = {o.ReferencedROINumber: o for o in ds.RTROIObservationsSequence}
    flagged = observations[number["Parotid_L"]]
    assert flagged.ROIObservationLabel == rtstruct.REVIEW_LABEL
    assert flagged.ROIObservationDescription.startswith(rtstruct.REVIEW_NOTE)
    assert "44% removed by post-processing" in flagged.ROIObservationDescription
    unflagged = [o for n, o in observations.items() if n != number["Parotid_L"]]
    assert all("ROIObservationLabel" not in o for o in unflagged)
    assert dciodvfy(path) == []
