"""The MRML side of the Slicer module: volume nodes to files, results into segmentation nodes, nodes to RTSTRUCT.

Imports MRML classes only (``slicer`` and ``vtk``, never qt), so the same code runs inside Slicer
and headless with the ``slicer-core`` package. Geometry crosses the boundary exactly: Slicer keeps
volumes in RAS (``IJKToRAS``), files and SimpleITK in LPS; the direction matrix is never dropped.
Nodes under a non-identity parent transform are refused rather than silently moved.

- ``volume_image`` / ``write_volume``: a scalar volume node as a SimpleITK image / a NRRD file.
- ``add_volume_node``: the reverse (tests, console scripts).
- ``load_segmentation``: a result ``.seg.nrrd`` into a segmentation node (overlapping segments,
  names, colors, terminology tags, reference geometry of the CT).
- ``segmentation_masks``: every segment of a (possibly edited) segmentation node on the CT grid;
  ``set_segment_mask`` edits one segment from an array (console scripts, tests).
- ``ct_dicom_volume`` / ``export_rtstruct``: the CT's original DICOM files, found through a DICOM
  database (Slicer's ``slicer.dicomDatabase`` or a ``FolderDicomIndex``), and the RTSTRUCT on them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from ..arrays import EMPTY_BOX, bounding_box
from ..errors import DicomError, GeometryError, InputError

log = logging.getLogger(__name__)

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])  # its own inverse
BINARY_LABELMAP = "Binary labelmap"
INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"  # set by Slicer's DICOM scalar volume plugin
MODEL_ATTRIBUTE = "SegRap.Model"  # "name version" of the bundle that made a segmentation
PROVENANCE_ATTRIBUTE = "SegRap.Provenance"  # the .seg.nrrd's provenance record (JSON)
EMPTY_ATTRIBUTE = "SegRap.EmptySegments"  # comma-separated names of the segments the model found empty


class DicomDatabase(Protocol):
    """What is needed of a DICOM database: Slicer's ctkDICOMDatabase and ``FolderDicomIndex`` both have it."""

    def fileForInstance(self, sopInstanceUID: str) -> str: ...


# --------------------------------------------------------------------------------------------
# Scene set-up (headless)
# --------------------------------------------------------------------------------------------


def headless_scene() -> "slicer.vtkMRMLScene":
    """A new scene ready for segmentations outside Slicer (slicer-core): converter rules registered, set as
    ``slicer.mrmlScene`` so ``slicer.util`` helpers work. Inside Slicer, use ``slicer.mrmlScene`` instead."""
    if hasattr(slicer, "app"):
        raise RuntimeError("Inside Slicer, use slicer.mrmlScene: headless_scene() would replace it.")
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)  # registers the binary labelmap <-> closed surface converter rules
    scene._segrapSegmentationsLogic = logic  # keep the logic alive as long as the scene
    slicer.mrmlScene = scene
    return scene


def _check_no_transform(node, role: str) -> None:
    """Refuse a node under a parent transform that moves it: its file would not be where Slicer shows it."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return
    if parent.IsTransformToWorldLinear():
        matrix = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(matrix)
        if np.allclose(_numpy(matrix), np.eye(4), atol=1e-9):
            return
    raise GeometryError(f"{role} {node.GetName()!r} is under the transform {parent.GetName()!r}. Harden the "
                        f"transform (Data module: right-click the volume, Harden transform) or remove it, then "
                        f"run again.")


def _numpy(matrix: "vtk.vtkMatrix4x4") -> np.ndarray:
    return np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])


def _vtk_matrix(array: np.ndarray) -> "vtk.vtkMatrix4x4":
    matrix = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            matrix.SetElement(i, j, float(array[i, j]))
    return matrix


def ijk_to_ras(volume_node) -> np.ndarray:
    """The volume's 4x4 IJK-to-RAS matrix (spacing and direction included)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return _numpy(matrix)


