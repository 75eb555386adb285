"""DICOM CT series in: discovery by SeriesInstanceUID, sorting by position, checks, HU volume.

``read_ct_series`` turns a folder (with subfolders) into a SimpleITK image in Hounsfield units
whose geometry is the series' own (origin = first slice along the slice normal, direction from
ImageOrientationPatient), and keeps what an RTSTRUCT must reference: the study, series and frame
of reference UIDs and every slice's SOP UIDs in the image's z order. Every check fails with a
DicomError naming the folder or file and the fix. Messages and logs name files and UIDs only,
never patient names or IDs, except the refusals of one input that mixes patients or of a CT and
contrast CT of two patients (``identity``), which show the differing values so that the user can
tell which file is wrong. The RTSTRUCT writer and reader live in ``rtstruct`` and are
re-exported here.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pydicom.dataset
import pydicom.uid
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from ..errors import DicomError
from .limits import check_size, check_spacing, max_voxels
from .pydicom_compat import decoder_problem, original_encoding

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
PIXEL_DATA_TAG = 0x7FE00010

ORIENTATION_TOLERANCE = 1e-4  # direction cosines
POSITION_TOLERANCE_MM = 0.01  # duplicate slices, in-plane offsets (gantry tilt)
SPACING_TOLERANCE = 0.01  # relative deviation of a slice step from the mean step


@dataclass(frozen=True)
class Patient:
    """Who a DICOM file belongs to: PatientID, PatientName and PatientBirthDate as written (blank when absent)."""

    id: str
    name: str
    birth_date: str

    @classmethod
    def of(cls, ds: Dataset) -> "Patient":
        return cls(_text(ds, "PatientID"), _text(ds, "PatientName"), _text(ds, "PatientBirthDate"))

    @staticmethod
    def _same_name(a: str, b: str) -> bool:
        """PatientName values equal as names: the alphabetic group only, case, spaces and empty trailing parts ignored."""
        def parts(value: str) -> list[str]:
            words = [w.strip().upper() for w in value.split("=")[0].split("^")]
            while words and not words[-1]:
                words.pop()
            return words
        return parts(a) == parts(b)

    def differences(self, other: "Patient", values: bool = True) -> str:
        """The identifying attributes that both carry and that differ, with both values unless ``values`` is
        False (for logs that must hold no patient data); '' when none differs."""
        differ = []
        for keyword, a, b, same in (("PatientID", self.id, other.id, str.__eq__),
                                    ("PatientName", self.name, other.name, self._same_name),
                                    ("PatientBirthDate", self.birth_date, other.birth_date, str.__eq__)):
            if a and b and not same(a, b):
                differ.append(f"{keyword} {a!r} vs {b!r}" if values else f"{keyword} differs")
        return "; ".join(differ)


def one_patient(named: Sequence[tuple[Patient, str]], where: str) -> Patient:
    """The patient that every file names (each attribute's first non-blank value); DicomError when two differ.

    ``named`` pairs each file's patient with a name for the message (a file name, or '' when unknown).
    """
    known, source = Patient("", "", ""), ""
    for patient, name in named:
        differ = known.differences(patient)
        if differ:
            files = f"{source} and {name}: " if source and name else ""
            raise DicomError(f"{where} mixes patients ({files}{differ}). A CT series belongs to one patient: remove "
                             f"the other patient's files or export the series again.")
        source = source if known.id else name
        known = Patient(known.id or patient.id, known.name or patient.name, known.birth_date or patient.birth_date)
    return known


@dataclass(frozen=True)
class SeriesInfo:
    """One series found in a folder: its UIDs, what it is, its files and the patients its files name."""

    series_uid: str
    modality: str
    description: str
    study_uid: str
    sop_class_uid: str
    files: tuple[Path, ...]
    patients: tuple[Patient, ...] = field(default=(), repr=False)  # distinct, in file order; never in logs
    frame_of_reference_uid: str = ""

    @property
    def slice_count(self) -> int:
        return len(self.files)

    def describe(self) -> str:
        """One line for messages: UID, modality, description, file count (no patient data)."""
        text = f" {self.description!r}" if self.description else ""
        return f"{self.series_uid} ({self.modality or 'no modality'}{text}, {self.slice_count} files)"


@dataclass(frozen=True)
class CtSlice:
    """One CT image of a series, as an RTSTRUCT references it."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    position: tuple[float, float, float]  # ImagePositionPatient, mm


@dataclass(frozen=True)
class CtSeries:
    """What a CT series' derived objects must reference, with its slices in the image's z order."""

    folder: Path
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    description: str
    slices: tuple[CtSlice, ...]
    header: Dataset = field(repr=False)  # first slice's attributes without pixel data (patient, study)
    transfer_syntax: str = ""
    patient: Patient | None = field(default=None, repr=False)  # every slice's (two are refused); never in logs

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal (row direction x column direction)."""
        iop = np.array(self.header.ImageOrientationPatient, dtype=float)
        n = np.cross(iop[:3], iop[3:])
        return n / np.linalg.norm(n)


@dataclass
class DicomVolume:
    """A CT series read into Hounsfield units, with the references and notes of how it was read."""

    image: sitk.Image
    series: CtSeries
    notes: list[str] = field(default_factory=list)  # provenance: what was done to the data


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def _looks_like_raw_dataset(path: Path) -> bool:
    """A file without the DICM preamble that starts like a little-endian dataset (group 0002 or 0008)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and head[:2] in (b"\x02\x00", b"\x08\x00")


DEFLATED = "1.2.840.10008.1.2.1.99"
DEFLATED_FILE_LIMIT = 64 << 20  # inflated bytes of one file: a 4096 x 4096 16-bit slice is 32 MiB


def _check_inflated_size(path: Path) -> None:
    """Refuse a Deflated Explicit VR file that inflates past DEFLATED_FILE_LIMIT (pydicom inflates it whole)."""
    import struct
    import zlib

    with open(path, "rb") as fh:
        head = fh.read(1024)
        if head[128:132] != b"DICM" or DEFLATED.encode() not in head:
            return
        # the file meta group (explicit VR little endian) starts with its own length: (0002,0000) UL
        if head[132:138] != b"\x02\x00\x00\x00UL":
            raise DicomError(f"{path}: a deflated DICOM file without a file meta group length; refused.")
        fh.seek(144 + struct.unpack("<I", head[140:144])[0])
        inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
        for block in iter(lambda: fh.read(1 << 16), b""):
            total += len(inflater.decompress(block, DEFLATED_FILE_LIMIT + 1 - total))
            while inflater.unconsumed_tail and total <= DEFLATED_FILE_LIMIT:
                total += len(inflater.decompress(inflater.unconsumed_tail, DEFLATED_FILE_LIMIT + 1 - total))
            if total > DEFLATED_FILE_LIMIT:
                raise DicomError(f"{path}: refused: the deflated data set inflates past {DEFLATED_FILE_LIMIT >> 20} "
                                 f"MiB, more than one CT slice holds (a compression bomb?).")


def _read_header(path: Path) -> Dataset | None:
    """The header of a DICOM file, None when the file is not DICOM; DicomError when it is damaged."""
    try:
        _check_inflated_size(path)
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        if not _looks_like_raw_dataset(path):
            return None
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:  # noqa: BLE001 - a stray binary file, not DICOM
            return None
        return ds if "SOPClassUID" in ds and "SeriesInstanceUID" in ds else None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged files
        raise DicomError(f"{path}: a damaged DICOM file, its header cannot be read ({type(exc).__name__}: {exc}). "
                         f"Remove it from the folder or export the series again.") from exc


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _check_header(path: Path, ds: Dataset) -> None:
    """Fail on a DICOM image file whose header was cut short (it lacks the attributes every image has)."""
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID") if not _text(ds, k)]
    if missing:
        raise DicomError(f"{path}: a damaged or incomplete DICOM file (no {', '.join(missing)}). "
                         f"Remove it from the folder or export the series again.")


def discover_series(folder: str | Path) -> list[SeriesInfo]:
    """Every DICOM series under ``folder`` (subfolders included), grouped by SeriesInstanceUID.

    Files that are not DICOM are skipped; a DICOM file that cannot be read raises DicomError.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomError(f"{folder}: not a folder. Give the folder that holds the CT series' DICOM files.")
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            ds = _read_header(path)
            if ds is None:
                continue
            media_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
            if media_class == MEDIA_STORAGE_DIRECTORY or name.upper() == "DICOMDIR":
                continue
            _check_header(path, ds)
            groups.setdefault(_text(ds, "SeriesInstanceUID"), []).append((path, ds))
    found = []
    for uid, members in groups.items():
        first = members[0][1]
        found.append(SeriesInfo(
            series_uid=uid, modality=_text(first, "Modality").upper(), description=_text(first, "SeriesDescription"),
            study_uid=_text(first, "StudyInstanceUID"), sop_class_uid=_text(first, "SOPClassUID"),
            files=tuple(p for p, _ in members),
            patients=tuple(dict.fromkeys(Patient.of(ds) for _, ds in members)),
            frame_of_reference_uid=_text(first, "FrameOfReferenceUID")))
    found.sort(key=lambda s: (s.modality != "CT", -s.slice_count, s.series_uid))
    return found


def study_case_id(study_uid: str) -> str:
    """The case id of a DICOM study: ``study-`` and 16 hex digits of its UID's sha256, as the DICOM node names
    its jobs. Derived from the study, not the patient, so file names and messages carry no patient ID."""
    import hashlib

    return "study-" + hashlib.sha256(study_uid.strip().encode()).hexdigest()[:16]


def series_case_id(folder: str | Path, series_uid: str | None = None) -> str | None:
    """The case id of the series in a DICOM folder (the first file's, or the ``series_uid`` one's), from its study
    (``study_case_id``); None when no such file or no StudyInstanceUID is found. Reads headers until one matches."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            ds = _read_header(Path(root) / name)
            if ds is None or (series_uid and _text(ds, "SeriesInstanceUID") != series_uid.strip()):
                continue
            study = _text(ds, "StudyInstanceUID")
            return study_case_id(study) if study else None
    return None


def _listing(series: Sequence[SeriesInfo]) -> str:
    return "\n  ".join(s.describe() for s in series)


def choose_ct_series(folder: str | Path, series: Sequence[SeriesInfo], series_uid: str | None = None) -> SeriesInfo:
    """The CT series to read: the one asked for, or the only CT series of the folder."""
    folder = Path(folder)
    if not series:
        raise DicomError(f"{folder}: no DICOM files found (subfolders searched). Give the folder that holds the "
                         f"CT series, exported from the PACS or planning system as DICOM.")
    cts = [s for s in series if s.modality == "CT"]
    if series_uid:
        picked = [s for s in series if s.series_uid == series_uid.strip()]
        if not picked:
            raise DicomError(f"{folder}: no series with SeriesInstanceUID {series_uid}. Series found:\n  "
                             f"{_listing(series)}")
        if picked[0].modality != "CT":
            raise DicomError(f"{folder}: series {series_uid} is {picked[0].modality or 'of no modality'}, not CT. "
                             f"CT series found:\n  {_listing(cts) if cts else '(none)'}")
        return picked[0]
    if not cts:
        raise DicomError(f"{folder}: no CT series (Modality CT) found. Series found:\n  {_listing(series)}\n"
                         f"Give the folder of the planning CT.")
    if len(cts) > 1:
        raise DicomError(f"{folder}: {len(cts)} CT series found; choose one with --ct-series UID "
                         f"(series_uid=...):\n  {_listing(cts)}")
    return cts[0]


# --------------------------------------------------------------------------------------------
# Reading one CT series
# --------------------------------------------------------------------------------------------


def _floats(ds: Dataset, keyword: str, count: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.size != count or not np.all(np.isfinite(arr)):
        raise DicomError(f"{path}: {keyword} is missing or not {count} numbers; the slice cannot be placed in "
                         f"space. Export the series again from the scanner or PACS.")
    return arr


def _check_transfer_syntax(path: Path, ds: Dataset) -> str:
    """The file's transfer syntax; DicomError when no installed pixel-data plugin can decode it."""
    uid = UID(str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "1.2.840.10008.1.2"))
    if not uid.is_transfer_syntax:
        raise DicomError(f"{path}: unknown transfer syntax {uid}; pydicom cannot read its pixel data. Export the "
                         f"CT uncompressed (Explicit VR Little Endian).")
    if not uid.is_compressed:
        return str(uid)
    problem = decoder_problem(uid)
    if problem == "unsupported":
        raise DicomError(f"{path}: pixel data in the transfer syntax {uid.name} ({uid}), which pydicom cannot "
                         f"decode. Export the CT uncompressed (Explicit VR Little Endian).")
    if problem:
        raise DicomError(f"{path}: pixel data in the transfer syntax {uid.name} ({uid}), and no installed "
                         f"pixel-data plugin decodes it ({problem}). Install python-gdcm (a dependency of "
                         f"segrap-segmenter) or export the CT uncompressed (Explicit VR Little Endian).")
    return str(uid)


def _pixels(path: Path, ds: Dataset) -> np.ndarray:
    """Stored pixel values of one single-frame slice (rows, columns)."""
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise many types for damaged data
        raise DicomError(f"{path}: the pixel data cannot be decoded ({type(exc).__name__}: {exc}). The file is "
                         f"damaged or truncated; export the series again.") from exc
    if arr.shape != (int(ds.Rows), int(ds.Columns)):
        raise DicomError(f"{path}: pixel data of shape {arr.shape}, expected one {ds.Rows} x {ds.Columns} frame.")
    return arr


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Give a dataset read without file meta the transfer syntax it was encoded in, so its pixels decode."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    if meta is None:
        ds.file_meta = meta = pydicom.dataset.FileMetaDataset()
    implicit, little = original_encoding(ds)
    if implicit is not False:
        meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian if little is not False else \
            pydicom.uid.ExplicitVRBigEndian


@dataclass
class _Slice:
    path: Path
    ds: Dataset
    iop: np.ndarray
    ipp: np.ndarray
    distance: float = 0.0


def _load_slices(info: SeriesInfo, pixels: bool = True) -> tuple[list[_Slice], list[str]]:
    """Read every file of the series (with its pixel data unless not asked); localizers are left out (noted)."""
    slices, notes, localizers, voxels = [], [], 0, 0
    for path in info.files:
        try:  # discovery accepted it; force admits files without preamble
            _check_inflated_size(path)  # pydicom inflates a deflated file whole, headers-only reads too
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=not pixels)
        except Exception as exc:  # noqa: BLE001
            raise DicomError(f"{path}: a damaged DICOM file ({type(exc).__name__}: {exc}). Remove it or export "
                             f"the series again.") from exc
        _ensure_transfer_syntax(ds)
        if "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]:
            localizers += 1
            continue
        if _text(ds, "SOPClassUID") != CT_IMAGE_STORAGE or int(ds.get("NumberOfFrames", 1) or 1) > 1:
            kind = "Enhanced (multi-frame) CT" if _text(ds, "SOPClassUID") == ENHANCED_CT_STORAGE else \
                f"SOP class {_text(ds, 'SOPClassUID')}"
            raise DicomError(f"{path}: {kind} is not supported; the series must be single-frame CT Image Storage "
                             f"({CT_IMAGE_STORAGE}). Export it as classic CT images.")
        if pixels and "PixelData" not in ds:
            raise DicomError(f"{path}: a CT image without pixel data; the file is damaged or truncated.")
        # the declared size, before any pixel data is decoded: one slice, then the series so far
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        voxels += rows * columns
        check_size((columns, rows, len(slices) + 1), f"{path}: series {info.series_uid}", DicomError)
        if voxels > max_voxels():
            raise DicomError(f"{path}: series {info.series_uid} declares {voxels:,} voxels in its first "
                             f"{len(slices) + 1} images, over the limit of {max_voxels():,} (SEGRAP_MAX_VOXELS).")
        slices.append(_Slice(path, ds, _floats(ds, "ImageOrientationPatient", 6, path),
                             _floats(ds, "ImagePositionPatient", 3, path)))
    if localizers:
        notes.append(f"{localizers} localizer image(s) of the series were left out")
    return slices, notes


