"""Reading the CT and the contrast CT, checking they are usable CTs, and putting the contrast CT on the CT grid.

Volumes come from NIfTI, NRRD or MHA files (SimpleITK) or from a DICOM series folder (``dicom``).
The contrast CT is resampled onto the CT grid when both are in one patient space (the release's
pre-aligned pair, the default), or rigidly registered to it first (mutual information,
multi-resolution) when asked; the transform is returned for the provenance record.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from ..errors import GeometryError, InputError
from .limits import check_detached_data, check_size, check_spacing

if TYPE_CHECKING:  # the DICOM reader (pydicom) is imported only when a DICOM folder is read
    from .dicom import SeriesInfo

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
AIR_HU = -1024.0


@dataclass
class VolumeSource:
    """A loaded volume and where it came from (for provenance and for DICOM export)."""

    image: sitk.Image
    path: Path
    kind: str  # "file" or "dicom"
    notes: list[str] = field(default_factory=list)
    dicom: object | None = None  # dicom.DicomVolume for DICOM inputs


def _is_image_file(path: Path) -> bool:
    return any(path.name.lower().endswith(s) for s in IMAGE_SUFFIXES)


def _nifti_expected_bytes(header: bytes) -> int | None:
    """vox_offset + voxel data size from a NIfTI-1 or NIfTI-2 header, or None if it is not one."""
    import struct

    for endian in ("<", ">"):
        size = struct.unpack(endian + "i", header[:4])[0]
        if size == 348 and len(header) >= 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if size == 540 and len(header) >= 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    count = 1
    for d in dims[1:1 + max(0, min(int(dims[0]), 7))]:
        count *= max(int(d), 1)
    return max(offset, 352 if size == 348 else 544) + count * bitpix // 8


def check_file_complete(path: Path, role: str = "Image") -> None:
    """Refuse a truncated NIfTI file: ITK's NIfTI reader fills the missing voxels with zeros silently."""
    import gzip
    import zlib

    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return
    try:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as fh:
            header = fh.read(544)
            total = len(header)
            expected = _nifti_expected_bytes(header)
            for block in iter(lambda: fh.read(1 << 22), b""):
                total += len(block)
                if expected is not None and total >= expected:  # trailing bytes are not read (a gzip bomb's tail)
                    break
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(f"{role} {path}: the file is truncated or damaged ({exc}); copy it again.") from exc
    if expected is not None and total < expected:
        raise InputError(f"{role} {path}: the file is truncated ({total} of {expected} bytes); copy it again.")