def lps_geometry(volume_node) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(origin, spacing, direction) of a volume node in LPS, as SimpleITK writes them."""
    matrix = ijk_to_ras(volume_node)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise GeometryError(f"Volume {volume_node.GetName()!r} has a zero voxel spacing.")
    direction = RAS_FROM_LPS @ (matrix[:3, :3] / spacing[None, :])
    origin = RAS_FROM_LPS @ matrix[:3, 3]
    return tuple(origin.tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def _reference_image(volume_node) -> sitk.Image:
    """An empty image with the volume's grid (size, origin, spacing, direction in LPS)."""
    image = sitk.Image([int(v) for v in volume_node.GetImageData().GetDimensions()], sitk.sitkUInt8)
    origin, spacing, direction = lps_geometry(volume_node)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


# --------------------------------------------------------------------------------------------
# Volume nodes <-> images and files
# --------------------------------------------------------------------------------------------


def volume_image(volume_node, role: str = "CT") -> sitk.Image:
    """A scalar volume node as a SimpleITK image: its voxels (copied) and its geometry in LPS."""
    if volume_node is None:
        raise InputError(f"No {role} volume is selected.")
    _check_no_transform(volume_node, role)
    data = volume_node.GetImageData()
    if data is None or data.GetPointData().GetScalars() is None:
        raise InputError(f"{role} {volume_node.GetName()!r} holds no voxels (was it loaded completely?).")
    if data.GetNumberOfScalarComponents() != 1:
        raise InputError(f"{role} {volume_node.GetName()!r} has {data.GetNumberOfScalarComponents()} values per "
                         f"voxel (a color or vector volume); a CT has one.")
    shape = tuple(reversed(data.GetDimensions()))
    array = numpy_support.vtk_to_numpy(data.GetPointData().GetScalars()).reshape(shape)
    image = sitk.GetImageFromArray(array)  # copies
    origin, spacing, direction = lps_geometry(volume_node)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def write_volume(volume_node, path: str | Path, role: str = "CT") -> Path:
    """Write a scalar volume node to ``path`` (NRRD, uncompressed: a temp file the worker reads at once)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".part-{path.name}")  # keeps the suffix that tells SimpleITK the format
    try:
        sitk.WriteImage(volume_image(volume_node, role), str(tmp), useCompression=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def add_volume_node(scene, image: sitk.Image, name: str = "Volume", node_class: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node holding a SimpleITK image's voxels and geometry (LPS converted to RAS)."""
    array = np.ascontiguousarray(sitk.GetArrayFromImage(image))
    data = vtk.vtkImageData()
    data.SetDimensions(image.GetSize())
    data.AllocateScalars(numpy_support.get_vtk_array_type(array.dtype), 1)
    numpy_support.vtk_to_numpy(data.GetPointData().GetScalars())[:] = array.ravel()
    node = scene.AddNewNodeByClass(node_class, name)
    node.SetAndObserveImageData(data)
    direction = RAS_FROM_LPS @ np.array(image.GetDirection()).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction
    node.SetIJKToRASDirectionMatrix(_vtk_matrix(matrix))
    node.SetSpacing(*image.GetSpacing())
    node.SetOrigin(*(RAS_FROM_LPS @ np.array(image.GetOrigin())))
    node.CreateDefaultDisplayNodes()
    return node


# --------------------------------------------------------------------------------------------
# Result file -> segmentation node
# --------------------------------------------------------------------------------------------


def _segment_names(segmentation) -> list[str]:
    return [segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName()
            for i in range(segmentation.GetNumberOfSegments())]


def nrrd_header_field(path: Path, key: str, limit: int = 1 << 20) -> str | None:
    """One ``key:=value`` field of a NRRD file's text header, read with the standard library.

    Slicer does not ship pynrrd, and its process needs only this one field of the worker's result,
    so the header is read here: it is the text up to the first empty line (NRRD format spec).
    """
    prefix = f"{key}:=".encode()
    with open(path, "rb") as fh:
        for raw in iter(lambda: fh.readline(limit), b""):
            line = raw.rstrip(b"\r\n")
            if not line:
                return None
            if line.startswith(prefix):
                return line[len(prefix):].decode("utf-8")
    return None


def _file_provenance(path: Path) -> dict | None:
    """The ``SegRap_Provenance`` field of a ``.seg.nrrd`` written by ``segfile`` (header only)."""
    try:
        text = nrrd_header_field(path, "SegRap_Provenance")
        return json.loads(text) if text else None
    except Exception:  # noqa: BLE001 - provenance is informative; a file without it still loads
        return None


