"""SegRap release layout -> nnU-Net v2 raw dataset, for Task 1 (54 classes) or Task 2 (GTVp, GTVnd).

Task 1 labels are built with ``structures.decompose`` from the 45 per-OAR files and cross-checked
against the organisers' one-hot Task001 map where it exists; conflicts are reported per case.
Every case is written in one orientation (``ORIENTATION``, "LPS": index x runs to the patient's left,
y to the back, z to the head), whatever the release stored: nnU-Net feeds the voxel array as
stored, so a case stored right-to-left would teach the network a mirrored patient. Reorienting is
an exact permutation/flip of axes (``sitk.DICOMOrient``, no interpolation); the orientation goes
into dataset.json (``ORIENTATION_KEY``), where the trainers find the left-right axis and bundle
export finds what to write into the manifest. Images already in that orientation are hard-linked
where the filesystem allows (else copied). A case whose outputs are already there in that
orientation is skipped, so an interrupted conversion resumes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..anatomy import structures as S
from ..arrays import uint8_image
from ..errors import DecompositionConflictError, InputError
from ..formats.imaging import check_file_complete
from ..inference.bundles import DATASET_ORIENTATION_KEY

TASK_INPUTS = {"oar": "image.nii.gz", "gtv": "image_contrast.nii.gz"}
ORIENTATION = "LPS"  # the orientation cases are written in (DICOM letters of the index axes x, y, z)
ORIENTATION_KEY = DATASET_ORIENTATION_KEY  # dataset.json key recording it
# nnU-Net applies its CT normalisation to channels named "CT"
CHANNEL_NAMES = {"oar": {"0": "CT"}, "gtv": {"0": "CT"}}


@dataclass
class CaseReport:
    """What converting one case found."""

    case_id: str
    skipped: bool = False
    conflicts: list[str] = field(default_factory=list)
    onehot_checked: bool = False
    onehot_differing_voxels: int = 0
    refused: str = ""  # why the case was left out of the dataset (DICOM exports), empty when converted
    unmapped_rois: list[str] = field(default_factory=list)  # ROI names matching no catalogue structure
    notes: list[str] = field(default_factory=list)


@dataclass
class ConversionReport:
    """The dataset written and what each case reported."""

    dataset_dir: Path
    task: str
    cases: list[CaseReport]

    def summary(self) -> str:
        """A few lines for the terminal."""
        conflicted = [c for c in self.cases if c.conflicts]
        differing = [c for c in self.cases if c.onehot_differing_voxels]
        lines = [f"{self.dataset_dir}: {len(self.cases)} cases ({sum(c.skipped for c in self.cases)} already done)"]
        lines += [f"  {c.case_id}: {len(c.conflicts)} conflicting combinations, first: {c.conflicts[0]}" for c in conflicted]
        lines += [f"  {c.case_id}: {c.onehot_differing_voxels} voxels differ from the one-hot map" for c in differing]
        lines += [f"  {c.case_id}: REFUSED: {c.refused}" for c in self.cases if c.refused]
        lines += [f"  {c.case_id}: ROI names matching no structure (ignored): {', '.join(c.unmapped_rois)}"
                  for c in self.cases if c.unmapped_rois]
        lines += [f"  {c.case_id}: {note}" for c in self.cases for note in c.notes]
        return "\n".join(lines)


def find_cases(segrap_root: str | Path) -> tuple[Path, list[Path]]:
    """The folder holding the case folders (``segrap_*`` or any folder with ``image.nii.gz``) and the cases."""
    root = Path(segrap_root)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder. Point --segrap-root at the SegRap release (the folder of case folders).")

    def cases_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and (p.name.startswith("segrap_") or (p / "image.nii.gz").exists()))

    direct = cases_in(root)
    if direct:
        return root, direct
    candidates = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.endswith("_OneHot_Labels")]
    found = [(d, cases_in(d)) for d in candidates]
    found = [(d, c) for d, c in found if c]
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputError(f"{root}: no case folders (segrap_XXXX with image.nii.gz) found here or one level down.")
    raise InputError(f"{root}: several folders hold cases ({', '.join(d.name for d, _ in found)}); "
                     f"point --segrap-root at one of them.")


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.part")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _require(path: Path) -> Path:
    if not path.is_file():
        raise InputError(f"{path}: missing. Every case needs this file for the conversion; restore it or "
                         f"remove the case folder {path.parent.name} from the release.")
    return path


def _read_mask(path: Path, reference: sitk.Image) -> np.ndarray:
    check_file_complete(_require(path), "Mask")
    img = sitk.ReadImage(str(path))
    if img.GetSize() != reference.GetSize() or not np.allclose(img.GetSpacing(), reference.GetSpacing(), atol=1e-4) \
            or not np.allclose(img.GetOrigin(), reference.GetOrigin(), atol=1e-3):
        raise InputError(f"{path}: its grid ({img.GetSize()}, spacing {img.GetSpacing()}) differs from the case's "
                         f"image ({reference.GetSize()}, spacing {reference.GetSpacing()}).")
    return sitk.GetArrayFromImage(img) > 0


def orientation_of(image: sitk.Image) -> str:
    """The DICOM letters of an image's index axes (the nearest ones for an oblique image), e.g. "LPS"."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def reoriented(image: sitk.Image, orientation: str) -> sitk.Image:
    """``image`` stored in ``orientation``: its axes permuted and flipped (no interpolation), same anatomy."""
    return image if orientation_of(image) == orientation else sitk.DICOMOrient(image, orientation)