def _check_uniform(folder: Path, slices: list[_Slice]) -> None:
    """One orientation, one frame of reference, one image size and pixel spacing across the series."""
    first = slices[0]
    for s in slices[1:]:
        if np.max(np.abs(s.iop - first.iop)) > ORIENTATION_TOLERANCE:
            raise DicomError(
                f"{folder}: mixed slice orientations in series {_text(first.ds, 'SeriesInstanceUID')}: "
                f"{first.path.name} has ImageOrientationPatient {np.round(first.iop, 5).tolist()}, "
                f"{s.path.name} has {np.round(s.iop, 5).tolist()}. Remove the odd images (a localizer or a "
                f"reformat) or choose another series.")
    one_patient([(Patient.of(s.ds), s.path.name) for s in slices],
                f"{folder}: series {_text(first.ds, 'SeriesInstanceUID')}")
    frames = Counter(_text(s.ds, "FrameOfReferenceUID") for s in slices)
    if "" in frames and len(frames) > 1:
        bad = next(s for s in slices if not _text(s.ds, "FrameOfReferenceUID"))
        raise DicomError(f"{bad.path}: no FrameOfReferenceUID, while other slices of the series have one. Export "
                         f"the series again from the scanner or PACS.")
    if len(frames) > 1:
        listing = ", ".join(f"{uid} ({n} slices)" for uid, n in frames.most_common())
        raise DicomError(f"{folder}: the series mixes frames of reference: {listing}. One CT series must have one "
                         f"frame of reference; choose the right series or export it again.")
    for keyword in ("Rows", "Columns"):
        values = Counter(int(s.ds.get(keyword, 0) or 0) for s in slices)
        if len(values) > 1:
            raise DicomError(f"{folder}: slices of different {keyword} in one series ({dict(values)}).")
    check_spacing(_floats(first.ds, "PixelSpacing", 2, first.path), f"{first.path}: PixelSpacing", DicomError,
                  ("rows", "columns"))
    spacing = [tuple(np.round(_floats(s.ds, "PixelSpacing", 2, s.path), 6)) for s in slices]
    if len(set(spacing)) > 1:
        raise DicomError(f"{folder}: slices of different PixelSpacing in one series ({sorted(set(spacing))}).")
    row, col = first.iop[:3], first.iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise DicomError(f"{first.path}: ImageOrientationPatient {first.iop.tolist()} is not two orthogonal unit "
                         f"vectors.")