def _place_in_study(segmentation_node, reference_volume) -> None:
    """Put the segmentation next to its CT in the subject hierarchy (same study), as DICOM export expects."""
    hierarchy_class = getattr(slicer, "vtkMRMLSubjectHierarchyNode", None)
    scene = segmentation_node.GetScene()
    if hierarchy_class is None or scene is None:
        return
    hierarchy = hierarchy_class.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    volume_item = hierarchy.GetItemByDataNode(reference_volume)
    segmentation_item = hierarchy.GetItemByDataNode(segmentation_node)
    if volume_item and segmentation_item:
        parent = hierarchy.GetItemParent(volume_item)
        if parent and parent != hierarchy.GetSceneItemID():
            hierarchy.SetItemParent(segmentation_item, parent)


def _tagged_empty(segment) -> bool:
    """Whether ``segfile`` marked the segment as a structure the model did not find (tag ``SegRap.Empty``)."""
    from ..formats.segfile import EMPTY_TAG  # here, not at the top: segfile needs pynrrd, the module does not

    return bool(segment.HasTag(EMPTY_TAG))


@dataclass(frozen=True)
class FlaggedSegment:
    """A segment the run flagged for review (segment tags written by ``segfile`` from the provenance)."""

    segment_id: str
    name: str
    confidence: float
    reasons: str


def _tag(segment, key: str) -> str | None:
    value = vtk.reference("")  # vtkSegment::GetTag(std::string, std::string&): vtkSegment.h:117 at v5.10.0 and v5.12.0
    return str(value) if segment.GetTag(key, value) else None


def flagged_segments(segmentation_node) -> list[FlaggedSegment]:
    """The node's segments tagged for review (``SegRap.Review:1``), least confident first."""
    from ..anatomy.review import CONFIDENCE_TAG, REASONS_TAG, REVIEW_TAG

    segmentation = segmentation_node.GetSegmentation()
    flagged = []
    for i in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(segment_id)
        if _tag(segment, REVIEW_TAG) == "1":
            try:
                confidence = float(_tag(segment, CONFIDENCE_TAG) or "nan")
            except ValueError:
                confidence = float("nan")
            flagged.append(FlaggedSegment(segment_id, segment.GetName(), confidence, _tag(segment, REASONS_TAG) or ""))
    return sorted(flagged, key=lambda f: (not f.confidence == f.confidence, f.confidence, f.name))


def segment_center_ras(segmentation_node, segment_id: str) -> tuple[float, float, float] | None:
    """The centre of a segment in RAS, or None for an empty or unknown segment: where the panel jumps the views to.

    ``double* GetSegmentCenterRAS(const std::string&)`` (vtkMRMLSegmentationNode.h:301 at v5.10.0 and v5.12.0)
    returns nullptr, None in Python, when the segment is missing or empty (vtkMRMLSegmentationNode.cxx:1014
    GetSegmentCenter, which it calls, at v5.10.0).
    """
    center = segmentation_node.GetSegmentCenterRAS(segment_id)
    return None if center is None else tuple(float(c) for c in center)


