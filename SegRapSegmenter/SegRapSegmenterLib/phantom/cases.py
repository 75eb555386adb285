"""A synthetic head-and-neck phantom in the SegRap release layout, for tests, demos and benchmarks.

The anatomy is a set of analytic shapes (ellipsoids and tubes) placed in patient coordinates (LPS,
millimetres, head centred at the origin) for an adult of SegRap's median field of view. Each OAR is
painted into a coverage-key volume in a fixed order: a later structure clears the structures it may
not overlap and adds those that contain it, so every voxel ends in one of the 54 classes and every
overlap relation of SEGRAP.md holds by construction. CT numbers come from the classes plus body,
bone, air and vessel tissues; the contrast CT enhances vessels, glands and the tumours.

The ``small`` size (48 x 96 x 96 at 3 x 2 x 2 mm) compresses the same anatomy into a smaller field
of view and keeps every structure at least about two voxels thick, so all 54 classes survive.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..anatomy import structures as S
from ..arrays import uint8_image
from ..errors import InputError

CASES_DIR = "SegRapPhantom_Set"
ONEHOT_DIR = CASES_DIR + "_OneHot_Labels"

# --------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridSpec:
    """Array shape and voxel spacing, both z, y, x."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]


SIZES: dict[str, GridSpec] = {
    "small": GridSpec((48, 96, 96), (3.0, 2.0, 2.0)),
    "full": GridSpec((126, 512, 512), (3.0, 0.54, 0.54)),
}
# The anatomy below is laid out for the "full" field of view (378 x 276 x 276 mm).
_REFERENCE_FOV = np.array([126 * 3.0, 512 * 0.54, 512 * 0.54])  # z, y, x