def _sort_and_check_spacing(folder: Path, slices: list[_Slice], normal: np.ndarray) -> float:
    """Sort slices along the normal; fail on duplicates, gaps and uneven steps; return the mean step (mm)."""
    for s in slices:
        s.distance = float(s.ipp @ normal)
    slices.sort(key=lambda s: s.distance)
    if len(slices) < 2:
        raise DicomError(f"{folder}: the CT series has {len(slices)} image(s); a 3D CT needs at least two slices.")
    d = np.array([s.distance for s in slices])
    steps = np.diff(d)
    for k in np.flatnonzero(steps < POSITION_TOLERANCE_MM):
        a, b = slices[k], slices[k + 1]
        same = _text(a.ds, "SOPInstanceUID") == _text(b.ds, "SOPInstanceUID")
        what = "the same image (same SOPInstanceUID) twice" if same else "two images at the same position"
        raise DicomError(f"{folder}: duplicate slice: {a.path.name} and {b.path.name} are {what}, at "
                         f"{d[k]:.3f} mm along the slice normal. Remove the duplicate.")
    regular = float(np.median(steps))
    for k, step in enumerate(steps):
        ratio = step / regular
        if ratio > 1.5 and abs(ratio - round(ratio)) < 0.1:
            a, b = slices[k], slices[k + 1]
            raise DicomError(
                f"{folder}: {int(round(ratio)) - 1} slice(s) missing between {a.path.name} ({d[k]:.2f} mm) and "
                f"{b.path.name} ({d[k + 1]:.2f} mm): a gap of {step:.2f} mm where the series steps "
                f"{regular:.2f} mm. Export the complete series.")
    mean = float((d[-1] - d[0]) / (len(d) - 1))
    worst = int(np.argmax(np.abs(steps - mean)))
    if abs(steps[worst] - mean) > max(POSITION_TOLERANCE_MM, SPACING_TOLERANCE * mean):
        a, b = slices[worst], slices[worst + 1]
        raise DicomError(f"{folder}: uneven slice spacing: {a.path.name} to {b.path.name} steps {steps[worst]:.3f} "
                         f"mm, the series averages {mean:.3f} mm. Resample the CT to even spacing or export the "
                         f"original acquisition.")
    return mean


