"""DICOM-RT Structure Set out (and back in): structures on the original CT, with names, colors and codes.

The writer references the CT series the masks were made on by its original UIDs (frame of
reference, study, series and every slice), so a planning system attaches the structure set to
the CT it already holds. Contours come from ``contours.trace``: the 0.5 iso-line of each slice,
one closed contour per 4-connected region plus one per hole. Holes are written as PS3.3 C.8.8.6.3
defines them without ambiguity: by default as a "keyhole" (each hole joined to its outline by a
zero-width channel, so every reader, whether it unions or XORs a slice's contours, fills the same
voxels), or as CLOSEDPLANAR_XOR contours on the slices with a hole (``contour_holes="xor"``). A
reader that fills the voxels whose centre lies inside gets the masks back exactly.

The file is written in Implicit VR Little Endian, whose 32-bit lengths hold ContourData of any
size as DS. (Explicit VR gives DS a 16-bit length; a contour of more than about 2000 points does
not fit and PS3.5 6.2.2 then requires VR UN, which some readers return as bytes.) Explicit VR can
be asked for; long ContourData is then written as UN as the standard says, and ``read_rtstruct``
reads it either way. ContourData is formatted in one string operation and stored as a raw
element, so pydicom never converts the coordinates one value at a time.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from .. import __version__
from ..anatomy import structures as S
from ..arrays import CroppedMasks
from ..errors import DicomError, GeometryError, InputError, StructureNameError
from .contours import Contours, fill, keyhole, signed_areas, trace
from .pydicom_compat import save_file

if TYPE_CHECKING:
    from .dicom import DicomVolume

log = logging.getLogger(__name__)

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
# RT Referenced Study Sequence items name the study with this (retired) SOP class, as planning systems expect.
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"
ROI_NAME_STYLES = ("tg263", "segrap")
CONTOUR_HOLES = ("keyhole", "xor")  # how a hole in a slice is encoded (PS3.3 C.8.8.6.3); keyhole by default
CLOSED_TYPES = ("CLOSED_PLANAR", "CLOSEDPLANAR_XOR")  # the contour geometric types read as areas
STRUCTURE_SET_LABEL = "AUTO UNREVIEWED"  # SH: 16 characters at most
EMPTY_NOTE = "EMPTY: the model found no voxel of this structure on this CT; check before planning."
REVIEW_LABEL = "REVIEW"  # ROI Observation Label (SH, at most 16 characters) of a structure flagged for review
REVIEW_NOTE = "SegRap flagged this contour for review"  # starts its ROI Observation Description
REVIEW_WARNING = ("Auto-generated structures: they must be reviewed and approved by a qualified person before "
                  "any clinical use.")
_CONTOUR_DATA = Tag(0x3006, 0x0050)
_OTHER_COLORS = ((255, 255, 0), (0, 255, 255), (255, 0, 255), (128, 255, 0), (255, 128, 0), (0, 128, 255))


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _code_item(code: S.Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme
    item.CodeMeaning = code.meaning[:64]
    return item


def _image_ref(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def _lo(text: str) -> str:
    """A value that fits a LO element (64 characters, no backslash)."""
    return text.replace("\\", "/")[:64]


def _ds_bytes(values: np.ndarray) -> bytes:
    """A DS multi-value (backslash-separated, even length) from floats, formatted in one operation."""
    flat = values.ravel().tolist()
    text = ("\\".join(["%.4f"] * len(flat)) % tuple(flat)).replace("-0.0000", "0.0000")
    data = text.encode("ascii")
    return data + b" " if len(data) % 2 else data


def _raw_ds(tag: Tag, data: bytes, implicit: bool) -> RawDataElement:
    return RawDataElement(tag, "DS", len(data), data, 0, implicit, True)


def _keep_raw(ds: Dataset, implicit: bool) -> None:
    """Declare a dataset already in the file's encoding, so pydicom writes its raw elements as they are."""
    ds.set_original_encoding(implicit, True, ds._character_set)


def _now() -> tuple[str, str]:
    now = _dt.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