def load_segmentation(path: str | Path, reference_volume, segmentation_node=None, *, name: str | None = None,
                      show_3d: bool = False):
    """Load a ``.seg.nrrd`` into a segmentation node on the reference volume's geometry; returns the node.

    A new node is made when ``segmentation_node`` is None. In a given node, segments the file holds
    replace those of the same name, and the node's other segments are kept. Overlapping segments
    stay in their shared layers; names, colors and terminology tags come from the file (``segfile``
    writes them from the catalogue). The node is not tied to the (temporary) file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such segmentation file.")
    scene = reference_volume.GetScene()
    if scene is None:
        raise InputError(f"The reference volume {reference_volume.GetName()!r} is not in a scene.")
    created = segmentation_node is None
    if created:
        segmentation_node = scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", name or f"{reference_volume.GetName()} segmentation")
    segmentation = segmentation_node.GetSegmentation()
    previous = slicer.vtkSegmentation()
    previous.DeepCopy(segmentation)  # the node's own segments, to put back the ones the result does not replace
    storage = slicer.vtkMRMLSegmentationStorageNode()  # not added to the scene: the node keeps no temp file name
    storage.SetFileName(str(path))
    try:
        ok = storage.ReadData(segmentation_node)
    except Exception:  # noqa: BLE001
        ok = False
    if not ok:
        segmentation.DeepCopy(previous)
        if created:
            scene.RemoveNode(segmentation_node)
        raise InputError(f"{path}: Slicer could not read this segmentation file.")
    new_names = set(_segment_names(segmentation))
    for i in range(previous.GetNumberOfSegments()):
        segment_id = previous.GetNthSegmentID(i)
        if previous.GetSegment(segment_id).GetName() not in new_names:
            segmentation.CopySegmentFromSegmentation(previous, segment_id, False)
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    segmentation_node.CreateDefaultDisplayNodes()
    provenance = _file_provenance(path)
    if provenance:
        segmentation_node.SetAttribute(PROVENANCE_ATTRIBUTE, json.dumps(provenance, sort_keys=True))
        model = provenance.get("model") if isinstance(provenance.get("model"), dict) else {}
        name = model.get("name") or provenance.get("bundle")
        if name:
            version = model.get("version") or provenance.get("version", "")
            segmentation_node.SetAttribute(MODEL_ATTRIBUTE, f"{name} {version}".strip())
    empty = [segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName()
             for i in range(segmentation.GetNumberOfSegments()) if _tagged_empty(
                 segmentation.GetSegment(segmentation.GetNthSegmentID(i)))]
    segmentation_node.SetAttribute(EMPTY_ATTRIBUTE, ",".join(empty))  # kept as segments: "not found" stays visible
    if empty:
        log.warning("%s: %d structure(s) not found by the model, kept as empty segments: %s", path.name, len(empty),
                    ", ".join(empty))
    _place_in_study(segmentation_node, reference_volume)
    if show_3d:
        segmentation_node.CreateClosedSurfaceRepresentation()
    return segmentation_node


# --------------------------------------------------------------------------------------------
# Segmentation node -> masks on the CT grid
# --------------------------------------------------------------------------------------------


def _oriented_reference(volume_node) -> "slicer.vtkOrientedImageData":
    """Geometry-only oriented image with the volume's extent and IJK-to-RAS."""
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(volume_node.GetImageData().GetExtent())
    reference.SetImageToWorldMatrix(_vtk_matrix(ijk_to_ras(volume_node)))
    return reference