def _hounsfield(slices: list[_Slice]) -> tuple[np.ndarray, str]:
    """The (z, y, x) volume in HU (RescaleSlope/Intercept per slice) and the transfer syntax used."""
    syntaxes = {_check_transfer_syntax(s.path, s.ds) for s in slices}
    stored = []
    slopes, intercepts = [], []
    for s in slices:
        if int(s.ds.get("SamplesPerPixel", 1) or 1) != 1 or not _text(s.ds, "PhotometricInterpretation").startswith(
                "MONOCHROME"):
            raise DicomError(f"{s.path}: a CT image must be one grey channel (MONOCHROME2), found "
                             f"{_text(s.ds, 'PhotometricInterpretation')} with {s.ds.get('SamplesPerPixel')} samples.")
        stored.append(_pixels(s.path, s.ds))
        slopes.append(float(s.ds.get("RescaleSlope", 1.0) or 1.0))
        intercepts.append(float(s.ds.get("RescaleIntercept", 0.0) or 0.0))
    slope, intercept = np.array(slopes), np.array(intercepts)
    integral = np.all(slope == 1.0) and np.all(intercept == np.round(intercept))
    volume = np.stack(stored)
    if integral:
        hu = volume.astype(np.int32) + intercept.astype(np.int32)[:, None, None]
        if hu.min() >= -32768 and hu.max() <= 32767:
            return hu.astype(np.int16), ",".join(sorted(syntaxes))
    hu = volume.astype(np.float32) * slope.astype(np.float32)[:, None, None]
    hu += intercept.astype(np.float32)[:, None, None]
    return hu, ",".join(sorted(syntaxes))