# Patient, Patient Study and General Study attributes copied from the CT (Type 2 ones written empty when absent).
_COPIED_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")
_COPIED_OPTIONAL = ("SpecificCharacterSet", "IssuerOfPatientID", "PatientBirthTime", "OtherPatientIDsSequence",
                    "PatientComments", "PatientIdentityRemoved", "DeidentificationMethod",
                    "DeidentificationMethodCodeSequence", "StudyDescription", "PatientAge", "PatientSize",
                    "PatientWeight", "PhysiciansOfRecord", "ClinicalTrialSponsorName", "ClinicalTrialProtocolID",
                    "ClinicalTrialProtocolName", "ClinicalTrialSiteID", "ClinicalTrialSiteName",
                    "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID", "ClinicalTrialTimePointID")


def _copy_patient_and_study(ds: Dataset, header: Dataset) -> None:
    for keyword in _COPIED_TYPE2:
        setattr(ds, keyword, header[keyword].value if keyword in header else "")
    for keyword in _COPIED_OPTIONAL:
        if keyword in header:
            ds[keyword] = header[keyword]


# --------------------------------------------------------------------------------------------
# ROIs
# --------------------------------------------------------------------------------------------


class _Roi:
    """One structure to write: its number, names, color, codes and where its mask is in the mapping."""

    def __init__(self, number: int, key: str, structure: S.Structure | None, roi_names: str,
                 color: tuple[int, int, int]):
        self.number = number
        self.key = key  # the key of its mask in the caller's mapping
        self.structure = structure
        if structure is None:
            self.name = _lo(key)
            self.description = f"{key} (not a SegRap structure)"
            self.color = color
        else:
            self.name = structure.tg263 if roi_names == "tg263" else structure.name
            self.description = structure.display_name
            self.color = structure.color


def _check_shapes(masks: Mapping[str, np.ndarray], shape: tuple[int, ...]) -> None:
    """Every mask must be on the CT grid (checked without building masks a lazy mapping would allocate)."""
    if hasattr(masks, "crop"):
        got = {tuple(getattr(masks, "shape", ()))}
        keys = list(masks)
    else:
        got_by_key = {k: tuple(np.shape(v)) for k, v in masks.items()}
        keys = [k for k, g in got_by_key.items() if g != shape]
        got = {got_by_key[k] for k in keys} or {shape}
    for g in got:
        if g != shape:
            raise GeometryError(f"The mask of {keys[0]!r} has shape {g} (z, y, x) but the CT has {shape}; masks "
                                f"must be on the CT grid (resample them first).")


def _rois(masks: Mapping[str, np.ndarray], shape: tuple[int, int, int], roi_names: str) -> list[_Roi]:
    """The ROIs in catalogue order (other names after them); every mask is checked against the CT grid."""
    _check_shapes(masks, shape)
    catalogue: dict[str, tuple[S.Structure, str]] = {}
    others: list[str] = []
    for key in masks:
        try:
            structure = S.get(key)
        except StructureNameError:
            others.append(str(key))
            continue
        if structure.name in catalogue:
            raise InputError(f"{structure.name} is given twice (as {catalogue[structure.name][1]!r} and {key!r}).")
        catalogue[structure.name] = (structure, key)
    if not catalogue and not others:
        raise InputError("No structures to write: the mask mapping is empty.")
    if len(set(others)) != len(others):
        raise InputError(f"Structure names repeat: {others}.")
    rois = [_Roi(position, catalogue[s.name][1], s, roi_names, s.color)
            for position, s in enumerate(S.STRUCTURES, start=1) if s.name in catalogue]
    rois += [_Roi(len(S.STRUCTURES) + 1 + k, key, None, roi_names, _OTHER_COLORS[k % len(_OTHER_COLORS)])
             for k, key in enumerate(others)]
    taken = [r.name for r in rois]
    if len(set(taken)) != len(taken):
        raise InputError(f"Two structures would get the same ROI name: {taken}.")
    return rois


def _trace_roi(masks: Mapping[str, np.ndarray], key: str) -> Contours:
    """The contours of one mask, fetched only now (from its crop when the mapping keeps crops)."""
    crop = getattr(masks, "crop", None)
    if crop is None:
        return trace(np.asarray(masks[key]).astype(bool, copy=False))
    box, data = crop(key)
    if data.size == 0 or not data.any():
        return Contours.empty()
    return trace(np.asarray(data, dtype=bool)).shifted(*(b.start or 0 for b in box))


RoiMasks = CroppedMasks  # what ``read_rtstruct`` returns: 47 full masks of a 1024 x 1024 CT would take gigabytes


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