def segment_mask(segmentation_node, segment_id: str, reference_volume) -> np.ndarray:
    """One segment as a boolean (z, y, x) mask on the reference volume's grid (nearest neighbour)."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise InputError(f"Segmentation {segmentation_node.GetName()!r} has no segment {segment_id!r}.")
    data = reference_volume.GetImageData()
    shape = tuple(reversed(data.GetDimensions()))
    labelmap = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentation_node, segment_id, labelmap, True):
        raise InputError(f"Segment {segment.GetName()!r} of {segmentation_node.GetName()!r} has no binary labelmap.")
    out = np.zeros(shape, dtype=bool)
    if labelmap.GetPointData().GetScalars() is None or labelmap.IsEmpty():
        return out
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, _oriented_reference(reference_volume), resampled, False, False):
        raise GeometryError(f"Segment {segment.GetName()!r} could not be resampled onto {reference_volume.GetName()!r}.")
    if resampled.GetPointData().GetScalars() is None:
        return out
    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars())
    values = values.reshape(tuple(reversed(resampled.GetDimensions())))
    # the segment's voxels carry its label value; a shared layer holds other segments' values too
    hit = values == segment.GetLabelValue()
    i0, i1, j0, j1, k0, k1 = resampled.GetExtent()
    e0, _, f0, _, g0, _ = data.GetExtent()
    zs, ys, xs = slice(k0 - g0, k1 - g0 + 1), slice(j0 - f0, j1 - f0 + 1), slice(i0 - e0, i1 - e0 + 1)
    lo = [max(0, s.start) for s in (zs, ys, xs)]
    hi = [min(n, s.stop) for s, n in zip((zs, ys, xs), shape)]
    if all(a < b for a, b in zip(lo, hi)):
        src = tuple(slice(a - s.start, b - s.start) for a, b, s in zip(lo, hi, (zs, ys, xs)))
        out[tuple(slice(a, b) for a, b in zip(lo, hi))] = hit[src]
    return out


def set_segment_mask(segmentation_node, segment_id: str, mask: np.ndarray, reference_volume) -> None:
    """Replace a segment's voxels by a boolean (z, y, x) mask on the reference grid, as a Segment Editor effect does.

    Other segments keep their voxels where they overlap it (overlapping segments stay overlapping).
    """
    data = reference_volume.GetImageData()
    shape = tuple(reversed(data.GetDimensions()))
    array = np.ascontiguousarray(mask, dtype=np.uint8)
    if array.shape != shape:
        raise GeometryError(f"The mask has shape {array.shape} (z, y, x); {reference_volume.GetName()!r} has {shape}.")
    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise InputError(f"Segmentation {segmentation_node.GetName()!r} has no segment {segment_id!r}.")
    image = slicer.vtkOrientedImageData()
    image.SetExtent(data.GetExtent())
    image.SetImageToWorldMatrix(_vtk_matrix(ijk_to_ras(reference_volume)))
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = array.ravel()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE, image.GetExtent()):
        raise InputError(f"Segment {segment_id!r} of {segmentation_node.GetName()!r} could not be updated.")


def segmentation_masks(segmentation_node, reference_volume, names: Iterable[str] | None = None):
    """Segments of a segmentation node (all, or ``names``) as masks on the reference volume's grid.

    Returns an ``rtstruct.RoiMasks`` keyed by segment name (each mask kept cropped, so 47 structures
    of a large CT stay small). Edits made in Slicer are what is read: the node's binary labelmaps,
    created from the closed surfaces first when the node has none.
    """
    from ..formats.rtstruct import RoiMasks

    if segmentation_node is None:
        raise InputError("No segmentation is selected.")
    _check_no_transform(reference_volume, "CT")
    segmentation = segmentation_node.GetSegmentation()
    if not segmentation.ContainsRepresentation(BINARY_LABELMAP):
        if not segmentation_node.CreateBinaryLabelmapRepresentation():
            raise InputError(f"Segmentation {segmentation_node.GetName()!r} cannot be converted to a binary labelmap.")
    wanted = None if names is None else set(names)
    shape = tuple(reversed(reference_volume.GetImageData().GetDimensions()))
    crops: dict[str, tuple[tuple[slice, ...], np.ndarray]] = {}
    for i in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(i)
        name = segmentation.GetSegment(segment_id).GetName()
        if wanted is not None and name not in wanted:
            continue
        if name in crops:
            raise InputError(f"Segmentation {segmentation_node.GetName()!r} has two segments named {name!r}; "
                             f"rename one (the RTSTRUCT needs unique names).")
        mask = segment_mask(segmentation_node, segment_id, reference_volume)
        box = bounding_box(mask) or EMPTY_BOX
        crops[name] = (box, mask[box].copy())
    if wanted is not None and wanted - set(crops):
        raise InputError(f"Segmentation {segmentation_node.GetName()!r} has no segment named "
                         f"{', '.join(sorted(wanted - set(crops)))}.")
    if not crops:
        raise InputError(f"Segmentation {segmentation_node.GetName()!r} has no segments to export.")
    return RoiMasks(shape, crops)


# --------------------------------------------------------------------------------------------
# The CT's DICOM files and the RTSTRUCT
# --------------------------------------------------------------------------------------------


class FolderDicomIndex:
    """A DICOM 'database' made by indexing a folder: SOP instance UID -> file (for ``ct_dicom_volume``).

    Use it where Slicer's DICOM database is not available (headless, or files not imported).
    """

    def __init__(self, folder: str | Path):
        import pydicom

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DicomError(f"{self.folder}: no such DICOM folder.")
        self._files: dict[str, str] = {}
        for path in sorted(p for p in self.folder.rglob("*") if p.is_file()):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            except Exception:  # noqa: BLE001 - not DICOM: skipped like a database import would
                continue
            uid = str(ds.get("SOPInstanceUID", ""))
            if uid:
                self._files[uid] = str(path)

    def fileForInstance(self, sopInstanceUID: str) -> str:  # noqa: N802,N803 - ctkDICOMDatabase's name
        return self._files.get(sopInstanceUID, "")


def slicer_dicom_database() -> DicomDatabase | None:
    """Slicer's open DICOM database, or None (headless, or no database set up)."""
    database = getattr(slicer, "dicomDatabase", None)
    if database is None:
        return None
    is_open = getattr(database, "isOpen", True)
    return database if (is_open() if callable(is_open) else is_open) else None