def _untilt(folder: Path, slices: list[_Slice], hu: np.ndarray, row: np.ndarray, col: np.ndarray,
            spacing_xy: tuple[float, float], notes: list[str]) -> np.ndarray:
    """Shift each slice in-plane onto the first slice's footprint when the positions are sheared (gantry tilt).

    The slice planes themselves do not move, so contours drawn on the result still lie on the
    original slices and may reference them.
    """
    origin = slices[0].ipp
    offsets = np.array([[(s.ipp - origin) @ row, (s.ipp - origin) @ col] for s in slices])  # mm along row, col
    if np.max(np.abs(offsets)) <= POSITION_TOLERANCE_MM:
        return hu
    from scipy import ndimage

    span = slices[-1].distance - slices[0].distance
    shear = np.linalg.norm(offsets[-1]) / span if span > 0 else 0.0
    angle = float(np.degrees(np.arctan(shear)))
    fill = float(hu.min())
    out = np.empty(hu.shape, dtype=np.float32)
    for k in range(len(slices)):
        shift = (offsets[k, 1] / spacing_xy[1], offsets[k, 0] / spacing_xy[0])  # rows, columns (pixels)
        out[k] = ndimage.shift(hu[k].astype(np.float32), shift, order=1, mode="constant", cval=fill)
    note = (f"gantry tilt of {angle:.1f} degrees (slice positions sheared up to {np.max(np.abs(offsets)):.1f} mm "
            f"in-plane): each slice was shifted in-plane onto an untilted grid with linear interpolation; the slice "
            f"planes are unchanged")
    notes.append(note)
    log.info("%s: %s", folder, note)
    if np.issubdtype(hu.dtype, np.integer):
        return np.round(out).astype(hu.dtype)
    return out