class _Placement:
    """Index (x, y, z) -> patient coordinates on the CT grid, each contour put on its slice's own plane."""

    def __init__(self, reference: DicomVolume | sitk.Image):
        image = reference if isinstance(reference, sitk.Image) else reference.image
        self.origin = np.array(image.GetOrigin())
        direction = np.array(image.GetDirection()).reshape(3, 3)
        self.matrix = direction * np.array(image.GetSpacing())[None, :]
        self.normal = direction[:, 2]
        nz = image.GetSize()[2]
        self.plane = self.origin @ self.normal + np.arange(nz) * image.GetSpacing()[2]
        if not isinstance(reference, sitk.Image):
            slices = reference.series.slices
            if len(slices) != nz:
                raise GeometryError(f"The CT image has {nz} slices but its series lists {len(slices)}; the "
                                    f"DicomVolume is inconsistent.")
            self.plane = np.array([np.asarray(s.position) @ self.normal for s in slices])  # each slice's own plane

    def patient(self, yx: np.ndarray, z: int) -> np.ndarray:
        """Patient coordinates (n, 3) of index points (y, x) on slice z."""
        idx = np.column_stack([yx[:, 1], yx[:, 0], np.full(len(yx), float(z))])
        p = self.origin + idx @ self.matrix.T
        return p + np.outer(self.plane[z] - p @ self.normal, self.normal)

    def index(self, points: np.ndarray) -> np.ndarray:
        """Continuous index coordinates (n, 3: x, y, z) of patient points."""
        return np.linalg.solve(self.matrix, (points - self.origin).T).T


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


def _encode_holes(contours: Contours, contour_holes: str) -> tuple[Contours, list[str]]:
    """The contours to write and each one's geometric type: keyhole-cut, or XOR-typed on slices with a hole."""
    if contour_holes == "keyhole":
        cut = keyhole(contours)
        return cut, ["CLOSED_PLANAR"] * len(cut)
    holed = set(contours.slices[signed_areas(contours) < 0].tolist())
    return contours, ["CLOSEDPLANAR_XOR" if int(z) in holed else "CLOSED_PLANAR" for z in contours.slices]


def _contour_items(contours: Contours, placement: _Placement, slice_refs: Sequence[tuple[str, str]],
                   implicit: bool, contour_holes: str) -> list[Dataset]:
    contours, types = _encode_holes(contours, contour_holes)
    items = []
    for k in range(len(contours)):
        z = int(contours.slices[k])
        pts = placement.patient(contours.contour(k), z)
        item = Dataset()
        item.ContourImageSequence = [_image_ref(*slice_refs[z])]
        item.ContourGeometricType = types[k]
        item.NumberOfContourPoints = len(pts)
        item.ContourNumber = k + 1
        item[_CONTOUR_DATA] = _raw_ds(_CONTOUR_DATA, _ds_bytes(pts), implicit)
        _keep_raw(item, implicit)
        items.append(item)
    return items