def _rotation(axis: str, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


DIRECTIONS: dict[str, np.ndarray] = {
    "identity": np.eye(3),
    # stored like many NIfTI converters write it: rows and columns run right-to-left, posterior-to-anterior
    "flipped": np.diag([-1.0, -1.0, 1.0]),
    # columns run posterior-to-anterior, rows run right-to-left: a 90-degree in-plane rotation
    "rotated": _rotation("z", 90.0),
    # slices tilted 12 degrees about the left-right axis and 8 degrees about the vertical axis
    "oblique": _rotation("z", 8.0) @ _rotation("x", 12.0),
}


@dataclass(frozen=True)
class Grid:
    """A SimpleITK-style image geometry: shape (z, y, x), spacing (z, y, x), origin and direction (x, y, z)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray  # 3 x 3, column j = physical direction of index axis j (x, y, z order)

    @classmethod
    def centred(cls, spec: GridSpec, direction: np.ndarray, centre=(0.0, 0.0, 0.0)) -> "Grid":
        """The grid of ``spec`` whose centre lies at ``centre`` (x, y, z mm) for the given direction."""
        half = (np.array(spec.shape[::-1]) - 1) * np.array(spec.spacing[::-1]) / 2.0
        origin = np.asarray(centre, float) - direction @ half
        return cls(spec.shape, spec.spacing, tuple(origin.tolist()), np.asarray(direction, float))

    def image(self, array: np.ndarray) -> sitk.Image:
        """A SimpleITK image of ``array`` (z, y, x) on this grid."""
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(tuple(float(v) for v in self.spacing[::-1]))
        img.SetOrigin(tuple(float(v) for v in self.origin))
        img.SetDirection(tuple(float(v) for v in self.direction.ravel()))
        return img

    @property
    def _step(self) -> np.ndarray:
        """Physical step per index along x, y, z as columns (direction times spacing)."""
        return self.direction * np.array(self.spacing[::-1])[None, :]

    def physical_spacing(self) -> np.ndarray:
        """Extent of one voxel along the physical x, y, z axes (for minimum-thickness clamps)."""
        return np.abs(self._step).sum(axis=1)

    def index_box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """The (z, y, x) slices of the voxels that may lie in the physical box lo..hi (x, y, z)."""
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        idx = np.linalg.solve(self._step, (corners - np.array(self.origin)).T)  # rows: x, y, z index
        first = np.maximum(np.floor(idx.min(axis=1)).astype(int), 0)
        last = np.minimum(np.ceil(idx.max(axis=1)).astype(int) + 1, np.array(self.shape[::-1]))
        if np.any(last <= first):
            return None
        return tuple(slice(int(first[d]), int(last[d])) for d in (2, 1, 0))

    def points(self, box: tuple[slice, slice, slice]) -> np.ndarray:
        """Physical x, y, z of the voxels of ``box``, shape (3, nz, ny, nx)."""
        axes = [np.arange(s.start, s.stop, dtype=np.float32) for s in box]  # z, y, x indices
        step = self._step.astype(np.float32)
        out = np.empty((3, *(len(a) for a in axes)), dtype=np.float32)
        for row in range(3):  # p = origin + step @ (i, j, k), built by broadcasting
            out[row] = (np.float32(self.origin[row]) + step[row, 2] * axes[0][:, None, None]
                        + step[row, 1] * axes[1][None, :, None] + step[row, 0] * axes[2][None, None, :])
        return out


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ellipsoid:
    """An axis-aligned ellipsoid (anatomy frame): centre and semi-axes, x, y, z in mm."""

    centre: tuple[float, float, float]
    semi: tuple[float, float, float]


@dataclass(frozen=True)
class Tube:
    """A capsule around the segment a-b with per-axis radii; ``inner`` > 0 leaves a hollow core."""

    a: tuple[float, float, float]
    b: tuple[float, float, float]
    radii: tuple[float, float, float]
    inner: float = 0.0  # fraction of the radii left hollow


Shape = Ellipsoid | Tube


@dataclass
class Placement:
    """Anatomy frame -> patient coordinates: p = R (scale * a) + shift, plus minimum half-thickness."""

    scale: np.ndarray
    rotation: np.ndarray
    shift: np.ndarray
    min_half: np.ndarray  # mm, x, y, z

    def to_frame(self, points: np.ndarray) -> np.ndarray:
        """Patient points (3, ...) into the scaled anatomy frame (rotation and shift undone)."""
        flat = points.reshape(3, -1) - self.shift[:, None]
        return (self.rotation.T @ flat).reshape(points.shape)

    def bounds(self, shape: Shape) -> tuple[np.ndarray, np.ndarray]:
        """A physical box that holds the placed shape."""
        if isinstance(shape, Ellipsoid):
            c = self.scale * shape.centre
            r = np.full(3, np.linalg.norm(self._semi(shape.semi)))
            lo, hi = c - r, c + r
        else:
            a, b = self.scale * shape.a, self.scale * shape.b
            r = np.full(3, np.linalg.norm(self._semi(shape.radii)))
            lo, hi = np.minimum(a, b) - r, np.maximum(a, b) + r
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        placed = corners @ self.rotation.T + self.shift
        return placed.min(axis=0), placed.max(axis=0)

    def _semi(self, semi) -> np.ndarray:
        return np.maximum(self.scale * np.asarray(semi, float), self.min_half)

    def inside(self, shape: Shape, q: np.ndarray) -> np.ndarray:
        """Boolean of the frame points q (3, ...) that lie inside the shape."""
        if isinstance(shape, Ellipsoid):
            c, r = self.scale * np.asarray(shape.centre), self._semi(shape.semi)
            d = sum(((q[i] - c[i]) / r[i]) ** 2 for i in range(3))
            return d <= 1.0
        a, b, r = self.scale * np.asarray(shape.a), self.scale * np.asarray(shape.b), self._semi(shape.radii)
        # distances in the metric where the tube's cross-section is a unit circle
        an, bn = a / r, b / r
        qn = q / r.reshape((3,) + (1,) * (q.ndim - 1))
        ab = bn - an
        t = sum((qn[i] - an[i]) * ab[i] for i in range(3)) / max(float(ab @ ab), 1e-12)
        t = np.clip(t, 0.0, 1.0)
        d = sum((qn[i] - (an[i] + t * ab[i])) ** 2 for i in range(3))
        inside = d <= 1.0
        if shape.inner > 0:
            inside &= d > shape.inner ** 2
        return inside


def _mirror(shape: Shape) -> Shape:
    """The same shape on the patient's other side (x negated)."""
    if isinstance(shape, Ellipsoid):
        return Ellipsoid((-shape.centre[0], *shape.centre[1:]), shape.semi)
    return Tube((-shape.a[0], *shape.a[1:]), (-shape.b[0], *shape.b[1:]), shape.radii, shape.inner)


# --------------------------------------------------------------------------------------------
# The anatomy (full-size frame, LPS mm: +x patient left, +y posterior, +z superior)
# --------------------------------------------------------------------------------------------

# OARs in painting order; a paired entry is the LEFT (+x) structure and is mirrored for the right.
_OAR_SHAPES: tuple[tuple[str, tuple[Shape, ...]], ...] = (
    ("Brain", (Ellipsoid((0, 8, 85), (64, 84, 72)),)),
    ("TemporalLobe_L", (Ellipsoid((42, -5, 48), (17, 30, 18)),)),
    ("Hippocampus_L", (Ellipsoid((27, 12, 40), (7, 16, 7)),)),
    ("BrainStem", (Ellipsoid((0, 22, 14), (13, 14, 34)),)),
    ("Chiasm", (Ellipsoid((0, -8, 44), (10, 5, 3)),)),
    ("Pituitary", (Ellipsoid((0, -4, 24), (6, 5, 4)),)),
    ("Eye_L", (Ellipsoid((32, -64, 30), (12, 12, 12)),)),
    ("Lens_L", (Ellipsoid((32, -74, 30), (4.5, 2.5, 4.5)),)),
    ("OpticNerve_L", (Tube((29, -52, 32), (9, -12, 42), (2.5, 2.5, 2.5)),)),
    ("Mastoid_L", (Ellipsoid((55, 40, 4), (12, 13, 16)),)),
    ("MiddleEar_L", (Ellipsoid((52, 12, 18), (11, 13, 10)),)),
    ("TympanicCavity_L", (Ellipsoid((61, 8, 17), (7, 9, 8)),)),
    ("VestibulSemi_L", (Ellipsoid((52, 24, 20), (7, 7, 7)),)),
    ("ETbone_L", (Tube((54, 7, 15), (34, -14, 9), (4, 4, 4)),)),
    ("IAC_L", (Tube((32, 14, 22), (46, 14, 22), (2.5, 2.5, 2.5)),)),
    ("Cochlea_L", (Ellipsoid((45, 6, 24), (4.5, 4.5, 4)),)),
    ("TMjoint_L", (Ellipsoid((57, -13, 4), (7, 6, 6)),)),
    ("Parotid_L", (Ellipsoid((52, 14, -18), (12, 16, 20)),)),
    ("Mandible_L", (Tube((54, -12, -6), (48, -16, -45), (6, 6, 6)), Tube((48, -16, -45), (4, -70, -52), (6, 6, 6)))),
    ("OralCavity", (Ellipsoid((0, -42, -24), (30, 26, 16)),)),
    ("Submandibular_L", (Ellipsoid((32, -22, -64), (9, 11, 8)),)),
    ("SpinalCord", (Tube((0, 32, -200), (0, 30, -24), (6, 6, 6)),)),
    ("Esophagus", (Tube((0, 16, -200), (0, 14, -112), (9, 6, 6)),)),
    ("PharynxConst", (Tube((0, 10, -96), (0, 8, -2), (10, 10, 6), inner=0.45),)),
    ("Larynx", (Ellipsoid((0, -8, -95), (18, 18, 22)),)),
    ("Larynx_Supraglot", (Ellipsoid((0, -14, -86), (11, 9, 8)),)),
    ("Larynx_Glottic", (Ellipsoid((0, -12, -107), (12, 10, 5)),)),
    ("Thyroid", (Ellipsoid((16, -4, -138), (8, 9, 18)), Ellipsoid((-16, -4, -138), (8, 9, 18)),
                 Ellipsoid((0, -17, -134), (12, 4, 6)))),
    ("Trachea", (Tube((0, -8, -200), (0, -7, -122), (9, 9, 9)),)),
)

# Tissues for CT numbers only, painted before the classes (later wins).
_TISSUE_SHAPES: tuple[tuple[str, tuple[Shape, ...]], ...] = (
    ("fat", (Ellipsoid((0, 5, 75), (78, 98, 95)), Tube((0, 15, -130), (0, 12, 0), (58, 62, 58)),
             Ellipsoid((0, -10, -20), (66, 82, 46)), Ellipsoid((0, 22, -205), (130, 100, 88)))),
    ("muscle", (Ellipsoid((0, 5, 75), (72, 92, 89)), Tube((0, 15, -130), (0, 12, 0), (52, 56, 52)),
                Ellipsoid((0, -10, -20), (60, 76, 40)), Ellipsoid((0, 22, -205), (124, 94, 82)))),
    ("bone", (Ellipsoid((0, 5, 75), (74, 94, 91)),)),  # skull vault; the brain is painted inside it
    ("marrow", (Ellipsoid((0, 5, 75), (70, 90, 87)),)),
    ("csf", (Ellipsoid((0, 6, 80), (67, 87, 82)),)),
    ("bone", (Ellipsoid((0, 20, 16), (52, 48, 5)), Ellipsoid((48, 18, 14), (16, 20, 12)),
              Ellipsoid((-48, 18, 14), (16, 20, 12)))),  # skull base and petrous bones
    ("bone", (Tube((0, 36, -200), (0, 36, -18), (14, 14, 14), inner=0.6),
              Tube((0, 15, -200), (0, 17, -20), (11, 11, 11)))),  # vertebral arches and bodies (cortex)
    ("marrow", (Tube((0, 15, -200), (0, 17, -20), (9, 9, 9)),)),
    ("air", (Tube((0, 9, -98), (0, 7, -2), (4.5, 4.5, 4.5)), Ellipsoid((0, -50, 12), (13, 24, 12)),
             Tube((0, -8, -200), (0, -7, -112), (6.5, 6.5, 6.5)))),  # pharynx, nasal cavity, airway
    ("artery", (Tube((22, -2, -200), (20, 2, 12), (4, 4, 4)), Tube((-22, -2, -200), (-20, 2, 12), (4, 4, 4)))),
    ("vein", (Tube((32, 8, -200), (36, 16, 8), (6, 6, 6)), Tube((-32, 8, -200), (-36, 16, 8), (6, 6, 6)))),
)

# CT numbers (HU) per tissue: plain CT, contrast CT.
_TISSUE_HU: dict[str, tuple[float, float]] = {
    "air": (-1000, -1000), "fat": (-95, -95), "muscle": (45, 62), "bone": (900, 900), "marrow": (350, 360),
    "csf": (8, 10), "artery": (40, 320), "vein": (42, 190), "table": (250, 250),
}
# CT numbers of the structures (plain, contrast); a class takes the HU of its most specific structure.
_STRUCTURE_HU: dict[str, tuple[float, float]] = {
    "Brain": (34, 38), "BrainStem": (30, 34), "Chiasm": (32, 36), "TemporalLobe": (37, 41),
    "Hippocampus": (40, 44), "Eye": (12, 14), "Lens": (95, 96), "OpticNerve": (30, 34),
    "MiddleEar": (-450, -450), "IAC": (18, 22), "TympanicCavity": (-700, -700), "VestibulSemi": (40, 42),
    "Cochlea": (60, 62), "ETbone": (-250, -250), "Pituitary": (45, 115), "OralCavity": (62, 82),
    "Mandible": (1150, 1150), "Submandibular": (48, 95), "Parotid": (-10, 35), "Mastoid": (320, 320),
    "TMjoint": (280, 285), "SpinalCord": (35, 40), "Esophagus": (40, 70), "Larynx": (70, 90),
    "Larynx_Glottic": (25, 40), "Larynx_Supraglot": (-180, -170), "PharynxConst": (52, 95),
    "Thyroid": (100, 185), "Trachea": (-850, -850), "GTVp": (52, 118), "GTVnd": (50, 108),
}


def _expanded_oar_shapes() -> list[tuple[str, tuple[Shape, ...]]]:
    out = []
    for name, shapes in _OAR_SHAPES:
        if name.endswith("_L"):
            out.append((name, shapes))
            out.append((name[:-1] + "R", tuple(_mirror(s) for s in shapes)))
        else:
            out.append((name, shapes))
    return out


def _class_hu() -> np.ndarray:
    """(55, 2) HU per class, plain and contrast: that of the class's most specific structure."""
    table = np.zeros((S.NUM_CLASSES + 1, 2), dtype=np.float32)
    for label, region in enumerate(S.CLASS_REGIONS[1:], start=1):
        specific = min(region, key=lambda n: (len(S.OAR_CLASSES[n]), -S.get(n).index))
        stem = specific[:-2] if S.get(specific).laterality else specific
        table[label] = _STRUCTURE_HU[stem]
    return table


# --------------------------------------------------------------------------------------------
# Painting
# --------------------------------------------------------------------------------------------

_CHUNK_VOXELS = 2_000_000


def _each_region(grid: Grid, placement: Placement, shapes: tuple[Shape, ...]):
    """Yield (box, inside) for each shape, evaluated only over its bounding box, in slabs of slices."""
    for shape in shapes:
        lo, hi = placement.bounds(shape)
        box = grid.index_box(lo, hi)
        if box is None:
            continue
        plane = (box[1].stop - box[1].start) * (box[2].stop - box[2].start)
        step = max(1, _CHUNK_VOXELS // max(plane, 1))
        for z0 in range(box[0].start, box[0].stop, step):
            sub = (slice(z0, min(z0 + step, box[0].stop)), box[1], box[2])
            q = placement.to_frame(grid.points(sub))
            yield sub, placement.inside(shape, q)


def _paint_oars(grid: Grid, placement: Placement) -> np.ndarray:
    """The 54-class label map of the placed anatomy (see the module docstring for the rule)."""
    keys = np.zeros(grid.shape, dtype=np.uint64)
    index = {s.name: s.index for s in S.OARS}
    for name, shapes in _expanded_oar_shapes():
        keep = np.uint64(sum(1 << index[o] for o in S.OAR_NAMES if S.overlaps(name, o)))
        add = np.uint64((1 << index[name]) | sum(1 << index[o] for o in S.OAR_NAMES if S.contains(o, name)))
        for box, inside in _each_region(grid, placement, shapes):
            region = keys[box]
            region[inside] = (region[inside] & keep) | add
    labelmap, _ = S.labels_from_keys(keys, on_conflict="error")
    return labelmap


def _paint_tissues(grid: Grid, placement: Placement) -> np.ndarray:
    """Index into ``_TISSUE_HU`` per voxel (air outside the body), plus the patient table."""
    names = list(_TISSUE_HU)
    tissue = np.zeros(grid.shape, dtype=np.uint8)  # 0 = air
    for name, shapes in _TISSUE_SHAPES:
        code = names.index(name)
        for box, inside in _each_region(grid, placement, shapes):
            tissue[box][inside] = code
    # the couch: a slab just behind the patient's back, fixed in the room (it does not move with the patient)
    top = 126.0 * placement.scale[1]
    thickness = max(8.0 * placement.scale[1], 2.0 * float(grid.physical_spacing()[1]))
    box = grid.index_box(np.array([-1e4, top, -1e4]), np.array([1e4, top + thickness, 1e4]))
    if box is not None:
        y = grid.points(box)[1]
        tissue[box][(y >= top) & (y <= top + thickness)] = names.index("table")
    return tissue


def _gtv_shapes(rng: np.random.Generator) -> dict[str, tuple[Shape, ...]]:
    """A primary tumour on the posterior nasopharyngeal wall and one to three neck nodes."""
    cx, cy, cz = rng.uniform(-6, 6), rng.uniform(-6, 0), rng.uniform(2, 10)
    r = rng.uniform(9, 14)
    primary = (Ellipsoid((cx, cy, cz), (r, r * rng.uniform(0.7, 1.0), r * rng.uniform(0.8, 1.2))),
               Ellipsoid((cx + rng.uniform(-5, 5), cy + 3, cz - r * 0.5), (r * 0.6, r * 0.6, r * 0.7)))
    nodes = []
    sides = rng.permutation([1.0, -1.0])
    for n in range(int(rng.integers(1, 4))):
        side = sides[n % 2]
        rr = rng.uniform(6, 10)
        nodes.append(Ellipsoid((side * rng.uniform(36, 44), rng.uniform(-4, 6), -40.0 - 24.0 * n - rng.uniform(0, 8)),
                               (rr, rr * 0.9, rr * 1.2)))
    return {"GTVp": primary, "GTVnd": tuple(nodes)}


def _paint_gtvs(grid: Grid, placement: Placement, shapes: dict[str, tuple[Shape, ...]]) -> np.ndarray:
    """Task 2 label map: 1 GTVp, 2 GTVnd."""
    lm = np.zeros(grid.shape, dtype=np.uint8)
    for s in S.GTVS:
        for box, inside in _each_region(grid, placement, shapes[s.name]):
            lm[box][inside] = s.label
    return lm


@dataclass(frozen=True)
class Scanner:
    """How a CT was acquired and reconstructed: calibration offset, blur and noise (HU, mm).

    The default is the phantom's one scanner (0.7 mm blur, noise 14 HU plain / 12 HU contrast); the
    demo's training cohort draws others (``Scanner.draw``) so that the model meets the spread of CT
    numbers, sharpness and noise that real scanners and kernels give.
    """

    offset_hu: float = 0.0
    blur_mm: float = 0.7
    noise_hu: float | None = None  # None: 14 HU plain, 12 HU contrast

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "Scanner":
        """A random scanner: offset -25..25 HU, blur 0.4..1.4 mm, noise 5..30 HU."""
        return cls(float(rng.uniform(-25, 25)), float(rng.uniform(0.4, 1.4)), float(rng.uniform(5, 30)))


def _render_ct(grid: Grid, placement: Placement, labelmap: np.ndarray, gtv: np.ndarray, contrast: bool,
               rng: np.random.Generator, scanner: Scanner = Scanner()) -> np.ndarray:
    """CT numbers (int16) from tissues, classes and tumours, with partial-volume blur and noise."""
    column = 1 if contrast else 0
    tissue_hu = np.array([v[column] for v in _TISSUE_HU.values()], dtype=np.float32)
    hu = tissue_hu[_paint_tissues(grid, placement)]
    class_hu = _class_hu()[:, column]
    organ = labelmap > 0
    hu[organ] = class_hu[labelmap[organ]]
    for s in S.GTVS:
        hu[gtv == s.label] = _STRUCTURE_HU[s.name][column]
    hu = ndimage.gaussian_filter(hu, sigma=[scanner.blur_mm / sp for sp in grid.spacing], mode="nearest", truncate=2.5)
    noise = scanner.noise_hu if scanner.noise_hu is not None else (12.0 if contrast else 14.0)
    hu += rng.normal(0.0, noise, size=hu.shape).astype(np.float32)
    if scanner.offset_hu:
        hu += np.float32(scanner.offset_hu)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16)


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass
class PhantomCase:
    """One phantom patient: both CTs, the 54-class map and the Task 2 map (on the CT grid)."""

    case_id: str
    ct: sitk.Image
    contrast_ct: sitk.Image
    labelmap: np.ndarray  # 54 classes, z, y, x, on the CT grid
    gtv_labelmap: np.ndarray  # 1 GTVp, 2 GTVnd, on the CT grid
    info: dict = field(default_factory=dict)

    def oar_masks(self) -> S.StructureMasks:
        """The 45 overlapping OAR masks (recomposed from the 54-class map)."""
        return S.recompose(self.labelmap)

    def gtv_masks(self) -> dict[str, np.ndarray]:
        """GTVp and GTVnd masks."""
        return S.recompose_gtv(self.gtv_labelmap)

    def label_image(self, array: np.ndarray) -> sitk.Image:
        """A mask or label map of this case as an image on the CT grid."""
        return uint8_image(array, self.ct)


def _direction(direction: str | np.ndarray) -> np.ndarray:
    if isinstance(direction, str):
        if direction not in DIRECTIONS:
            raise InputError(f"Unknown phantom direction {direction!r}; choose one of {', '.join(DIRECTIONS)}.")
        return DIRECTIONS[direction]
    d = np.asarray(direction, float).reshape(3, 3)
    if not np.allclose(d @ d.T, np.eye(3), atol=1e-6):
        raise InputError("A phantom direction matrix must be orthonormal.")
    return d


CONTRAST_MODES = ("same", "shifted", "resampled")


def full_size_grid(spacing: tuple[float, float, float]) -> GridSpec:
    """The full-size field of view (378 x 276 x 276 mm) at another spacing (z, y, x mm): the same anatomy
    as the ``full`` phantom, rendered for thinner slices, coarser pixels or directly at a network's spacing."""
    shape = tuple(max(1, int(round(float(f) / s))) for f, s in zip(_REFERENCE_FOV, spacing))
    return GridSpec(shape, tuple(float(s) for s in spacing))


def make_case(index: int, seed: int = 0, size: str | GridSpec = "small", direction: str | np.ndarray = "identity",
              contrast: str = "same", scanner: Scanner = Scanner()) -> PhantomCase:
    """Phantom case ``index`` of cohort ``seed``: deterministic for (seed, index, size, direction, contrast, scanner).

    ``size``: a name of ``SIZES`` or a ``GridSpec`` (``full_size_grid``); only ``small`` compresses the
    anatomy and keeps its structures at least about two voxels thick, any other grid holds the
    full-size anatomy scaled to its field of view.
    ``contrast``: ``same`` puts the contrast CT on the CT grid, pre-aligned like the release;
    ``shifted`` moves the patient between the scans (known rigid motion, recorded in ``info``);
    ``resampled`` writes the aligned contrast CT on a different grid (spacing, extent and origin).
    ``scanner``: the CT numbers' offset, blur and noise (both CTs).
    """
    if not isinstance(size, GridSpec) and size not in SIZES:
        raise InputError(f"Unknown phantom size {size!r}; choose one of {', '.join(SIZES)}.")
    if contrast not in CONTRAST_MODES:
        raise InputError(f"Unknown contrast mode {contrast!r}; choose one of {', '.join(CONTRAST_MODES)}.")
    spec = size if isinstance(size, GridSpec) else SIZES[size]
    rng = np.random.default_rng([seed, index])
    grid = Grid.centred(spec, _direction(direction))
    fov_scale = (np.array(spec.shape) * np.array(spec.spacing) / _REFERENCE_FOV)[::-1]  # x, y, z
    scale = fov_scale * rng.uniform(0.94, 1.06, size=3)
    min_half = np.maximum(grid.physical_spacing() * np.array([1.2, 1.2, 0.9]), 0.0)
    if size != "small":
        min_half = np.zeros(3)
    rotation = _rotation("z", rng.uniform(-4, 4)) @ _rotation("x", rng.uniform(-3, 3))
    shift = np.array([rng.uniform(-5, 5), rng.uniform(-5, 5), rng.uniform(-6, 6)]) * fov_scale
    placement = Placement(scale, rotation, shift, min_half)
    gtv_shapes = _gtv_shapes(rng)

    labelmap = _paint_oars(grid, placement)
    gtv = _paint_gtvs(grid, placement, gtv_shapes)
    ct = grid.image(_render_ct(grid, placement, labelmap, gtv, False, rng, scanner))
    size_info = size if isinstance(size, str) else {"shape": list(spec.shape), "spacing": list(spec.spacing)}
    info = {"seed": seed, "index": index, "size": size_info, "contrast": contrast, "scanner": asdict(scanner),
            "direction": grid.direction.ravel().tolist(), "scale": scale.tolist(), "shift_mm": shift.tolist()}

    if contrast == "same":
        contrast_ct = grid.image(_render_ct(grid, placement, labelmap, gtv, True, rng, scanner))
    else:
        if contrast == "shifted":
            motion_rot = _rotation("z", 3.0) @ _rotation("x", -2.0)
            motion_shift = np.array([4.0, -3.0, 6.0])
            ce_grid = grid
        else:
            motion_rot, motion_shift = np.eye(3), np.zeros(3)
            ce_spec = GridSpec(tuple(int(round(n * 0.9)) for n in spec.shape),
                               (spec.spacing[0] * 0.85, spec.spacing[1] * 1.2, spec.spacing[2] * 1.2))
            ce_grid = Grid.centred(ce_spec, grid.direction, centre=(3.0, -2.0, 4.0))
        moved = Placement(scale, motion_rot @ rotation, motion_rot @ shift + motion_shift, min_half)
        ce_labels = _paint_oars(ce_grid, moved)
        ce_gtv = _paint_gtvs(ce_grid, moved, gtv_shapes)
        contrast_ct = ce_grid.image(_render_ct(ce_grid, moved, ce_labels, ce_gtv, True, rng, scanner))
        # contrast patient point = motion_rot @ ct patient point + motion_shift
        info["contrast_motion"] = {"rotation": motion_rot.ravel().tolist(), "translation_mm": motion_shift.tolist()}
    return PhantomCase(case_id=f"segrap_{index:04d}", ct=ct, contrast_ct=contrast_ct, labelmap=labelmap,
                       gtv_labelmap=gtv, info=info)


# --------------------------------------------------------------------------------------------
# The release layout on disk
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CasePaths:
    """Where one case's files lie in the SegRap release layout under ``root``."""

    root: Path
    case_id: str

    @property
    def folder(self) -> Path:
        return self.root / CASES_DIR / self.case_id

    @property
    def ct(self) -> Path:
        return self.folder / "image.nii.gz"

    @property
    def contrast_ct(self) -> Path:
        return self.folder / "image_contrast.nii.gz"

    def structure(self, name: str) -> Path:
        """The mask file of a structure (any spelling), named with its SegRap name."""
        return self.folder / f"{S.get(name).name}.nii.gz"

    @property
    def task001(self) -> Path:
        return self.root / ONEHOT_DIR / "Task001" / f"{self.case_id}.nii.gz"

    @property
    def task002(self) -> Path:
        return self.root / ONEHOT_DIR / "Task002" / f"{self.case_id}.nii.gz"


def _write_image(image: sitk.Image, path: Path) -> None:
    sitk.WriteImage(image, str(path), useCompression=True)


def write_case(case: PhantomCase, root: str | Path) -> CasePaths:
    """Write a case in the release layout; files appear only when complete (temp name, then rename)."""
    paths = CasePaths(Path(root), case.case_id)
    paths.folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{case.case_id}.", dir=paths.folder.parent))
    try:
        _write_image(case.ct, tmp / paths.ct.name)
        _write_image(case.contrast_ct, tmp / paths.contrast_ct.name)
        masks = case.oar_masks()
        for name in S.OAR_NAMES:
            _write_image(case.label_image(masks[name]), tmp / paths.structure(name).name)
        for name, mask in case.gtv_masks().items():
            _write_image(case.label_image(mask), tmp / paths.structure(name).name)
        (tmp / "phantom.json").write_text(json.dumps({"case_id": case.case_id, **case.info}, indent=1))
        for target, labels in ((paths.task001, case.labelmap), (paths.task002, case.gtv_labelmap)):
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(f".{target.name}.part.nii.gz")
            _write_image(case.label_image(labels), part)
            os.replace(part, target)
        if paths.folder.exists():
            shutil.rmtree(paths.folder)
        os.replace(tmp, paths.folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return paths


def write_cohort(out: str | Path, cases: int, seed: int = 0, size: str = "small", direction: str = "identity",
                 contrast: str = "same", first: int = 0) -> list[CasePaths]:
    """Write ``cases`` phantom cases (indices first..first+cases-1) under ``out``."""
    if cases < 1:
        raise InputError(f"--cases must be at least 1, got {cases}.")
    return [write_case(make_case(i, seed, size, direction, contrast), out) for i in range(first, first + cases)]
