"""Cases of structure masks in every format SegRap work uses, found in a folder and read one by one.

A *case source* gives one case's geometry, the SegRap names of the structures it holds and each
structure as a ``arrays.Crop`` (bounding box and mask), so an evaluation keeps only cropped masks in
memory. Formats, told apart by name and content:

* ``<case>.seg.nrrd``: a Slicer segmentation (read with ``segfile.read_seg_nrrd``);
* ``<case>/<SegRapName>.nii.gz`` (or .nii, .nrrd, .mha): the SegRap release layout, one file per structure;
* ``<case>.mha`` holding 45 (Task 1) or 2 (Task 2) channels in official order: the challenge's 4D
  output (``sitk.JoinSeries`` of 3D masks; it carries spacing but no origin or direction);
* ``<case>.nii.gz`` (or .nii, .nrrd, .mha) label map: the 54-class Task001 map or the Task002 map
  (1 GTVp, 2 GTVnd);
* ``<case>/`` holding an RTSTRUCT and the CT series it references (read with the ``dicom`` module,
  plugged in through ``register_reader`` like any other folder format).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..anatomy import structures as S
from ..arrays import Crop
from ..errors import GeometryError, InputError
from .limits import check_detached_data

TASKS = ("oar", "gtv")
_IMAGE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
_CT_NAMES = ("image.nii.gz", "image.nii", "image.nrrd", "image.mha")

# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """A case's voxel grid: shape and spacing (z, y, x); origin and direction as SimpleITK gives them.

    ``origin`` and ``direction`` are None where the file carries no position (the challenge's 4D
    ``.mha`` is written without them); such a grid is compared by shape and spacing only.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] | None = None
    direction: tuple[float, ...] | None = None

    @classmethod
    def of_image(cls, image: sitk.Image | sitk.ImageFileReader, positioned: bool = True) -> "Geometry":
        """The geometry of a 3D image (or of a reader after ``ReadImageInformation``)."""
        size = tuple(int(n) for n in image.GetSize())[:3]
        dim = len(image.GetSize())
        spacing = tuple(float(s) for s in image.GetSpacing())[:3]
        origin = tuple(float(o) for o in image.GetOrigin())[:3]
        d = np.asarray(image.GetDirection(), float).reshape(dim, dim)[:3, :3]
        if not positioned:
            return cls(size[::-1], spacing[::-1])
        return cls(size[::-1], spacing[::-1], origin, tuple(d.ravel().tolist()))

    def describe(self) -> str:
        """One line for messages: shape, spacing and (where known) origin."""
        text = f"shape z,y,x {self.shape}, spacing z,y,x {tuple(round(s, 5) for s in self.spacing)} mm"
        if self.origin is not None:
            text += f", origin {tuple(round(o, 3) for o in self.origin)} mm"
        return text

    def mismatch(self, other: "Geometry") -> str | None:
        """Why two grids differ (None when they are the same within rounding)."""
        if self.shape != other.shape:
            return f"shape {self.shape} vs {other.shape}"
        if not np.allclose(self.spacing, other.spacing, rtol=1e-4, atol=1e-5):
            return f"spacing {self.spacing} vs {other.spacing}"
        if self.origin is None or other.origin is None:
            return None
        if not np.allclose(self.origin, other.origin, atol=1e-3 + 1e-4 * max(self.spacing)):
            return f"origin {self.origin} vs {other.origin}"
        if not np.allclose(self.direction, other.direction, atol=1e-4):
            return f"direction {self.direction} vs {other.direction}"
        return None

    @property
    def positioned(self) -> bool:
        return self.origin is not None


# --------------------------------------------------------------------------------------------
# Case sources
# --------------------------------------------------------------------------------------------


