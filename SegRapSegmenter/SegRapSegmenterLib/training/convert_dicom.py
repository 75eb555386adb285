"""An institution's DICOM exports (CT series + RTSTRUCT, one case per folder) -> the same nnU-Net raw dataset.

ROI names are mapped to the catalogue by ``structures.get`` (SegRap, TG-263, display names and
aliases, any case or separator); ROIs that match nothing are listed per case and ignored. The CT
read is the series the structure set references.

Missing structures. Task 1 takes a case only when all 45 OARs are drawn: every voxel of an
organ that was not contoured would be labelled background, and the network would learn to leave
that organ out. Such a case is refused (left out, reason in the report), never guessed. Task 2
needs GTVp; an absent GTVnd is taken as node-negative (empty), and the report says so. For Task 2
export the contrast-enhanced CT with the structure set drawn on it (or registered to it).

Images and label maps are written in the dataset's orientation (``convert.ORIENTATION``, by an
exact permutation/flip of axes), as for the release conversion.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from ..anatomy import structures as S
from ..errors import DicomError
from ..formats.dicom import discover_series, read_ct_series
from ..formats.rtstruct import read_rtstruct
from .convert import (
    ORIENTATION,
    CaseReport,
    ConversionReport,
    _case_done,
    _write_label,
    dataset_dirs,
    finish_dataset,
    gtv_labels_from_masks,
    oar_labels_from_masks,
    write_case_image,
)


def case_id_for(folder_name: str) -> str:
    """An nnU-Net-safe case identifier from a folder name (letters, digits, '-', '_')."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", folder_name).strip("_")
    return cleaned or "case"


def find_dicom_cases(root: str | Path) -> list[Path]:
    """The case folders: each subfolder of ``root`` (not hidden) is one patient's export."""
    root = Path(root)
    if not root.is_dir():
        raise DicomError(f"{root}: not a folder. Point --dicom-root at a folder with one subfolder per case, each "
                         f"holding the CT series and its RTSTRUCT.")
    cases = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not cases:
        raise DicomError(f"{root}: no case subfolders. Put each case's DICOM files (CT series + RTSTRUCT) in a "
                         f"subfolder of its own.")
    return cases


def _referenced_series(rtstruct: Path) -> str | None:
    """The SeriesInstanceUID of the image series a structure set references, if it says."""
    ds = pydicom.dcmread(rtstruct, stop_before_pixels=True)
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                uid = str(series.get("SeriesInstanceUID", "")).strip()
                if uid:
                    return uid
    return None


def _case_masks(case_dir: Path):
    """(CT image, masks by SegRap name or ROI name) of one case folder."""
    series = discover_series(case_dir)
    structure_sets = [s for s in series if s.modality == "RTSTRUCT"]
    files = [f for s in structure_sets for f in s.files]
    if len(files) != 1:
        raise DicomError(f"{case_dir}: expected one RTSTRUCT file, found {len(files)}; keep only the structure set "
                         f"to train from in the case folder.")
    uid = _referenced_series(files[0])
    cts = {s.series_uid for s in series if s.modality == "CT"}
    volume = read_ct_series(case_dir, uid if uid in cts else None)
    return volume.image, read_rtstruct(files[0], volume)


def _nonempty(masks, name: str) -> bool:
    return name in masks and bool(np.any(masks.crop(name)[1]))


def convert_dicom_case(case_dir: Path, task: str, on_conflict: str, report: CaseReport
                       ) -> tuple[sitk.Image, np.ndarray] | None:
    """The image and label map of one case, or None when the case is refused (reason in the report)."""
    image, masks = _case_masks(case_dir)
    report.unmapped_rois = sorted(k for k in masks if k not in S.STRUCTURE_NAMES)
    if task == "oar":
        missing = [n for n in S.OAR_NAMES if not _nonempty(masks, n)]
        if missing:
            report.refused = (f"{len(missing)} of the 45 OARs are not contoured ({', '.join(missing)}); a Task 1 case "
                              f"needs all 45, or the missing organs would be learned as background")
            return None
        crops = {n: masks.crop(n) for n in S.OAR_NAMES}
        labels = oar_labels_from_masks(S.StructureMasks(masks.shape, crops), on_conflict, report, case_dir)
        return image, labels
    if not _nonempty(masks, "GTVp"):
        report.refused = "no GTVp contour; a Task 2 case needs the primary tumour"
        return None
    if not _nonempty(masks, "GTVnd"):
        report.notes.append("no GTVnd contour: taken as node-negative (empty GTVnd)")
    empty = np.zeros(masks.shape, bool)
    gtvnd = masks["GTVnd"] if "GTVnd" in masks else empty
    return image, gtv_labels_from_masks(masks["GTVp"], gtvnd, report)


def convert_dicom(dicom_root: str | Path, nnunet_raw: str | Path, task: str, dataset_id: int,
                  on_conflict: str = "error", orientation: str = ORIENTATION) -> ConversionReport:
    """Convert every case folder under ``dicom_root`` into the task's dataset, stored in ``orientation``;
    refused cases are reported."""
    out, images, labels_dir = dataset_dirs(nnunet_raw, task, dataset_id)
    reports: list[CaseReport] = []
    for case_dir in find_dicom_cases(dicom_root):
        report = CaseReport(case_id_for(case_dir.name))
        image_out = images / f"{report.case_id}_0000.nii.gz"
        label_out = labels_dir / f"{report.case_id}.nii.gz"
        if _case_done(image_out, label_out, orientation):
            report.skipped = True
        else:
            converted = convert_dicom_case(case_dir, task, on_conflict, report)
            if converted is not None:
                image, labels = converted
                _write_label(labels, image, label_out, orientation)
                write_case_image(image, None, image_out, orientation)
        reports.append(report)
    return finish_dataset(out, task, reports, orientation)