def dicom_instance_uids(volume_node) -> list[str]:
    """The SOP instance UIDs of the files a volume was loaded from; a clear DicomError when it was not DICOM."""
    uids = (volume_node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or "").split()
    if not uids:
        raise DicomError(
            f"The CT {volume_node.GetName()!r} was not loaded from DICOM (it has no {INSTANCE_UIDS_ATTRIBUTE}), so "
            f"an RTSTRUCT cannot reference its slices. Load the CT series through Slicer's DICOM module and segment "
            f"that volume, or save the segmentation as .seg.nrrd and use `segrap export-rtstruct` with the CT's "
            f"DICOM folder.")
    return uids


def ct_dicom_files(volume_node, database: DicomDatabase | None) -> list[Path]:
    """The CT's original DICOM files, found in the DICOM database by the volume's instance UIDs."""
    uids = dicom_instance_uids(volume_node)
    if database is None:
        raise DicomError(f"The CT {volume_node.GetName()!r} came from DICOM, but no DICOM database is open to find "
                         f"its files. Open the DICOM module (or pass the CT's DICOM folder).")
    files, missing = [], []
    for uid in uids:
        name = database.fileForInstance(uid)
        if name and Path(name).is_file():
            files.append(Path(name))
        else:
            missing.append(uid)
    if missing:
        raise DicomError(f"{len(missing)} of the {len(uids)} DICOM files of the CT {volume_node.GetName()!r} are not "
                         f"in the DICOM database any more (first missing instance: {missing[0]}). Import the CT "
                         f"series into the DICOM database again.")
    return files


def volume_dicom_files(volume_node, database: DicomDatabase | None) -> list[str] | None:
    """The DICOM files a volume was loaded from, as the database names them (no file is read: the worker reads
    their headers to check the patient); None when it was not loaded from DICOM or no database is open."""
    if not (volume_node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or "").split() or database is None:
        return None
    return [str(path) for path in ct_dicom_files(volume_node, database)]


def link_ct_files(files: list[Path], workdir: str | Path):
    """The CT's DICOM series as ``dicom.read_ct_series`` reads it (files linked into ``workdir`` first); no scene access."""
    from ..formats.dicom import read_ct_series

    folder = Path(workdir) / "ct"
    folder.mkdir(parents=True, exist_ok=True)
    for k, source in enumerate(files):
        target = folder / f"{k:05d}.dcm"
        try:
            os.symlink(source.resolve(), target)
        except OSError:  # no symlinks (Windows without the right): copy
            shutil.copyfile(source, target)
    return read_ct_series(folder, pixels=False)  # the RTSTRUCT needs the grid and UIDs, not the pixels


def ct_dicom_volume(volume_node, database: DicomDatabase | None, workdir: str | Path):
    """The CT's DICOM series, its files found in the DICOM database by the volume's instance UIDs."""
    return link_ct_files(ct_dicom_files(volume_node, database), workdir)


@dataclass
class RtStructInputs:
    """What an RTSTRUCT export takes from the scene and the DICOM database (on the GUI thread), as copies.

    The segmentation and the CT grid are nodes of no scene: nothing else reads or changes them, so
    the masks can be made from them on another thread.
    """

    segmentation: object  # a vtkMRMLSegmentationNode outside any scene: the segments as edited when copied
    grid: object  # a vtkMRMLScalarVolumeNode outside any scene: the CT node's extent and IJK-to-RAS, no voxels
    ct_files: list[Path]  # the CT's original DICOM files
    model_name: str
    model_version: str