class CaseSource:
    """One case's structure masks in some format; subclasses read them."""

    format = "?"

    def __init__(self, case_id: str, path: Path, geometry: Geometry):
        self.case_id = case_id
        self.path = path
        self.geometry = geometry

    def names(self) -> tuple[str, ...]:
        """SegRap names of the structures this case holds (empty ones included), in catalogue order."""
        raise NotImplementedError

    def crop(self, name: str) -> Crop:
        """The mask of a structure (any spelling) that ``names()`` lists."""
        raise NotImplementedError

    def labelmap(self) -> np.ndarray | None:
        """The 54-class Task 1 label map when the case is stored as one, else None."""
        return None

    def background(self) -> np.ndarray | None:
        """A CT (z, y, x) on the case's grid for pictures, when one lies beside the masks."""
        return None

    def _missing(self, name: str) -> InputError:
        return InputError(f"{self.path}: holds no {S.get(name).name}.")


class CroppedCase(CaseSource):
    """A case whose reader has put every structure's cropped mask in ``self.crops`` (SegRap name -> Crop)."""

    crops: dict[str, Crop]

    def crop(self, name: str) -> Crop:
        key = S.get(name).name
        if key not in self.crops:
            raise self._missing(name)
        return self.crops[key]


def _structure_order(names) -> tuple[str, ...]:
    present = set(names)
    return tuple(n for n in S.STRUCTURE_NAMES if n in present)


def _read_mask_image(path: Path) -> sitk.Image:
    check_detached_data(path, str(path))
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot be read as an image ({str(exc).strip().splitlines()[-1]}).") from exc


class StructureFolder(CaseSource):
    """The release layout: one ``<SegRapName>.nii.gz`` per structure in a case folder; read lazily."""

    format = "structure files"

    def __init__(self, case_id: str, folder: Path, files: Mapping[str, Path]):
        first = next(iter(files.values()))
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(first))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise InputError(f"{first}: cannot be read as an image.") from exc
        super().__init__(case_id, folder, Geometry.of_image(reader))
        self.files = dict(files)

    def names(self) -> tuple[str, ...]:
        return _structure_order(self.files)

    def crop(self, name: str) -> Crop:
        key = S.get(name).name
        if key not in self.files:
            raise self._missing(name)
        image = _read_mask_image(self.files[key])
        found = Geometry.of_image(image)
        why = self.geometry.mismatch(found)
        if why:
            raise GeometryError(f"{self.files[key]} is not on the grid of the other structure files of "
                                f"{self.path} ({why}); every structure of a case must share one grid.")
        return Crop.of(sitk.GetArrayViewFromImage(image))

    def background(self) -> np.ndarray | None:
        for name in _CT_NAMES:
            path = self.path / name
            if path.is_file():
                image = _read_mask_image(path)
                if Geometry.of_image(image).mismatch(self.geometry) is None:
                    return sitk.GetArrayFromImage(image)
        return None


class SegNrrdCase(CroppedCase):
    """A Slicer ``.seg.nrrd``; segments named with any known spelling, others ignored."""

    format = "seg.nrrd"

    def __init__(self, case_id: str, path: Path):
        from . import segfile

        seg = segfile.read_seg_nrrd(path)
        super().__init__(case_id, path, Geometry.of_image(seg.reference))
        self.crops: dict[str, Crop] = {}
        self.ignored: list[str] = []
        for raw, mask in seg.masks.items():
            try:
                name = S.get(raw).name
            except KeyError:
                self.ignored.append(raw)
                continue
            self.crops[name] = Crop.of(mask)

    def names(self) -> tuple[str, ...]:
        return _structure_order(self.crops)



def _task_names(task: str) -> tuple[str, ...]:
    return S.OAR_NAMES if task == "oar" else S.GTV_NAMES