def dataset_orientation(dataset_json: dict) -> str | None:
    """The orientation a converted dataset's cases are stored in; None for datasets converted without one."""
    return dataset_json.get(ORIENTATION_KEY)


def _stored_in(path: Path, orientation: str) -> bool:
    """True when the image file at ``path`` exists and is stored in ``orientation`` (header read only)."""
    if not path.exists():
        return False
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(reader.GetDirection()) == orientation


def _case_done(image_out: Path, label_out: Path, orientation: str) -> bool:
    """A case converted before (both files there, in the dataset's orientation): skipped when resuming."""
    return _stored_in(image_out, orientation) and _stored_in(label_out, orientation)


def _write_image(image: sitk.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.part.nii.gz")
    sitk.WriteImage(image, str(tmp), useCompression=True)
    os.replace(tmp, path)


def _write_label(labels: np.ndarray, reference: sitk.Image, path: Path, orientation: str | None = None) -> None:
    """Write a label map on ``reference``'s grid, reoriented to ``orientation`` when given."""
    img = uint8_image(labels, reference)
    _write_image(reoriented(img, orientation) if orientation else img, path)


def write_training_case(image: sitk.Image, labels: np.ndarray, images: Path, labels_dir: Path, case_id: str,
                        orientation: str = ORIENTATION) -> None:
    """Write one case's image, then its label map (on the image's grid) into a raw dataset, in ``orientation``;
    each file appears complete (temp name, then rename), so a case whose label is there is whole."""
    write_case_image(image, None, images / f"{case_id}_0000.nii.gz", orientation)
    _write_label(labels, image, labels_dir / f"{case_id}.nii.gz", orientation)


def write_case_image(image: sitk.Image, source: Path | None, path: Path, orientation: str) -> None:
    """Write a case's image in ``orientation``: the ``source`` file linked when it already is, else rewritten."""
    if source is not None and orientation_of(image) == orientation:
        _link_or_copy(source, path)
    else:
        _write_image(reoriented(image, orientation), path)


def _oar_labels(case_dir: Path, reference: sitk.Image, onehot: Path | None, on_conflict: str,
                report: CaseReport) -> np.ndarray:
    masks = {name: _read_mask(case_dir / f"{name}.nii.gz", reference) for name in S.OAR_NAMES}
    labels = oar_labels_from_masks(masks, on_conflict, report, case_dir)
    if onehot is not None and onehot.is_file():
        official = sitk.GetArrayFromImage(sitk.ReadImage(str(onehot)))
        if official.shape != labels.shape:
            raise InputError(f"{onehot}: shape {official.shape} differs from the case's image {labels.shape}.")
        report.onehot_checked = True
        report.onehot_differing_voxels = int(np.count_nonzero(official != labels))
    return labels


def oar_labels_from_masks(masks, on_conflict: str, report: CaseReport, where: Path) -> np.ndarray:
    """The 54-class labels of the 45 OAR masks; conflicts go to the report (or raise, naming the case)."""
    try:
        labels, conflicts = S.decompose_with_conflicts(masks, on_conflict=on_conflict)
    except DecompositionConflictError as exc:
        raise DecompositionConflictError(f"{where}: {exc}\n(segrap train convert: --on-conflict nearest|background; "
                                         f"each case's conflicts then go to conversion_report.json)",
                                         exc.conflicts) from None
    report.conflicts = [c.describe() for c in conflicts]
    return labels


def _gtv_labels(case_dir: Path, reference: sitk.Image, report: CaseReport) -> np.ndarray:
    gtvp = _read_mask(case_dir / "GTVp.nii.gz", reference)
    gtvnd = _read_mask(case_dir / "GTVnd.nii.gz", reference)
    return gtv_labels_from_masks(gtvp, gtvnd, report)


def gtv_labels_from_masks(gtvp: np.ndarray, gtvnd: np.ndarray, report: CaseReport) -> np.ndarray:
    """Task 2 labels: GTVp = 1, GTVnd = 2 (GTVnd where both are drawn, reported)."""
    both = int(np.count_nonzero(gtvp & gtvnd))
    if both:
        report.conflicts = [f"GTVp + GTVnd: {both} voxels labelled as both; given GTVnd (2)"]
    labels = np.zeros(gtvp.shape, np.uint8)
    labels[gtvp] = 1
    labels[gtvnd] = 2
    return labels


def dataset_folder_name(dataset_id: int, task: str) -> str:
    """nnU-Net's DatasetXXX_Name folder name for a task."""
    if not 1 <= dataset_id <= 999:
        raise InputError(f"--dataset-id must be 1..999 (nnU-Net's three digits), got {dataset_id}.")
    return f"Dataset{dataset_id:03d}_SegRap{'OAR' if task == 'oar' else 'GTV'}"


def convert_release(segrap_root: str | Path, nnunet_raw: str | Path, task: str, dataset_id: int,
                    on_conflict: str = "error", orientation: str = ORIENTATION) -> ConversionReport:
    """Convert every case under ``segrap_root`` into ``nnunet_raw/DatasetXXX_SegRap{OAR,GTV}``, in ``orientation``."""
    if task not in TASK_INPUTS:
        raise InputError(f"--task must be 'oar' or 'gtv', got {task!r}.")
    cases_dir, cases = find_cases(segrap_root)
    onehot_dir = cases_dir.parent / f"{cases_dir.name}_OneHot_Labels" / "Task001"
    out, images, labels_dir = dataset_dirs(nnunet_raw, task, dataset_id)

    reports: list[CaseReport] = []
    for case_dir in cases:
        case_id = case_dir.name
        report = CaseReport(case_id)
        image_out, label_out = images / f"{case_id}_0000.nii.gz", labels_dir / f"{case_id}.nii.gz"
        if _case_done(image_out, label_out, orientation):
            report.skipped = True
            reports.append(report)
            continue
        source = _require(case_dir / TASK_INPUTS[task])
        check_file_complete(source, "Image")
        reference = sitk.ReadImage(str(source))
        if task == "oar":
            labels = _oar_labels(case_dir, reference, onehot_dir / f"{case_id}.nii.gz", on_conflict, report)
        else:
            labels = _gtv_labels(case_dir, reference, report)
        _write_label(labels, reference, label_out, orientation)
        write_case_image(reference, source, image_out, orientation)
        reports.append(report)
    return finish_dataset(out, task, reports, orientation)


def dataset_dirs(nnunet_raw: str | Path, task: str, dataset_id: int) -> tuple[Path, Path, Path]:
    """The dataset folder and its imagesTr and labelsTr folders (created)."""
    if task not in TASK_INPUTS:
        raise InputError(f"--task must be 'oar' or 'gtv', got {task!r}.")
    out = Path(nnunet_raw) / dataset_folder_name(dataset_id, task)
    images, labels_dir = out / "imagesTr", out / "labelsTr"
    images.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    return out, images, labels_dir


def finish_dataset(out: Path, task: str, reports: list[CaseReport], orientation: str = ORIENTATION) -> ConversionReport:
    """Write dataset.json (with the cases' orientation) for the cases present; merge the case reports into
    conversion_report.json."""
    labels_dir = out / "labelsTr"
    done = sorted(p.name[: -len(".nii.gz")] for p in labels_dir.glob("*.nii.gz") if not p.name.startswith("."))
    dataset = {
        "name": out.name,
        "description": f"SegRap 2023 Task {'1 (45 OARs as 54 classes)' if task == 'oar' else '2 (GTVp, GTVnd)'} "
                       f"converted by SegRapSegmenterLib",
        "channel_names": CHANNEL_NAMES[task],
        "labels": S.class_labels() if task == "oar" else S.gtv_class_labels(),
        "numTraining": len(done),
        "file_ending": ".nii.gz",
        ORIENTATION_KEY: orientation,
    }
    (out / "dataset.json").write_text(json.dumps(dataset, indent=1))
    report_path = out / "conversion_report.json"
    previous = json.loads(report_path.read_text()) if report_path.exists() else {}
    for r in reports:
        if not r.skipped:
            previous[r.case_id] = asdict(r)
    report_path.write_text(json.dumps(previous, indent=1))
    return ConversionReport(out, task, reports)
