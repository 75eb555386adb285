"""The phantom as DICOM: its CT and contrast CT written as CT Image Storage series, in grid variants.

One study per case holds two series (plain CT, contrast CT) that share one frame of reference.
Tags are those a scanner writes (patient, study, series, equipment, frame of reference, image
plane, image pixel, CT image, VOI LUT, SOP common) with a synthetic patient; UIDs are derived
from the case, seed and variant, so the same call writes the same files. The variants put the
same anatomy on the grids that break naive readers and writers: anisotropic pixels, non-square
images, slices numbered top-down, an oblique orientation and 1024 x 1024 slices.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from .. import __version__
from ..errors import InputError
from ..formats.pydicom_compat import save_file
from .cases import PhantomCase, make_case

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VARIANTS = ("standard", "anisotropic", "nonsquare", "reversed", "oblique", "1024")
_STUDY_DATE = _dt.datetime(2023, 5, 4, 9, 30, 0)  # fixed, so files are reproducible


@dataclass(frozen=True)
class DicomPhantom:
    """Where a phantom's DICOM series were written, their UIDs, and the case on that grid."""

    case: PhantomCase
    root: Path
    ct_dir: Path
    contrast_dir: Path
    study_uid: str
    frame_of_reference_uid: str
    ct_series_uid: str
    contrast_series_uid: str
    variant: str


# --------------------------------------------------------------------------------------------
# Variant grids
# --------------------------------------------------------------------------------------------


def _resample(image: sitk.Image, reference: sitk.Image, nearest: bool, default: float) -> sitk.Image:
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.Resample(image, reference, sitk.Transform(), interp, default, image.GetPixelID())


def _on_grid(case: PhantomCase, size_xyz: tuple[int, int, int], spacing_xyz: tuple[float, float, float]) -> PhantomCase:
    """The case resampled onto a grid of the same direction and centre (CT linear, label maps nearest)."""
    ct = case.ct
    centre = np.array(ct.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ct.GetSize()]))
    direction = np.array(ct.GetDirection()).reshape(3, 3)
    half = (np.array(size_xyz) - 1) * np.array(spacing_xyz) / 2
    ref = sitk.Image([int(v) for v in size_xyz], sitk.sitkUInt8)
    ref.SetSpacing([float(v) for v in spacing_xyz])
    ref.SetDirection(ct.GetDirection())
    ref.SetOrigin(tuple((centre - direction @ half).tolist()))

    def labels(arr: np.ndarray) -> np.ndarray:
        return sitk.GetArrayFromImage(_resample(case.label_image(arr), ref, True, 0))

    new_ct = _resample(ct, ref, False, -1024)
    contrast = case.contrast_ct
    same_grid = contrast.GetSize() == ct.GetSize() and contrast.GetSpacing() == ct.GetSpacing()
    new_contrast = _resample(contrast, ref if same_grid else contrast, False, -1024)
    info = dict(case.info, grid={"size_xyz": list(size_xyz), "spacing_xyz": list(spacing_xyz)})
    return PhantomCase(case.case_id, new_ct, new_contrast, labels(case.labelmap), labels(case.gtv_labelmap), info)


def _slab(case: PhantomCase, slices: int) -> PhantomCase:
    """The ``slices`` central slices of a case (same geometry, shorter extent)."""
    nz = case.ct.GetSize()[2]
    if slices >= nz:
        return case
    start = (nz - slices) // 2
    stop = start + slices
    info = dict(case.info, slab=[start, stop])
    contrast = case.contrast_ct
    if contrast.GetSize() == case.ct.GetSize():
        contrast = contrast[:, :, start:stop]
    return PhantomCase(case.case_id, case.ct[:, :, start:stop], contrast, case.labelmap[start:stop].copy(),
                       case.gtv_labelmap[start:stop].copy(), info)