class ChallengeMha(CroppedCase):
    """The challenge's 4D ``.mha``: 45 (Task 1) or 2 (Task 2) binary channels in official order.

    The whole file is read once (peak memory: its size) and each channel kept as a crop.
    """

    format = "4D mha"

    def __init__(self, case_id: str, path: Path, image: sitk.Image):
        if image.GetDimension() == 4:
            channels = image.GetSize()[3]
            array = sitk.GetArrayViewFromImage(image)  # (c, z, y, x)
            take: Callable[[int], np.ndarray] = lambda c: array[c]  # noqa: E731
        else:
            channels = image.GetNumberOfComponentsPerPixel()
            array = sitk.GetArrayViewFromImage(image)  # (z, y, x, c)
            take = lambda c: array[..., c]  # noqa: E731
        if channels == len(S.OARS):
            self.task = "oar"
        elif channels == len(S.GTVS):
            self.task = "gtv"
        else:
            raise InputError(f"{path}: a challenge .mha holds 45 (Task 1) or 2 (Task 2) channels, this one "
                             f"holds {channels}.")
        # the challenge writes these with JoinSeries and SetSpacing only: no usable origin or direction
        d = np.asarray(image.GetDirection(), float)
        dim = image.GetDimension()
        placed = any(abs(o) > 1e-9 for o in image.GetOrigin()) or not np.allclose(d, np.eye(dim).ravel())
        super().__init__(case_id, path, Geometry.of_image(image, positioned=placed))
        self.crops = {name: Crop.of(take(c)) for c, name in enumerate(_task_names(self.task))}

    def names(self) -> tuple[str, ...]:
        return _task_names(self.task)



def _task_from_path(path: Path) -> str | None:
    """The task a label map's folder names say (Task001/Task002, oars/gtvs), or None."""
    words = set(re.split(r"[^a-z0-9]+", "/".join(path.parts[-3:]).lower()))
    if words & {"task002", "task2", "gtv", "gtvs"}:
        return "gtv"
    if words & {"task001", "task1", "oar", "oars"}:
        return "oar"
    return None


class LabelMapCase(CroppedCase):
    """A one-hot label map: Task001 (54 classes, recomposed into the 45 OARs) or Task002 (1 GTVp, 2 GTVnd)."""

    def __init__(self, case_id: str, path: Path, image: sitk.Image, task: str | None):
        super().__init__(case_id, path, Geometry.of_image(image))
        array = sitk.GetArrayFromImage(image)
        if not np.issubdtype(array.dtype, np.integer):
            raise InputError(f"{path}: a label map must hold integer labels, this one holds {array.dtype} "
                             f"(is it a CT image?).")
        high = int(array.max()) if array.size else 0
        if task is None:
            task = _task_from_path(path) or ("oar" if high > len(S.GTVS) else "gtv")
        limit = S.NUM_CLASSES if task == "oar" else len(S.GTVS)
        if high > limit or (array.size and array.min() < 0):
            raise InputError(f"{path}: label values {int(array.min())}..{high} do not fit a "
                             f"{'Task001 (0..54)' if task == 'oar' else 'Task002 (0..2)'} label map; "
                             f"pass --task to say which task the maps belong to.")
        self.task = task
        self.format = "Task001 label map" if task == "oar" else "Task002 label map"
        self.array = array.astype(np.uint8, copy=False)
        if task == "oar":
            masks = S.recompose(self.array)
            self.crops = {n: Crop.from_box(self.array.shape, *masks.crop(n)) for n in S.OAR_NAMES}
        else:
            self.crops = {s.name: Crop.of(self.array == s.label) for s in S.GTVS}

    def names(self) -> tuple[str, ...]:
        return _task_names(self.task)


    def labelmap(self) -> np.ndarray | None:
        return self.array if self.task == "oar" else None


# --------------------------------------------------------------------------------------------
# Finding cases
# --------------------------------------------------------------------------------------------