def check_declared_size(path: Path, role: str = "Image") -> sitk.ImageFileReader:
    """Refuse an image file whose header declares more voxels than the limit, before its voxels are read.

    Returns the reader with the header read (size, dimension, components), for further checks.
    """
    check_detached_data(path, f"{role} {path}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise InputError(f"{role} {path}: cannot be read as an image ({first}). Is the file complete?") from exc
    check_size(reader.GetSize(), f"{role} {path}")
    check_spacing(reader.GetSpacing(), f"{role} {path}")
    return reader


def check_volume_header(path: str | Path, role: str = "CT") -> None:
    """The checks of ``read_volume`` that need no voxels: the path exists, an image file is of a known
    type, and its header declares one 3D scalar volume within the size limit.

    The pipeline runs these on the contrast CT before Task 1 and reads its voxels (and checks their
    values, and a DICOM folder's series) when Task 2 starts, so the two CTs are not both held in
    memory while Task 1's sliding window runs.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{role} {path}: no such file or folder.")
    if path.is_dir():
        return
    if not _is_image_file(path):
        raise InputError(f"{role} {path}: unsupported file type; give a NIfTI (.nii, .nii.gz), NRRD (.nrrd) "
                         f"or MetaImage (.mha, .mhd) file, or a DICOM series folder.")
    reader = check_declared_size(path, role)
    _check_one_scalar_volume(reader.GetNumberOfComponents(), reader.GetDimension(), path, role)


def read_volume(path: str | Path, role: str = "CT", series_uid: str | None = None,
                series: SeriesInfo | None = None) -> VolumeSource:
    """Read a CT from an image file or a DICOM folder and check it (3D, scalar, finite, HU); ``series``: the folder's
    CT series as the caller discovered it (a ``dicom.SeriesInfo``), so its headers are not discovered again."""
    path = Path(path)
    check_volume_header(path, role)
    if path.is_dir():
        try:
            from .dicom import read_ct_series
        except ImportError as exc:  # pragma: no cover - the dicom module ships with the package
            raise InputError(f"{role} {path}: DICOM folders need the dicom module ({exc}).") from exc
        volume = read_ct_series(path, series_uid, info=series)
        source = VolumeSource(volume.image, path, "dicom", list(getattr(volume, "notes", [])), volume)
    else:
        # the completeness check decompresses the whole file once more (0.3 s for a 512 x 512 x 126
        # .nii.gz): on a thread, beside ITK's read, which releases the GIL; its verdict comes first
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1) as pool:
            complete = pool.submit(check_file_complete, path, role)
            try:
                image, failure = sitk.ReadImage(str(path)), None
            except RuntimeError as exc:
                image, failure = None, exc
            complete.result()
        if failure is not None:
            first = str(failure).strip().splitlines()[-1] if str(failure).strip() else "unknown error"
            raise InputError(f"{role} {path}: cannot be read as an image ({first}). Is the file complete?") from failure
        source = VolumeSource(image, path, "file")
    check_ct(source.image, path, role)
    return source


def _check_one_scalar_volume(components: int, dimension: int, path: Path, role: str) -> None:
    if components != 1:
        raise InputError(f"{role} {path}: has {components} values per voxel (an RGB or vector image); a CT has "
                         f"one value per voxel.")
    if dimension != 3:
        raise InputError(f"{role} {path}: is a {dimension}D image; a CT must be one 3D volume "
                         f"(split 4D series and pick one time point).")


def check_ct(image: sitk.Image, path: Path, role: str = "CT") -> None:
    """Refuse images that cannot be a CT volume in Hounsfield units, naming the file and the problem."""
    _check_one_scalar_volume(image.GetNumberOfComponentsPerPixel(), image.GetDimension(), path, role)
    if min(image.GetSize()) < 2:
        raise InputError(f"{role} {path}: size {image.GetSize()} is a single slice; a CT volume is needed.")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise InputError(f"{role} {path}: {bad} voxels are NaN or infinite; fix or re-export the image.")
    low, high = float(array.min()), float(array.max())
    air = float(np.count_nonzero(array < -500)) / array.size
    if low >= -100 or air < 1e-4:
        raise InputError(f"{role} {path}: values {low:g}..{high:g} with no air below -500 do not look like a CT in "
                         f"Hounsfield units. Is this an MR or PET image, or a CT saved without its rescale "
                         f"slope and intercept?")


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    """True when both images have the same size, spacing, origin and direction."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance))


def physical_box(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical bounds (LPS mm) of an image's voxel centres."""
    size = np.array(image.GetSize()) - 1
    corners = [image.TransformContinuousIndexToPhysicalPoint([float(c) for c in np.array(idx) * size])
               for idx in np.ndindex(2, 2, 2)]
    pts = np.array(corners)
    return pts.min(axis=0), pts.max(axis=0)


def overlap_fraction(reference: sitk.Image, other: sitk.Image) -> float:
    """Fraction of the reference's physical box covered by the other's box."""
    lo_a, hi_a = physical_box(reference)
    lo_b, hi_b = physical_box(other)
    inter = np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0, None)
    extent = np.maximum(hi_a - lo_a, 1e-6)
    return float(np.prod(inter / extent))


@dataclass
class Alignment:
    """How the contrast CT was put on the CT grid (recorded in the provenance)."""

    method: str  # "same-grid", "resampled" or "registered"
    overlap: float
    transform: dict | None = None  # Euler3D parameters (CT point -> contrast CT point) when registered
    metric: float | None = None
    notes: list[str] = field(default_factory=list)


def register_rigid(fixed: sitk.Image, moving: sitk.Image, seed: int = 1) -> tuple[sitk.Euler3DTransform, float]:
    """Rigid transform (fixed point -> moving point) by Mattes mutual information, three resolutions."""
    fixed_f = sitk.Cast(fixed, sitk.sitkFloat32)
    moving_f = sitk.Cast(moving, sitk.sitkFloat32)
    initial = sitk.CenteredTransformInitializer(fixed_f, moving_f, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=48)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.15, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=200,
                                                 relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    euler = sitk.Euler3DTransform(initial)
    reg.SetInitialTransform(euler, inPlace=True)  # optimised in place: euler holds the result
    try:
        reg.Execute(fixed_f, moving_f)
    except RuntimeError as exc:
        raise GeometryError(f"Rigid registration of the contrast CT to the CT failed ({str(exc).strip()[:200]}). "
                            f"Check that both images show the same patient.") from exc
    return euler, float(reg.GetMetricValue())


def contrast_on_ct_grid(ct: VolumeSource, contrast: VolumeSource, register: bool = False,
                        minimum_overlap: float = 0.2) -> tuple[sitk.Image, Alignment]:
    """The contrast CT resampled (after rigid registration, if asked) onto the CT's grid."""
    overlap = overlap_fraction(ct.image, contrast.image)
    if not register and same_grid(ct.image, contrast.image):
        return contrast.image, Alignment("same-grid", overlap)
    if not register and overlap < minimum_overlap:
        raise GeometryError(
            f"The contrast CT {contrast.path} covers only {overlap:.0%} of the CT {ct.path} in patient space; they "
            f"are not aligned. Pass --register to align them by rigid registration, or check that both files "
            f"belong to the same patient and study.")
    transform: sitk.Transform = sitk.Transform()
    alignment = Alignment("resampled", overlap)
    if register:
        euler, metric = register_rigid(ct.image, contrast.image)
        transform = euler
        alignment = Alignment("registered", overlap, {
            "type": "Euler3DTransform", "maps": "CT point -> contrast CT point (LPS mm)",
            "parameters": list(euler.GetParameters()), "fixed_parameters": list(euler.GetFixedParameters()),
            "matrix": list(euler.GetMatrix()), "translation": list(euler.GetTranslation())}, metric)
    resampled = sitk.Resample(contrast.image, ct.image, transform, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
    return resampled, alignment
