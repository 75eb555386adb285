"""Whose images these are: the patient, study and frame of reference of the CT and the contrast CT, and the
rule for a pair.

A contrast CT of another patient would put that patient's tumour into this patient's structure set, so
such a pair is refused before any model runs. A contrast CT of another study or frame of reference is
allowed (a diagnostic scan taken days apart is common), but never silently: without registration it is
resampled as if both shared one patient space, which is only right when the two were aligned beforehand.
Image files (NIfTI, NRRD, MetaImage) carry no patient identity; the record says it was not checked.
The record keeps UIDs only: the patient's values stay in the DICOM files (and in the error that
refuses a pair, so that the user can tell which file is wrong).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom

from ..errors import DicomError, InputError
from .dicom import Patient, SeriesInfo, choose_ct_series, discover_series, one_patient

PATIENT_ATTRIBUTES = ("PatientID", "PatientName", "PatientBirthDate")


@dataclass(frozen=True)
class InputIdentity:
    """The patient and the UIDs of one DICOM input."""

    path: str
    patient: Patient
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str

    def record(self) -> dict:
        """The provenance's entry: UIDs, and which identifying attributes the files carry (not their values)."""
        carried = [k for k, v in zip(PATIENT_ATTRIBUTES, (self.patient.id, self.patient.name, self.patient.birth_date))
                   if v]
        return {"kind": "dicom", "study_uid": self.study_uid, "series_uid": self.series_uid,
                "frame_of_reference_uid": self.frame_of_reference_uid, "patient_attributes": carried}


def identity_of_series(path: str | Path, info: SeriesInfo) -> InputIdentity:
    """The identity of a discovered series (headers only: nothing is decoded)."""
    patient = one_patient([(p, "") for p in info.patients], f"{path}: series {info.series_uid}")
    return InputIdentity(str(path), patient, info.study_uid, info.series_uid, info.frame_of_reference_uid)


def identity_of_folder(path: str | Path, series_uid: str | None = None) -> InputIdentity:
    """The identity of the CT series that ``read_volume`` would read from a DICOM folder."""
    info = choose_ct_series(path, discover_series(path), series_uid)
    return identity_of_series(path, info)


IDENTITY_TAGS = ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "SeriesInstanceUID",
                 "FrameOfReferenceUID")


def identity_of_files(where: str, files: list[str | Path]) -> InputIdentity:
    """The identity of an image made from these DICOM files (Slicer's volume: the files its DICOM database names),
    from their headers only; DicomError when the files name two patients or one cannot be read."""
    headers = []
    for path in files:
        try:
            headers.append((pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(IDENTITY_TAGS)),
                            Path(path).name))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise DicomError(f"{where}: cannot read the DICOM header of {path} ({exc}); import the series into the "
                             f"DICOM database again.") from exc
    if not headers:
        raise DicomError(f"{where}: no DICOM file was given for it.")
    patient = one_patient([(Patient.of(ds), name) for ds, name in headers], where)
    first = headers[0][0]
    return InputIdentity(where, patient, *(str(first.get(k, "") or "").strip() for k in IDENTITY_TAGS[3:]))


IMAGE_FILES = "image files (NIfTI, NRRD or MetaImage), which carry no patient identity"