def build_rtstruct(masks: Mapping[str, np.ndarray], reference: DicomVolume, *, model_name: str, model_version: str,
                   roi_names: str = "tg263", notes: Sequence[str] = (), explicit_vr: bool = False,
                   contour_holes: str = "keyhole", review: Mapping[str, str] | None = None) -> Dataset:
    """The RT Structure Set dataset of ``masks`` (z, y, x on ``reference.image``'s grid); see ``write_rtstruct``."""
    if roi_names not in ROI_NAME_STYLES:
        raise InputError(f"roi_names must be one of {', '.join(ROI_NAME_STYLES)}, got {roi_names!r}.")
    if contour_holes not in CONTOUR_HOLES:
        raise InputError(f"contour_holes must be one of {', '.join(CONTOUR_HOLES)}, got {contour_holes!r}.")
    image, series = reference.image, reference.series
    if not series.frame_of_reference_uid:
        raise DicomError(f"{series.folder}: the CT series {series.series_uid} has no FrameOfReferenceUID; an RT "
                         f"structure set cannot reference it. Export the series again from the scanner or PACS "
                         f"(or leave out the RTSTRUCT).")
    shape = tuple(image.GetSize()[::-1])
    rois = _rois(masks, shape, roi_names)
    placement = _Placement(reference)
    slice_refs = [(s.sop_class_uid, s.sop_instance_uid) for s in series.slices]
    implicit = not explicit_vr
    date, time = _now()

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if explicit_vr else ImplicitVRLittleEndian
    # SOP Common
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # Patient, General Study (copied from the CT)
    _copy_patient_and_study(ds, series.header)
    ds.StudyInstanceUID = series.study_uid
    # RT Series
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = "SegRap auto-contours, NOT REVIEWED"
    ds.OperatorsName = ""
    # General Equipment
    ds.Manufacturer = "SegRap Segmenter"
    ds.ManufacturerModelName = _lo(model_name)
    ds.SoftwareVersions = [f"segrap {__version__}", _lo(f"{model_name} {model_version}")]
    # Frame of Reference
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = series.header.get("PositionReferenceIndicator", "") or ""
    # Structure Set
    ds.StructureSetLabel = STRUCTURE_SET_LABEL
    ds.StructureSetName = "SegRap auto-contours: review before clinical use"
    description = f"Generated by {model_name} {model_version} with SegRap Segmenter {__version__}. {REVIEW_WARNING}"
    ds.InstanceNumber = 1
    ds.StructureSetDate, ds.StructureSetTime = date, time

    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = series.series_uid
    referenced_series.ContourImageSequence = [_image_ref(*ref) for ref in slice_refs]
    referenced_study = Dataset()
    referenced_study.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    referenced_study.ReferencedSOPInstanceUID = series.study_uid
    referenced_study.RTReferencedSeriesSequence = [referenced_series]
    frame = Dataset()
    frame.FrameOfReferenceUID = series.frame_of_reference_uid
    frame.RTReferencedStudySequence = [referenced_study]
    ds.ReferencedFrameOfReferenceSequence = [frame]

    roi_items, contour_items, observation_items, empty = [], [], [], []
    for roi in rois:
        item = Dataset()
        item.ROINumber = roi.number
        item.ReferencedFrameOfReferenceUID = series.frame_of_reference_uid
        item.ROIName = roi.name
        item.ROIDescription = roi.description
        item.ROIGenerationAlgorithm = "AUTOMATIC"
        item.ROIGenerationDescription = _lo(f"{model_name} {model_version}")
        algorithm = Dataset()
        algorithm.AlgorithmFamilyCodeSequence = [_code_item(S.Code("DCM", "123110", "Artificial Intelligence"))]
        algorithm.AlgorithmName = _lo(model_name)
        algorithm.AlgorithmVersion = _lo(model_version)
        item.ROIDerivationAlgorithmIdentificationSequence = [algorithm]
        roi_items.append(item)

        contour = Dataset()
        contour.ROIDisplayColor = list(roi.color)
        contour.ReferencedROINumber = roi.number
        found = _trace_roi(masks, roi.key)
        if len(found):
            contour.ContourSequence = DicomSequence(_contour_items(found, placement, slice_refs, implicit,
                                                                   contour_holes))
        else:  # kept, without contours: the planner sees "not found" instead of a structure gone missing
            empty.append(roi.name)
        contour_items.append(contour)

        observation = Dataset()
        observation.ObservationNumber = roi.number
        observation.ReferencedROINumber = roi.number
        observation.RTROIInterpretedType = roi.structure.rt_type if roi.structure else ""
        observation.ROIInterpreter = ""
        flagged = (review or {}).get(roi.key) if roi.structure is not None else None
        if flagged:  # PS3.3 C.8.8.8, Table C.8-44: ROI Observation Label (SH) and Description (ST), both Type 3
            observation.ROIObservationLabel = REVIEW_LABEL
        if not len(found):
            observation.ROIObservationDescription = EMPTY_NOTE
        elif flagged:
            observation.ROIObservationDescription = f"{REVIEW_NOTE}: {flagged}".replace("\\", "/")[:1024]
        if roi.structure is not None:
            observation.SegmentedPropertyCategoryCodeSequence = [_code_item(roi.structure.category)]
            identification = _code_item(roi.structure.type)
            if roi.structure.modifier is not None:
                identification.SegmentedPropertyTypeModifierCodeSequence = [_code_item(roi.structure.modifier)]
            observation.RTROIIdentificationCodeSequence = [identification]
        observation_items.append(observation)
    ds.StructureSetROISequence = roi_items
    ds.ROIContourSequence = contour_items
    ds.RTROIObservationsSequence = observation_items
    if empty:  # before the notes, so the 1024-character limit never cuts it
        description += f" Empty (ROIs without contours, not found by the model): {', '.join(empty)}."
    if notes:
        description += " " + " ".join(f"{n.rstrip('.')}." for n in notes)
    ds.StructureSetDescription = description.replace("\\", "/")[:1024]
    # Approval: a planning system shows the set as not approved until someone reviews it
    ds.ApprovalStatus = "UNAPPROVED"
    return ds