def detached_copies(segmentation_node, volume_node):
    """Copies, outside any scene, of a segmentation node's segments and of a volume node's grid (no voxels)."""
    segmentation = slicer.vtkMRMLSegmentationNode()
    segmentation.SetName(segmentation_node.GetName())
    segmentation.GetSegmentation().DeepCopy(segmentation_node.GetSegmentation())
    grid = slicer.vtkMRMLScalarVolumeNode()
    grid.SetName(volume_node.GetName())
    grid.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras(volume_node)))
    image = vtk.vtkImageData()
    image.SetExtent(volume_node.GetImageData().GetExtent())
    grid.SetAndObserveImageData(image)
    return segmentation, grid


def rtstruct_inputs(segmentation_node, volume_node, database: DicomDatabase | None, *,
                    model_name: str | None = None, model_version: str | None = None) -> RtStructInputs:
    """Take what the export needs from the scene: the segments (edits included), the CT grid, its DICOM files, the model.

    MRML nodes and Slicer's DICOM database (a Qt object) are not thread-safe, so this part runs on
    the GUI thread; it only copies (``detached_copies``) and looks files up. ``write_rtstruct_from``
    (masks from the copies, reading the series, contours, writing) can run off it. Model name and
    version default to those recorded when the result was loaded (``MODEL_ATTRIBUTE``).
    """
    from .. import __version__

    if segmentation_node is None:
        raise InputError("No segmentation is selected.")
    if model_name is None:
        recorded = (segmentation_node.GetAttribute(MODEL_ATTRIBUTE) or "").split(" ", 1)
        model_name = recorded[0] if recorded and recorded[0] else "SegRap Segmenter"
        if model_version is None:
            model_version = recorded[1] if len(recorded) > 1 else __version__
    uids = dicom_instance_uids(volume_node)  # fail early, before copying the segments
    _check_no_transform(volume_node, "CT")
    log.info("RTSTRUCT export of %s on %d CT slices", segmentation_node.GetName(), len(uids))
    files = ct_dicom_files(volume_node, database)
    segmentation, grid = detached_copies(segmentation_node, volume_node)
    return RtStructInputs(segmentation, grid, files, model_name, model_version or __version__)


def write_rtstruct_from(inputs: RtStructInputs, path: str | Path, *, roi_names: str = "tg263",
                        should_stop=None) -> Path:
    """Write the RTSTRUCT of ``rtstruct_inputs`` (no scene access: runs on any thread); Cancelled when stopped.

    The masks are made from the copied segments on the CT node's grid, then put on the DICOM
    series' grid if Slicer loaded it onto another one.
    """
    from ..errors import Cancelled
    from ..formats.rtstruct import RoiMasks, masks_on_grid, write_rtstruct

    def check() -> None:
        if should_stop is not None and should_stop():
            raise Cancelled("The RTSTRUCT export was cancelled; nothing was written.")

    masks = segmentation_masks(inputs.segmentation, inputs.grid)
    check()
    workdir = Path(tempfile.mkdtemp(prefix="segrap-rtstruct-"))
    try:
        volume = link_ct_files(inputs.ct_files, workdir)
        check()
        notes = []
        node_grid = _reference_image(inputs.grid)
        if not _same_grid(node_grid, volume.image):
            moved, notes = masks_on_grid(masks, node_grid, volume.image,
                                         what=f"Segmentation {inputs.segmentation.GetName()!r}")
            masks = RoiMasks.of(moved)
        check()
        return write_rtstruct(masks, volume, path, model_name=inputs.model_name, model_version=inputs.model_version,
                              roi_names=roi_names, notes=[*notes, "Exported from 3D Slicer (SegRapSegmenter)"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def export_rtstruct(segmentation_node, volume_node, path: str | Path, database: DicomDatabase | None, *,
                    roi_names: str = "tg263", model_name: str | None = None,
                    model_version: str | None = None) -> Path:
    """Write the segmentation node's segments as an RTSTRUCT referencing the CT's original DICOM files.

    The masks are read from the node as it is now (edits included) on the CT volume's grid, then put
    on the DICOM series' grid if Slicer loaded it onto another one. In one go, on the calling
    thread; the panel runs the two halves (``rtstruct_inputs``, ``write_rtstruct_from``) apart.
    """
    inputs = rtstruct_inputs(segmentation_node, volume_node, database, model_name=model_name,
                             model_version=model_version)
    return write_rtstruct_from(inputs, path, roi_names=roi_names)


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-5, atol=1e-5)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5))