def case_id_of(path: Path) -> str:
    """The case id a file or folder name gives (``segrap_0001.seg.nrrd`` -> ``segrap_0001``)."""
    name = path.name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _structure_files(folder: Path) -> dict[str, Path]:
    """Structure name -> file for the files of a folder named after a structure (any spelling)."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.lower().endswith(".seg.nrrd"):
            continue
        stem = case_id_of(path)
        if stem == path.name:
            continue
        try:
            name = S.get(stem).name
        except KeyError:
            continue
        if name in found:
            raise InputError(f"{folder}: both {found[name].name} and {path.name} hold {name}; keep one.")
        found[name] = path
    return found


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _has_dicom(folder: Path) -> bool:
    files = (p for p in folder.rglob("*") if p.is_file())
    return any(p.suffix.lower() == ".dcm" or _is_dicom(p) for p in itertools.islice(files, 200))


# A reader for a folder format other than structure files: (detect(folder), open(case_id, folder, task)).
FolderReader = tuple[Callable[[Path], bool], Callable[[str, Path, "str | None"], CaseSource]]
_FOLDER_READERS: list[FolderReader] = []


def register_reader(detect: Callable[[Path], bool], open_case: Callable[[str, Path, str | None], CaseSource]) -> None:
    """Add a folder format (the DICOM RTSTRUCT reader plugs in here)."""
    _FOLDER_READERS.append((detect, open_case))


def _open_dicom_case(case_id: str, folder: Path, task: str | None) -> CaseSource:
    """An RTSTRUCT + CT case through the ``dicom`` module's readers."""
    try:
        from . import dicom
    except ImportError as exc:
        raise InputError(f"{folder}: holds DICOM files, but this build cannot read RTSTRUCT ({exc}). Export the "
                         f"structures as .seg.nrrd or NIfTI files instead.") from exc
    return DicomCase(case_id, folder, dicom)


def _referenced_series(ds) -> str | None:
    """The CT series an RTSTRUCT says it was drawn on (Referenced Frame of Reference > Study > Series)."""
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                uid = str(series.get("SeriesInstanceUID", ""))
                if uid:
                    return uid
    return None


class DicomCase(CroppedCase):
    """An RTSTRUCT with the CT series it references, its contours filled on the CT grid."""

    format = "RTSTRUCT"

    def __init__(self, case_id: str, folder: Path, dicom):
        import pydicom

        from . import rtstruct

        series = dicom.discover_series(folder)
        rtstructs = [f for s in series if s.modality == "RTSTRUCT" for f in s.files]
        if not rtstructs:
            raise InputError(f"{folder}: DICOM files but no RTSTRUCT; put the structure set beside its CT series.")
        if len(rtstructs) > 1:
            listed = ", ".join(str(p.relative_to(folder)) for p in rtstructs)
            raise InputError(f"{folder}: {len(rtstructs)} RTSTRUCT files ({listed}); keep only the one to evaluate.")
        path = rtstructs[0]
        wanted = _referenced_series(pydicom.dcmread(path, stop_before_pixels=True))
        ct_uids = {s.series_uid for s in series if s.modality == "CT"}
        volume = dicom.read_ct_series(folder, wanted if wanted in ct_uids else None)
        super().__init__(case_id, path, Geometry.of_image(volume.image))
        self._ct = volume.image
        self.crops: dict[str, Crop] = {}
        self.ignored: list[str] = []
        for raw, mask in rtstruct.read_rtstruct(path, volume).items():
            try:
                self.crops[S.get(raw).name] = Crop.of(mask)
            except KeyError:
                self.ignored.append(raw)

    def names(self) -> tuple[str, ...]:
        return _structure_order(self.crops)


    def background(self) -> np.ndarray | None:
        return sitk.GetArrayFromImage(self._ct)


register_reader(_has_dicom, _open_dicom_case)