def write_rtstruct(masks: Mapping[str, np.ndarray], reference: DicomVolume, path: str | Path, *, model_name: str,
                   model_version: str, roi_names: str = "tg263", notes: Sequence[str] = (),
                   explicit_vr: bool = False, contour_holes: str = "keyhole",
                   review: Mapping[str, str] | None = None) -> Path:
    """Write the structures as an RTSTRUCT on the CT series of ``reference``; the file appears only when complete.

    ``masks``: name (any catalogue spelling; other names are written as given, without codes) ->
    boolean (z, y, x) mask on ``reference.image``'s grid; a mapping with ``crop(name)`` and
    ``shape`` (``StructureMasks``, ``RoiMasks``) is read crop by crop. ``roi_names``: ``tg263``
    (default) or ``segrap``. ``notes``: provenance sentences added to the structure set description.
    ``contour_holes``: ``keyhole`` (default: each hole joined to its region's outline by a
    zero-width channel, one CLOSED_PLANAR contour per region) or ``xor`` (one contour per region
    and per hole, CLOSEDPLANAR_XOR on the slices that have a hole). ``review``: structure name (as in
    ``masks``) -> why to review it; such a ROI's observation is labelled ``REVIEW`` and described.
    """
    path = Path(path)
    ds = build_rtstruct(masks, reference, model_name=model_name, model_version=model_version, roi_names=roi_names,
                        notes=notes, explicit_vr=explicit_vr, contour_holes=contour_holes, review=review)
    for item in (ds, *ds.ROIContourSequence):
        _keep_raw(item, not explicit_vr)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with warnings.catch_warnings():  # explicit VR only: pydicom warns as it writes long ContourData as UN
            warnings.filterwarnings("ignore", message=".*exceeds the size of 64 kByte.*")
            save_file(ds, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("RTSTRUCT with %d structures written to %s", len(ds.StructureSetROISequence), path)
    return path


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


def _contour_points(item: Dataset, path: Path) -> np.ndarray:
    """ContourData of a contour item as (n, 3) floats, read straight from the raw bytes where possible."""
    raw = item.get_item(_CONTOUR_DATA)
    if raw is None:
        return np.zeros((0, 3))
    value = raw.value
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("ascii").strip(" \x00")
        numbers = np.array(text.split("\\"), dtype=np.float64) if text else np.zeros(0)
    elif isinstance(value, str):
        numbers = np.array(value.split("\\"), dtype=np.float64)
    else:
        numbers = np.asarray(list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value],
                             dtype=np.float64)
    if numbers.size % 3:
        raise DicomError(f"{path}: a contour has {numbers.size} ContourData values, not a multiple of 3.")
    return numbers.reshape(-1, 3)


def _check_frame(ds: Dataset, path: Path, want: str) -> None:
    """Fail when the structure set lies in another frame of reference than the CT."""
    frames = {str(f.get("FrameOfReferenceUID", "")) for f in ds.get("ReferencedFrameOfReferenceSequence", [])}
    frames |= {str(r.get("ReferencedFrameOfReferenceUID", "")) for r in ds.get("StructureSetROISequence", [])}
    frames.discard("")
    if frames and want not in frames:
        raise DicomError(f"{path}: the structure set is in frame of reference {', '.join(sorted(frames))}, the CT in "
                         f"{want}; it was drawn on another CT. Give the CT series it references.")