def variant_case(variant: str, index: int = 0, seed: int = 0, size: str = "small",
                 slices: int | None = None) -> PhantomCase:
    """Phantom case ``index`` on the grid of ``variant``; ``slices`` keeps only that many central slices."""
    if variant not in VARIANTS:
        raise InputError(f"Unknown DICOM phantom variant {variant!r}; choose one of {', '.join(VARIANTS)}.")
    case = make_case(index, seed=seed, size=size, direction="oblique" if variant == "oblique" else "identity")
    if slices is not None:
        case = _slab(case, slices)
    nx, ny, nz = case.ct.GetSize()
    sx, sy, sz = case.ct.GetSpacing()
    fov_x, fov_y = nx * sx, ny * sy
    if variant == "anisotropic":  # square image, rows 1.6 x as far apart as columns
        case = _on_grid(case, (nx, ny, nz), (fov_x * 0.8 / nx, fov_y * 1.25 / ny, sz))
    elif variant == "nonsquare":  # wider than tall, same pixel size
        case = _on_grid(case, (int(round(nx * 1.2)), int(round(ny * 0.85)), nz), (sx, sy, sz))
    elif variant == "1024":
        case = _on_grid(case, (1024, 1024, nz), (fov_x / 1024, fov_y / 1024, sz))
    case.info["variant"] = variant
    return case


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _uid(*parts: object) -> str:
    """A reproducible UID (2.25 form) derived from the parts."""
    return generate_uid(prefix=None, entropy_srcs=["segrap-phantom", *[str(p) for p in parts]])


def _ds_text(value: float) -> str:
    """A DS value (at most 16 characters)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text if len(text) <= 16 else f"{value:.9e}"[:16]


def _slice_dataset(common: dict, image: sitk.Image, k: int, instance: int, sop_uid: str) -> Dataset:
    """One CT Image Storage dataset for slice ``k`` of ``image`` (values already in HU)."""
    ds = Dataset()
    for keyword, value in common.items():
        setattr(ds, keyword, value)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    position = np.array(image.TransformIndexToPhysicalPoint((0, 0, k)))
    sx, sy, sz = image.GetSpacing()
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [_ds_text(v) for v in position]
    ds.ImageOrientationPatient = [_ds_text(v) for v in np.concatenate([direction[:, 0], direction[:, 1]])]
    ds.SliceLocation = _ds_text(float(position @ direction[:, 2]))
    ds.PixelSpacing = [_ds_text(sy), _ds_text(sx)]  # between rows, between columns
    ds.SliceThickness = _ds_text(sz)
    hu = sitk.GetArrayViewFromImage(image)[k]
    stored = np.clip(np.round(hu) + 1024, 0, 4095).astype(np.uint16)
    ds.Rows, ds.Columns = stored.shape
    ds.PixelData = stored.tobytes()
    return ds


def write_series(image: sitk.Image, folder: str | Path, *, patient: dict[str, str], study_uid: str, series_uid: str,
                 frame_of_reference_uid: str, series_number: int, description: str, contrast: bool = False,
                 top_down: bool = False, transfer_syntax: str = ExplicitVRLittleEndian) -> list[Path]:
    """Write ``image`` (HU) as a CT Image Storage series, one file per slice; top_down numbers from the head."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    nz = image.GetSize()[2]
    date, time = _STUDY_DATE.strftime("%Y%m%d"), _STUDY_DATE.strftime("%H%M%S")
    series_time = (_STUDY_DATE + _dt.timedelta(minutes=12 if contrast else 2)).strftime("%H%M%S")
    common: dict = {
        "SpecificCharacterSet": "ISO_IR 100",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "InstanceCreationDate": date, "InstanceCreationTime": series_time,
        "SOPClassUID": CT_IMAGE_STORAGE,
        "StudyDate": date, "SeriesDate": date, "AcquisitionDate": date, "ContentDate": date,
        "StudyTime": time, "SeriesTime": series_time, "AcquisitionTime": series_time, "ContentTime": series_time,
        "AccessionNumber": "", "Modality": "CT", "Manufacturer": "SegRap phantom",
        "ReferringPhysicianName": "", "StudyDescription": "Head and neck phantom (synthetic)",
        "SeriesDescription": description, "ManufacturerModelName": "Synthetic head-and-neck phantom",
        **patient,
        "BodyPartExamined": "HEADNECK", "KVP": "120",
        "SoftwareVersions": f"segrap {__version__}", "PatientPosition": "HFS",
        "StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid, "StudyID": "1",
        "SeriesNumber": series_number, "AcquisitionNumber": 1,
        "FrameOfReferenceUID": frame_of_reference_uid, "PositionReferenceIndicator": "",
        "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2",
        "BitsAllocated": 16, "BitsStored": 12, "HighBit": 11, "PixelRepresentation": 0,
        "WindowCenter": "40", "WindowWidth": "400",
        "RescaleIntercept": "-1024", "RescaleSlope": "1", "RescaleType": "HU",
    }
    if contrast:
        common.update(ContrastBolusAgent="Iodinated contrast", ContrastBolusRoute="IV")
    written = []
    for n in range(nz):
        k = nz - 1 - n if top_down else n
        instance = n + 1
        sop_uid = _uid(series_uid, "slice", k)
        ds = _slice_dataset(common, image, k, instance, sop_uid)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax)
        path = folder / f"CT{instance:04d}.dcm"
        save_file(ds, path)
        written.append(path)
    return written