def _without_pixels(ds: Dataset) -> Dataset:
    """A slice's attributes without its pixel data (the series' header), from the data set already read."""
    header = Dataset({tag: ds[tag] for tag in ds.keys() if tag != PIXEL_DATA_TAG})
    if getattr(ds, "file_meta", None) is not None:
        header.file_meta = ds.file_meta
    return header


def read_ct_series(folder: str | Path, series_uid: str | None = None, *, pixels: bool = True,
                   info: SeriesInfo | None = None) -> DicomVolume:
    """Read the CT series in ``folder`` (or the one ``series_uid`` names) into HU with its geometry and UIDs.

    ``info``: the series as ``choose_ct_series`` already picked it from this folder's ``discover_series`` (a caller
    that checked the headers before, as the pipeline does), so the headers are not read a second time for discovery.

    ``pixels=False`` reads the headers only (no pixel data is decoded, so any transfer syntax
    works): the image then has the series' grid with zero voxels, which is all that placing
    contours on it needs. A series without FrameOfReferenceUID is read (noted); only an
    RTSTRUCT on it is refused.
    """
    folder = Path(folder)
    if info is None:
        info = choose_ct_series(folder, discover_series(folder), series_uid)
    slices, notes = _load_slices(info, pixels)
    if not slices:
        raise DicomError(f"{folder}: series {info.series_uid} holds no axial CT images (only localizers).")
    _check_uniform(folder, slices)
    iop = slices[0].iop
    row, col = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    step = _sort_and_check_spacing(folder, slices, normal)
    check_spacing([step], f"{folder}: series {info.series_uid}: the step between slices "
                  f"({slices[0].path.name} to {slices[-1].path.name})", DicomError, ("the slice normal",))
    row_spacing, col_spacing = _floats(slices[0].ds, "PixelSpacing", 2, slices[0].path)
    # PixelSpacing is (between rows, between columns): x (along a row) steps by the column spacing
    spacing_xy = (float(col_spacing), float(row_spacing))
    if pixels:
        hu, syntax = _hounsfield(slices)
        hu = _untilt(folder, slices, hu, row, col, spacing_xy, notes)
        image = sitk.GetImageFromArray(hu)
    else:  # the grid only: the tilt correction moves voxels, not the grid
        syntax = ",".join(sorted({str(getattr(getattr(s.ds, "file_meta", None), "TransferSyntaxUID", "") or "")
                                  for s in slices}))
        image = sitk.Image([int(slices[0].ds.Columns), int(slices[0].ds.Rows), len(slices)], sitk.sitkUInt8)
    image.SetSpacing((spacing_xy[0], spacing_xy[1], step))
    image.SetOrigin(tuple(float(v) for v in slices[0].ipp))
    image.SetDirection(tuple(float(v) for v in np.column_stack([row, col, normal]).ravel()))

    first = slices[0].ds
    header = _without_pixels(first)
    series = CtSeries(
        folder=folder, study_uid=_text(first, "StudyInstanceUID"), series_uid=info.series_uid,
        frame_of_reference_uid=_text(first, "FrameOfReferenceUID"), description=info.description,
        slices=tuple(CtSlice(s.path, _text(s.ds, "SOPClassUID"), _text(s.ds, "SOPInstanceUID"),
                             tuple(float(v) for v in s.ipp)) for s in slices),
        header=header, transfer_syntax=syntax, patient=Patient.of(first))
    if not series.study_uid:
        raise DicomError(f"{slices[0].path}: no StudyInstanceUID; export the series again from the scanner or PACS.")
    if not series.frame_of_reference_uid:
        notes.append("the CT series has no FrameOfReferenceUID (an RTSTRUCT cannot reference it)")
    ny, nx = image.GetSize()[1], image.GetSize()[0]
    notes.insert(0, f"CT series {info.series_uid}: {len(slices)} slices of {ny} x {nx}, "
                    f"spacing {spacing_xy[0]:.4g} x {spacing_xy[1]:.4g} x {step:.4g} mm, sorted along the slice "
                    f"normal" + (", rescaled to HU" if pixels else " (headers only)"))
    return DicomVolume(image=image, series=series, notes=notes)


__all__ = ["CtSeries", "CtSlice", "DicomVolume", "Patient", "SeriesInfo", "choose_ct_series", "discover_series",
           "read_ct_series"]