def check_pair(ct: InputIdentity | None, contrast: InputIdentity | None, *, ct_path: str | None,
               contrast_path: str | None, register: bool, no_identity: str = IMAGE_FILES,
               patient_values: bool = True) -> tuple[dict, list[str]]:
    """The identity record of the inputs and the warnings it raises; InputError for two patients.

    ``ct``/``contrast`` are None for an input without identity (``no_identity`` says why: by default an
    image file); a path of None means that input was not given. ``patient_values`` False keeps the
    differing values out of the error (the node, whose errors reach its audit log).
    """
    record: dict = {"ct": ct.record() if ct else ({"kind": "file"} if ct_path else None),
                    "contrast_ct": contrast.record() if contrast else ({"kind": "file"} if contrast_path else None)}
    warnings: list[str] = []
    given = [p for p in (ct_path, contrast_path) if p]
    files = [p for p, ident in ((ct_path, ct), (contrast_path, contrast)) if p and ident is None]
    if files:
        record["patient"] = f"not checked: {' and '.join(files)}: {no_identity}"
        return record, warnings
    if len(given) < 2:
        record["patient"] = "one input: nothing to compare"
        return record, warnings
    differ = ct.patient.differences(contrast.patient, values=patient_values)
    if differ:
        raise InputError(f"The contrast CT {contrast_path} and the CT {ct_path} belong to two patients ({differ}). "
                         f"Nothing was contoured: one patient's tumour volumes must not go into another's structure "
                         f"set. Give the contrast CT of the same patient.")
    compared = [k for k, a, b in zip(PATIENT_ATTRIBUTES, (ct.patient.id, ct.patient.name, ct.patient.birth_date),
                                     (contrast.patient.id, contrast.patient.name, contrast.patient.birth_date)) if a and b]
    if "PatientID" in compared:
        record["patient"] = f"same patient ({', '.join(compared)} compared)"
    else:
        record["patient"] = "not checked: " + ("no PatientID in both CTs" if not compared else
                                               f"no PatientID in both CTs (only {', '.join(compared)} agree)")
        warnings.append(f"The patient of the contrast CT {contrast_path} could not be checked against the CT "
                        f"{ct_path}: PatientID is missing in {'both' if not (ct.patient.id or contrast.patient.id) else 'one'}"
                        f". Make sure both images are of this patient.")
    record["same_study"] = ct.study_uid == contrast.study_uid
    record["same_frame_of_reference"] = bool(ct.frame_of_reference_uid) and (
        ct.frame_of_reference_uid == contrast.frame_of_reference_uid)
    if not (record["same_study"] and record["same_frame_of_reference"]):
        what = []
        if not record["same_study"]:
            what.append(f"another study (StudyInstanceUID {contrast.study_uid}, the CT's {ct.study_uid})")
        if not record["same_frame_of_reference"]:
            what.append(f"another frame of reference (FrameOfReferenceUID {contrast.frame_of_reference_uid or 'none'}"
                        f", the CT's {ct.frame_of_reference_uid or 'none'})")
        if register:
            record["alignment"] = "registered: the two CTs do not share a frame of reference"
        else:
            record["alignment"] = "assumed: resampled without registration although the frames of reference differ"
            warnings.append(f"The contrast CT {contrast_path} is from {' and '.join(what)}: it was put on the CT's grid "
                            f"as if both were aligned in patient space. Check the GTVs against the contrast CT, or run "
                            f"again with --register to align them by rigid registration.")
    return record, warnings


NOT_FROM_DICOM = "not loaded from Slicer's DICOM database, so its patient is not known"


def check_identity_of_files(sources: dict, with_contrast: bool, register: bool,
                            patient_values: bool = True) -> tuple[dict, list[str]]:
    """``check_pair`` for image files a caller wrote from DICOM volumes (Slicer): ``sources`` names, per input
    ("ct", "contrast_ct"), a label and the DICOM files behind it (None: not from DICOM). The worker calls it, so
    that the caller's GUI thread reads no header."""
    def of(key: str):
        source = sources.get(key)
        if not source:
            return None, None
        files = source.get("files")
        return (identity_of_files(source["label"], files) if files else None), source["label"]

    ct, ct_label = of("ct")
    contrast, contrast_label = of("contrast_ct") if with_contrast else (None, None)
    record, warnings = check_pair(ct, contrast, ct_path=ct_label, contrast_path=contrast_label, register=register,
                                  patient_values=patient_values, no_identity=NOT_FROM_DICOM)
    record["checked_in"] = "the worker, on the headers of the DICOM files the caller's database names"
    return record, warnings