def patient_of(case: PhantomCase) -> dict[str, str]:
    """Synthetic patient attributes for a phantom case."""
    number = case.case_id.rsplit("_", 1)[-1]
    return {"PatientName": f"Phantom^SegRap{number}", "PatientID": f"PHANTOM-{number}",
            "PatientBirthDate": "", "PatientSex": "O"}


def write_phantom_dicom(case: PhantomCase, out: str | Path, *, variant: str = "standard", seed: int = 0,
                        transfer_syntax: str = ExplicitVRLittleEndian) -> DicomPhantom:
    """Write the case's CT (``out/CT``) and contrast CT (``out/CT_contrast``) as one study; atomic per call."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = (case.case_id, seed, variant, case.ct.GetSize())
    study, frame = _uid(*key, "study"), _uid(*key, "frame")
    ct_series, ce_series = _uid(*key, "ct"), _uid(*key, "contrast")
    patient = patient_of(case)
    top_down = variant == "reversed"
    tmp = Path(tempfile.mkdtemp(prefix=".phantom-dicom.", dir=out))
    try:
        write_series(case.ct, tmp / "CT", patient=patient, study_uid=study, series_uid=ct_series,
                     frame_of_reference_uid=frame, series_number=2, description="Plain CT head and neck",
                     top_down=top_down, transfer_syntax=transfer_syntax)
        write_series(case.contrast_ct, tmp / "CT_contrast", patient=patient, study_uid=study, series_uid=ce_series,
                     frame_of_reference_uid=frame, series_number=3, description="Contrast-enhanced CT head and neck",
                     contrast=True, top_down=top_down, transfer_syntax=transfer_syntax)
        for name in ("CT", "CT_contrast"):
            if (out / name).exists():
                shutil.rmtree(out / name)
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return DicomPhantom(case=case, root=out, ct_dir=out / "CT", contrast_dir=out / "CT_contrast", study_uid=study,
                        frame_of_reference_uid=frame, ct_series_uid=ct_series, contrast_series_uid=ce_series,
                        variant=variant)


def write_variant(variant: str, out: str | Path, index: int = 0, seed: int = 0, size: str = "small",
                  slices: int | None = None, transfer_syntax: str = ExplicitVRLittleEndian) -> DicomPhantom:
    """Make the phantom case of ``variant`` and write it as DICOM under ``out``."""
    case = variant_case(variant, index=index, seed=seed, size=size, slices=slices)
    return write_phantom_dicom(case, out, variant=variant, seed=seed, transfer_syntax=transfer_syntax)


__all__ = ["DicomPhantom", "VARIANTS", "RLELossless", "patient_of", "variant_case", "write_phantom_dicom",
           "write_series", "write_variant"]