@dataclass(frozen=True)
class CaseEntry:
    """A case found in a folder, opened on demand so only one case is held in memory at a time."""

    case_id: str
    path: Path
    kind: str  # "file", "structures" or "folder"

    def open(self, task: str | None = None) -> CaseSource:
        """Read the case (``task`` tells label maps which task they hold)."""
        if self.kind == "structures":
            return StructureFolder(self.case_id, self.path, _structure_files(self.path))
        if self.kind == "folder":
            for detect, open_case in _FOLDER_READERS:
                if detect(self.path):
                    return open_case(self.case_id, self.path, task)
            raise InputError(f"{self.path}: no structure files or other known case format inside.")
        return open_file(self.case_id, self.path, task)


def open_file(case_id: str, path: Path, task: str | None = None) -> CaseSource:
    """Read one case file: ``.seg.nrrd``, a challenge 4D ``.mha`` or a label map."""
    if path.name.lower().endswith(".seg.nrrd"):
        return SegNrrdCase(case_id, path)
    image = _read_mask_image(path)
    if image.GetDimension() == 4 or image.GetNumberOfComponentsPerPixel() > 1:
        return ChallengeMha(case_id, path, image)
    if image.GetDimension() != 3:
        raise InputError(f"{path}: a {image.GetDimension()}D image; expected a 3D label map or a 4D .mha.")
    return LabelMapCase(case_id, path, image, task)


PROVENANCE_SUFFIX = ".provenance.json"


def segment_output_names(case_id: str) -> dict[str, str]:
    """Every name a ``segrap segment`` run of ``case_id`` may write into its output folder, by output key."""
    return {"segmentation": f"{case_id}.seg.nrrd", "nifti": f"{case_id}_structures",
            "challenge_oar": f"{case_id}_oar_4d.mha", "challenge_gtv": f"{case_id}_gtv_4d.mha",
            "rtstruct": f"{case_id}_RTSTRUCT.dcm", "provenance": f"{case_id}{PROVENANCE_SUFFIX}"}


def segment_outputs(folder: Path) -> dict[str, CaseEntry]:
    """The cases ``segrap segment`` wrote into ``folder``: one per ``<case>.provenance.json``, read from its
    ``<case>.seg.nrrd`` (else its ``--nifti`` folder); the other files of the set hold the same structures."""
    found: dict[str, CaseEntry] = {}
    for provenance in sorted(folder.glob("*" + PROVENANCE_SUFFIX)):
        case_id = provenance.name[: -len(PROVENANCE_SUFFIX)]
        seg, nifti = folder / f"{case_id}.seg.nrrd", folder / f"{case_id}_structures"
        if case_id.startswith("."):
            continue
        if seg.is_file():
            found[case_id] = CaseEntry(case_id, seg, "file")
        elif nifti.is_dir():
            found[case_id] = CaseEntry(case_id, nifti, "structures")
    return found