def _find_rtstruct(folder: Path) -> Path:
    """The one RTSTRUCT file in a folder (subfolders included)."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            head = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        except Exception:  # noqa: BLE001 - not DICOM
            continue
        if str(head.get("SOPClassUID", "")) == RT_STRUCTURE_SET_STORAGE:
            found.append(path)
    if len(found) != 1:
        listing = ", ".join(p.name for p in found) if found else "none"
        raise DicomError(f"{folder}: expected one RT Structure Set file, found {len(found)} ({listing}). Give the "
                         f"RTSTRUCT file itself.")
    return found[0]


def read_rtstruct(path: str | Path, reference: DicomVolume | sitk.Image) -> RoiMasks:
    """The ROIs of an RTSTRUCT as (z, y, x) masks on the CT grid (even-odd fill per slice).

    ``path``: the RTSTRUCT file, or a folder holding exactly one. ``reference``: the CT it was
    drawn on, as read by ``read_ct_series`` (its frame of reference is checked), or just its image.
    Keys are SegRap names where the ROI name is a catalogue spelling, else the ROI name itself.
    The result is a mapping that holds each mask cropped (``.crop(name)``) and builds the full mask
    on indexing. Closed planar contours only (CLOSED_PLANAR, keyhole-cut or not, and
    CLOSEDPLANAR_XOR); points and open contours are skipped.
    """
    path = Path(path)
    if path.is_dir():
        path = _find_rtstruct(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001
        raise DicomError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc}).") from exc
    if str(ds.get("SOPClassUID", "")) != RT_STRUCTURE_SET_STORAGE:
        raise DicomError(f"{path}: not an RT Structure Set (SOP class {ds.get('SOPClassUID', 'missing')}).")
    if not isinstance(reference, sitk.Image):
        _check_frame(ds, path, reference.series.frame_of_reference_uid)
    image = reference if isinstance(reference, sitk.Image) else reference.image
    shape = tuple(image.GetSize()[::-1])
    placement = _Placement(reference)
    names = {int(r.ROINumber): str(r.get("ROIName", "") or f"ROI {r.ROINumber}")
             for r in ds.get("StructureSetROISequence", [])}
    crops: dict[str, tuple[tuple[slice, ...], np.ndarray]] = {}
    for roi in ds.get("ROIContourSequence", []):
        number = int(roi.ReferencedROINumber)
        name = names.get(number, f"ROI {number}")
        try:
            key = S.get(name).name
        except StructureNameError:
            key = name
        if key in crops:
            key = name if name not in crops else f"{name} #{number}"
        polygons, slices = [], []
        for item in roi.get("ContourSequence", []):
            if str(item.get("ContourGeometricType", "")).upper() not in CLOSED_TYPES:
                continue
            pts = _contour_points(item, path)
            if len(pts) < 3:
                continue
            idx = placement.index(pts)
            z = np.rint(idx[:, 2])
            if np.max(np.abs(idx[:, 2] - z)) > 0.25 or np.ptp(z) > 0:
                raise DicomError(f"{path}: a contour of ROI {name!r} does not lie on a slice of the CT (index z "
                                 f"{idx[:, 2].min():.2f}..{idx[:, 2].max():.2f}); give the CT the structure set was "
                                 f"drawn on.")
            if not 0 <= z[0] < shape[0]:
                raise DicomError(f"{path}: a contour of ROI {name!r} lies outside the CT (slice index {int(z[0])} of "
                                 f"{shape[0]}); give the CT the structure set was drawn on.")
            polygons.append(idx[:, [1, 0]])
            slices.append(int(z[0]))
        crops[key] = _filled_crop(polygons, slices, shape)
    return RoiMasks(shape, crops)


def _filled_crop(polygons: list[np.ndarray], slices: list[int], shape: tuple[int, ...]
                 ) -> tuple[tuple[slice, ...], np.ndarray]:
    """Even-odd fill of one ROI's polygons (index y, x per slice), within the polygons' bounding box."""
    if not polygons:
        return tuple(slice(0, 0) for _ in shape), np.zeros((0, 0, 0), dtype=bool)
    points = np.concatenate(polygons)
    lo = np.maximum(np.floor(points.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(points.max(axis=0)).astype(int) + 1, np.array(shape[1:]))
    z0, z1 = min(slices), max(slices) + 1
    counts = [len(p) for p in polygons]
    contours = Contours(np.array(slices), np.r_[0, np.cumsum(counts)].astype(np.int64), points)
    box = (slice(z0, z1), slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1])))
    size = (z1 - z0, max(int(hi[0] - lo[0]), 0), max(int(hi[1] - lo[1]), 0))
    return box, fill(contours.shifted(-z0, -lo[0], -lo[1]), size)


# --------------------------------------------------------------------------------------------
# Any segmentation onto the CT grid, and the export of a .seg.nrrd
# --------------------------------------------------------------------------------------------


def _same_grid(a, b) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-5, atol=1e-5)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5))


def _outside_extent(mask: np.ndarray, source, target) -> bool:
    """True when a voxel of ``mask`` (on ``source``'s grid) lies outside ``target``'s extent."""
    hit = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    lo = np.array([h[0] for h in hit[::-1]], dtype=float)  # x, y, z index
    hi = np.array([h[-1] for h in hit[::-1]], dtype=float)
    corners = [(x, y, z) for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    size = np.array(target.GetSize(), dtype=float)
    for c in corners:
        point = source.TransformContinuousIndexToPhysicalPoint(c)
        idx = np.array(target.TransformPhysicalPointToContinuousIndex(point))
        if np.any(idx < -0.5 - 1e-3) or np.any(idx > size - 0.5 + 1e-3):
            return True
    return False


def masks_on_grid(masks: Mapping[str, np.ndarray], source, target, what: str = "The segmentation"
                  ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Masks on ``source``'s grid put on ``target``'s grid (nearest neighbour), and notes saying what was done.

    A GeometryError names the structures that reach outside the target's extent: they would be
    cut, so nothing is resampled.
    """
    import SimpleITK as sitk

    if _same_grid(source, target):
        return {k: np.asarray(v, dtype=bool) for k, v in masks.items()}, []
    outside = [k for k, v in masks.items() if np.any(v) and _outside_extent(np.asarray(v, dtype=bool), source, target)]
    if outside:
        raise GeometryError(
            f"{what} does not fit the CT: {', '.join(outside)} reach outside the CT's extent (CT: "
            f"{target.GetSize()} voxels from {np.round(target.GetOrigin(), 1).tolist()} mm). Was it drawn on another "
            f"CT? Give the CT series it belongs to.")
    out, lost = {}, []
    for key, mask in masks.items():
        arr = np.asarray(mask, dtype=np.uint8)
        img = sitk.GetImageFromArray(arr)
        img.SetOrigin(source.GetOrigin())
        img.SetSpacing(source.GetSpacing())
        img.SetDirection(source.GetDirection())
        moved = sitk.Resample(img, target, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        out[key] = sitk.GetArrayFromImage(moved).astype(bool)
        if arr.any() and not out[key].any():
            lost.append(str(key))
    notes = [f"{what} was on a {'x'.join(map(str, source.GetSize()))} grid of "
             f"{'x'.join(f'{v:.3g}' for v in source.GetSpacing())} mm, not the CT's "
             f"{'x'.join(map(str, target.GetSize()))} grid of {'x'.join(f'{v:.3g}' for v in target.GetSpacing())} mm: "
             f"it was resampled onto the CT grid (nearest neighbour)"]
    if lost:
        notes.append(f"{', '.join(lost)} vanished in the resampling (thinner than the CT voxels)")
    return out, notes


def _model_of(provenance: dict | None) -> tuple[str, str]:
    """Model name and version recorded in a segmentation's provenance, if any."""
    if isinstance(provenance, dict):
        model = provenance.get("model")
        if isinstance(model, dict) and model.get("name"):
            return str(model["name"]), str(model.get("version", "unknown version"))
        if provenance.get("model_name"):
            return str(provenance["model_name"]), str(provenance.get("model_version", "unknown version"))
    return "unknown model", "unknown version"


def export_rtstruct(seg_path: str | Path, ct_folder: str | Path, out: str | Path, *, roi_names: str = "tg263",
                    series_uid: str | None = None, contour_holes: str = "keyhole") -> tuple[Path, list[str]]:
    """A ``.seg.nrrd`` (ours or one edited in Slicer) as an RTSTRUCT on the CT series in ``ct_folder``.

    Only the CT's headers are read (no pixel data is decoded), so a CT in any transfer syntax
    works. Returns the written path and the provenance notes (resampling, CT reading) it records.
    """
    from .dicom import read_ct_series
    from .segfile import read_seg_nrrd

    seg = read_seg_nrrd(seg_path)
    volume = read_ct_series(ct_folder, series_uid, pixels=False)
    masks, notes = masks_on_grid(seg.masks, seg.reference, volume.image, what=f"The segmentation {Path(seg_path).name}")
    for note in notes:
        log.info("%s", note)
    model_name, model_version = _model_of(seg.provenance)
    path = write_rtstruct(masks, volume, out, model_name=model_name, model_version=model_version, roi_names=roi_names,
                          notes=[*notes, *volume.notes[1:]], contour_holes=contour_holes)
    return path, notes