def _has_rtstruct(folder: Path) -> bool:
    """Whether a folder (subfolders included) holds an RTSTRUCT: a CT series alone is not a case to score."""
    import pydicom

    for path in itertools.islice((p for p in folder.rglob("*") if p.is_file()), 5000):
        if path.suffix.lower() != ".dcm" and not _is_dicom(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
        except Exception:  # noqa: BLE001 - not readable as DICOM: not an RTSTRUCT either
            continue
        if str(ds.get("Modality", "")).upper() == "RTSTRUCT":
            return True
    return False


def _case_of(path: Path) -> CaseEntry | None:
    if path.name.startswith("."):
        return None
    if path.is_file():
        lower = path.name.lower()
        if any(lower.endswith(s) for s in _IMAGE_SUFFIXES):
            return CaseEntry(case_id_of(path), path, "file")
        return None
    if path.is_dir():
        if _structure_files(path):
            return CaseEntry(path.name, path, "structures")
        if _has_dicom(path) and not _has_rtstruct(path):
            return None  # a CT series (say the CT/ beside a phantom's truth): images, not contours
        if any(detect(path) for detect, _ in _FOLDER_READERS):
            return CaseEntry(path.name, path, "folder")
    return None


def find_cases(root: str | Path) -> dict[str, CaseEntry]:
    """The cases under ``root``: a single case (file or case folder) or a folder of cases, by case id.

    A SegRap release root (holding ``*_Set/<case>/`` folders) is searched one level down.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: no such file or folder.")
    if root.is_file():
        entry = _case_of(root)
        if entry is None and (root.suffix.lower() == ".dcm" or _is_dicom(root)):
            raise InputError(f"{root}: a DICOM file; an RTSTRUCT is read on its CT series, so give the folder that "
                             f"holds both (or, for `segrap segment` output, its output folder: its .seg.nrrd holds "
                             f"the same structures).")
        if entry is None:
            raise InputError(f"{root}: not a case file (.seg.nrrd, .nii.gz, .nii, .nrrd or .mha).")
        return {entry.case_id: entry}
    found: dict[str, CaseEntry] = segment_outputs(root)  # `segrap segment`'s output folder
    in_sets = {name for case_id in found for name in segment_output_names(case_id).values()}
    if not found and _structure_files(root):
        return {root.name: CaseEntry(root.name, root, "structures")}
    for child in sorted(root.iterdir()):
        if child.name in in_sets:  # the other files of a set hold the structures its .seg.nrrd holds
            continue
        children = segment_outputs(child) if child.is_dir() and not child.name.startswith(".") else {}
        entry = _case_of(child) if not children else None  # a cohort's case folder holds one segment output set
        for entry in list(children.values()) + ([entry] if entry is not None else []):
            if entry.case_id in found:
                raise InputError(f"{root}: case {entry.case_id} appears twice ({found[entry.case_id].path} and "
                                 f"{entry.path}); keep one format per case in a folder.")
            found[entry.case_id] = entry
    if not found:
        sets = [c for c in sorted(root.iterdir()) if c.is_dir() and re.search(r"_set$", c.name, re.I)]
        for folder in sets:
            found.update(find_cases(folder))
    if not found and any(detect(root) for detect, _ in _FOLDER_READERS):
        found[root.name] = CaseEntry(root.name, root, "folder")
    if not found:
        raise InputError(f"{root}: no cases found. Expected .seg.nrrd files, 4D .mha files, label maps "
                         f"(.nii.gz) or case folders with one <Structure>.nii.gz per structure.")
    return found


# --------------------------------------------------------------------------------------------
# Writing the challenge's 4D .mha
# --------------------------------------------------------------------------------------------


def write_challenge_mha(path: str | Path, masks: Mapping[str, np.ndarray], task: str,
                        spacing_zyx: Sequence[float], reference: sitk.Image | None = None) -> Path:
    """Write masks as the challenge's 4D ``.mha``: one binary channel per structure in official order.

    Like the organizers' ``stacked_results_to_4d_mha.py``: ``JoinSeries`` of the 3D masks, spacing
    (x, y, z, 1), compressed; absent structures are written empty. With ``reference`` the file also
    keeps the CT's origin and direction (the organizers' writer drops them).
    """
    if task not in TASKS:
        raise InputError(f"task must be one of {TASKS}, got {task!r}.")
    by_name = {S.get(k).name: np.asarray(v) for k, v in masks.items()}
    shape = next(iter(by_name.values())).shape
    channels = []
    for name in _task_names(task):
        mask = by_name.get(name)
        arr = np.zeros(shape, np.uint8) if mask is None else (mask != 0).astype(np.uint8)
        channels.append(sitk.GetImageFromArray(arr, isVector=False))
    image = sitk.JoinSeries(channels)
    image.SetSpacing((*[float(s) for s in spacing_zyx[::-1]], 1.0))
    if reference is not None:
        image.SetOrigin((*reference.GetOrigin(), 0.0))
        direction = np.eye(4)
        direction[:3, :3] = np.array(reference.GetDirection()).reshape(3, 3)
        image.SetDirection(tuple(direction.ravel()))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part.mha")
    sitk.WriteImage(image, str(tmp), True)
    tmp.replace(path)
    return path
