"""The 47 SegRap structures (45 OARs, GTVp, GTVnd) and the exact 45 <-> 54 class decomposition.

Everything about a structure that other modules need (names, colors, codes, laterality, NSD
tolerance) is written once here; the 54 training classes, their names, the containment and
overlap relations and the left/right permutations are all derived from the one table of
``OAR_CLASSES`` (SEGRAP.md), so they can never disagree.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ..arrays import CroppedMasks
from ..errors import DecompositionConflictError, InputError, StructureNameError

# --------------------------------------------------------------------------------------------
# Codes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Code:
    """A coded concept (DICOM code sequence item): scheme designator, value, meaning."""

    scheme: str
    value: str
    meaning: str


def _sct(value: str, meaning: str) -> Code:
    return Code("SCT", value, meaning)


ANATOMICAL_STRUCTURE = _sct("123037004", "Anatomical Structure")
MORPHOLOGICALLY_ALTERED = _sct("49755003", "Morphologically Altered Structure")
LEFT = _sct("7771000", "Left")
RIGHT = _sct("24028007", "Right")

# --------------------------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------------------------

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Structure:
    """One contoured structure: how it is named, shown, coded and evaluated."""

    name: str  # SegRap name, as in the release files
    index: int  # channel in its task's official 4D output (0-based)
    task: str  # "oar" (Task 1, plain CT) or "gtv" (Task 2, contrast CT)
    tg263: str  # TG-263 name, or the project's TG-263-style proposal (see tg263_standard)
    tg263_standard: bool  # False where TG-263 has no name and tg263 is a proposal
    display_name: str
    color: RGB
    category: Code
    type: Code
    modifier: Code | None  # laterality modifier for paired structures
    region: Code | None  # anatomic region (tumor volumes)
    rt_type: str  # RTROIInterpretedType: ORGAN or GTV
    laterality: str | None  # "L", "R" or None
    nsd_tolerance_mm: float
    group: str  # anatomical region for grouping in user interfaces
    single_component: bool  # an organ made of one connected piece (post-processing may keep one)
    aliases: tuple[str, ...] = field(default=())

    @property
    def label(self) -> int | None:
        """Value in the task's label map: GTVp=1, GTVnd=2; OARs have no single value (see classes)."""
        return self.index + 1 if self.task == "gtv" else None

    @property
    def partner(self) -> str | None:
        """The SegRap name of the same organ on the other side, for paired structures."""
        if self.laterality is None:
            return None
        return self.name[:-1] + ("R" if self.laterality == "L" else "L")

    @property
    def spellings(self) -> tuple[str, ...]:
        """Every known spelling: SegRap name, TG-263 name, display name and the aliases."""
        return (self.name, self.tg263, self.display_name, *self.aliases)


@dataclass(frozen=True)
class _OarRow:
    base: str  # SegRap name without side suffix
    tg263: str  # TG-263 name without side suffix
    tg263_standard: bool
    display: str  # display name; for pairs "Left ..."/"Right ..." is prepended
    code: Code
    colors: tuple[RGB, ...]  # one color, or (left, right)
    group: str
    single_component: bool
    aliases: tuple[str, ...] = ()  # for pairs: without side suffix; "_L"/"_R" is appended
    tolerance_mm: float = 1.0


def _paired(row: _OarRow) -> bool:
    return len(row.colors) == 2


# The 45 OARs in official order (pairs expand to _L then _R). Codes from SEGRAP.md.
_OAR_ROWS: tuple[_OarRow, ...] = (
    _OarRow("Brain", "Brain", True, "Brain", _sct("12738006", "Brain"), ((250, 250, 225),), "Brain", True),
    _OarRow("BrainStem", "Brainstem", True, "Brainstem", _sct("15926001", "Brainstem"),
            ((200, 130, 60),), "Brain", True, ("Brain_Stem", "Brain stem")),
    _OarRow("Chiasm", "OpticChiasm", True, "Optic chiasm", _sct("244453006", "Optic chiasm"),
            ((255, 235, 0),), "Eyes and optic pathway", True, ("Optic_Chiasm",)),
    _OarRow("TemporalLobe", "Lobe_Temporal", True, "temporal lobe", _sct("78277001", "Temporal lobe"),
            ((240, 150, 200), (170, 110, 230)), "Brain", True, ("Temporal_Lobe",)),
    _OarRow("Hippocampus", "Hippocampus", True, "hippocampus", _sct("5366008", "Hippocampus"),
            ((230, 70, 60), (140, 30, 40)), "Brain", True),
    _OarRow("Eye", "Eye", True, "eye", _sct("81745001", "Eye"),
            ((130, 210, 255), (40, 110, 220)), "Eyes and optic pathway", True, ("Globe",)),
    _OarRow("Lens", "Lens", True, "lens", _sct("78076003", "Lens"),
            ((0, 255, 230), (0, 170, 140)), "Eyes and optic pathway", True, ("Len",)),
    _OarRow("OpticNerve", "OpticNrv", True, "optic nerve", _sct("18234004", "Optic nerve"),
            ((255, 190, 80), (190, 150, 0)), "Eyes and optic pathway", True, ("Optic_Nerve",)),
    _OarRow("MiddleEar", "Ear_Middle", True, "middle ear", _sct("25342003", "Middle ear"),
            ((120, 200, 120), (40, 130, 60)), "Ear", False, ("Middle_Ear",)),
    _OarRow("IAC", "Canal_IAC", False, "internal auditory canal", _sct("361078006", "Internal auditory canal"),
            ((250, 120, 250), (180, 40, 180)), "Ear", True, ("Internal_Auditory_Canal",)),
    _OarRow("TympanicCavity", "Cavity_Tymp", False, "tympanic cavity", _sct("51837005", "Tympanic cavity"),
            ((255, 160, 122), (205, 92, 70)), "Ear", False, ("Tympanic_Cavity",)),
    _OarRow("VestibulSemi", "Ear_VestSemi", False, "vestibule and semicircular canals",
            _sct("22945000", "Inner ear"), ((160, 160, 255), (90, 90, 200)), "Ear", False,
            ("VestibularSemicircular", "Vestibule_Semicircular")),
    _OarRow("Cochlea", "Cochlea", True, "cochlea", _sct("80169004", "Cochlea"),
            ((255, 255, 140), (210, 210, 60)), "Ear", True),
    _OarRow("ETbone", "EustTube_Bony", False, "bony Eustachian tube", _sct("91207004", "Pharyngotympanic tube"),
            ((200, 255, 80), (120, 180, 0)), "Ear", False, ("ET_bone", "EustachianTube")),
    _OarRow("Pituitary", "Pituitary", True, "Pituitary gland", _sct("56329008", "Pituitary"),
            ((255, 100, 150),), "Brain", True, ("Pituitary_Gland", "Hypophysis")),
    _OarRow("OralCavity", "Cavity_Oral", True, "Oral cavity", _sct("74262004", "Oral cavity"),
            ((190, 80, 120),), "Oral cavity and glands", True, (), 3.0),
    _OarRow("Mandible", "Bone_Mandible", False, "mandible", _sct("91609006", "Mandible"),
            ((230, 220, 190), (180, 165, 130)), "Oral cavity and glands", True),
    _OarRow("Submandibular", "Glnd_Submand", True, "submandibular gland", _sct("54019009", "Submandibular gland"),
            ((150, 100, 60), (100, 60, 30)), "Oral cavity and glands", True, ("Submandibular_Gland", "SMG")),
    _OarRow("Parotid", "Parotid", True, "parotid gland", _sct("45289007", "Parotid gland"),
            ((255, 140, 0), (210, 90, 0)), "Oral cavity and glands", True, ("Parotid_Gland", "Glnd_Parotid")),
    _OarRow("Mastoid", "Bone_Mastoid", True, "mastoid", _sct("59066005", "Mastoid bone"),
            ((200, 200, 240), (120, 120, 160)), "Ear", False),
    _OarRow("TMjoint", "Joint_TM", True, "temporomandibular joint", _sct("53620006", "Temporomandibular joint"),
            ((100, 220, 220), (30, 140, 160)), "Oral cavity and glands", True, ("TMJ",)),
    _OarRow("SpinalCord", "SpinalCord", True, "Spinal cord", _sct("2748008", "Spinal cord"),
            ((240, 220, 80),), "Neck", True, ("Spinal_Cord", "Cord")),
    _OarRow("Esophagus", "Esophagus", True, "Esophagus", _sct("32849002", "Esophagus"),
            ((210, 150, 140),), "Neck", True, ("Oesophagus",)),
    _OarRow("Larynx", "Larynx", True, "Larynx", _sct("4596009", "Larynx"),
            ((100, 150, 200),), "Neck", True, (), 2.0),
    _OarRow("Larynx_Glottic", "Glottis", True, "Glottis", _sct("1307006", "Glottis"),
            ((0, 90, 180),), "Neck", True, ("Larynx_Glottis", "Glottic_Larynx")),
    _OarRow("Larynx_Supraglot", "Larynx_SG", True, "Supraglottis", _sct("119255006", "Supraglottis"),
            ((200, 230, 255),), "Neck", True, ("Larynx_Supraglottic", "Supraglottic_Larynx")),
    _OarRow("PharynxConst", "Musc_Constrict", True, "Pharyngeal constrictor muscle",
            _sct("4866005", "Constrictor muscle of pharynx"), ((250, 60, 100),), "Neck", False,
            ("PharynxCont", "PharynxConstr", "Pharynx_Constrictor", "PharynxConstrictor", "Musc_Constrict_Phar")),
    _OarRow("Thyroid", "Glnd_Thyroid", True, "Thyroid gland", _sct("69748006", "Thyroid"),
            ((150, 0, 80),), "Neck", False, ("Thyroid_Gland",)),
    _OarRow("Trachea", "Trachea", True, "Trachea", _sct("44567001", "Trachea"),
            ((80, 220, 160),), "Neck", True),
)


def _expand_oars() -> tuple[Structure, ...]:
    out: list[Structure] = []
    for row in _OAR_ROWS:
        sides = (("L", LEFT, "Left"), ("R", RIGHT, "Right")) if _paired(row) else ((None, None, None),)
        for (side, modifier, word), color in zip(sides, row.colors):
            suffix = f"_{side}" if side else ""
            display = f"{word} {row.display}" if side else row.display
            aliases = tuple(a + suffix for a in row.aliases)
            if side:  # "Parotid L", "L_Parotid", "Parotid_Left" are common in clinics
                aliases += (f"{side}_{row.base}", f"{row.base}_{word}", f"{word}_{row.base}")
            out.append(Structure(
                name=row.base + suffix, index=len(out), task="oar", tg263=row.tg263 + suffix,
                tg263_standard=row.tg263_standard, display_name=display, color=color,
                category=ANATOMICAL_STRUCTURE, type=row.code, modifier=modifier, region=None,
                rt_type="ORGAN", laterality=side, nsd_tolerance_mm=row.tolerance_mm, group=row.group,
                single_component=row.single_component, aliases=aliases))
    return tuple(out)


OARS: tuple[Structure, ...] = _expand_oars()

GTVS: tuple[Structure, ...] = (
    Structure("GTVp", 0, "gtv", "GTVp", True, "Primary tumor (GTVp)", (255, 0, 0), MORPHOLOGICALLY_ALTERED,
              _sct("86049000", "Neoplasm, Primary"), None, _sct("360955006", "Nasopharynx"), "GTV", None, 1.0,
              "Tumor", False, ("GTV_p", "GTV_primary", "GTV")),
    Structure("GTVnd", 1, "gtv", "GTVn", True, "Nodal tumor (GTVnd)", (0, 0, 255), MORPHOLOGICALLY_ALTERED,
              _sct("14799000", "Neoplasm, Secondary"), None, _sct("81105003", "Cervical lymph node"), "GTV", None,
              1.0, "Tumor", False, ("GTV_nd", "GTV_node", "GTV_nodal", "GTVln")),
)

STRUCTURES: tuple[Structure, ...] = OARS + GTVS
OAR_NAMES: tuple[str, ...] = tuple(s.name for s in OARS)
GTV_NAMES: tuple[str, ...] = tuple(s.name for s in GTVS)
STRUCTURE_NAMES: tuple[str, ...] = OAR_NAMES + GTV_NAMES


def _spelling_key(name: str) -> str:
    """Case-, space-, hyphen- and underscore-insensitive form used for lookups."""
    return re.sub(r"[\s_\-]+", "", name).lower()


def _build_lookup() -> dict[str, Structure]:
    table: dict[str, Structure] = {}
    for s in STRUCTURES:
        for spelling in s.spellings:
            key = _spelling_key(spelling)
            other = table.setdefault(key, s)
            if other is not s:
                raise AssertionError(f"spelling {spelling!r} names both {other.name} and {s.name}")
    return table


_LOOKUP = _build_lookup()


def get(name: str) -> Structure:
    """The structure a name denotes, in any known spelling (SegRap, TG-263, display, aliases)."""
    found = _LOOKUP.get(_spelling_key(str(name)))
    if found is not None:
        return found
    close = difflib.get_close_matches(_spelling_key(str(name)), list(_LOOKUP), n=5, cutoff=0.6)
    suggestions = list(dict.fromkeys(_LOOKUP[c].name for c in close))
    hint = f" Closest matches: {', '.join(suggestions)}." if suggestions else ""
    raise StructureNameError(
        f"Unknown structure name {name!r}.{hint} Known names are the 47 SegRap names "
        f"(for example {OAR_NAMES[0]}, Parotid_L, GTVp), their TG-263 names or display names.")


def select(names: list[str] | tuple[str, ...] | None, task: str | None = None) -> tuple[Structure, ...]:
    """Structures for a user's list of names (any spelling), in catalogue order; None means all."""
    pool = STRUCTURES if task is None else tuple(s for s in STRUCTURES if s.task == task)
    if names is None:
        return pool
    wanted = {get(n).name for n in names}
    return tuple(s for s in pool if s.name in wanted)


# --------------------------------------------------------------------------------------------
# The 54 non-overlapping classes of Task 1 (SEGRAP.md), and everything derived from them
# --------------------------------------------------------------------------------------------

# Each OAR as the union of training classes, exactly the table of SEGRAP.md.
OAR_CLASSES: dict[str, tuple[int, ...]] = {
    "Brain": (1, 2, 3, 4, 5, 6, 7, 8, 9), "BrainStem": (2,), "Chiasm": (3,),
    "TemporalLobe_L": (4, 6), "TemporalLobe_R": (5, 7),
    "Hippocampus_L": (8, 6), "Hippocampus_R": (9, 7),
    "Eye_L": (10, 12), "Eye_R": (11, 13), "Lens_L": (12,), "Lens_R": (13,),
    "OpticNerve_L": (14,), "OpticNerve_R": (15,),
    "MiddleEar_L": (18, 16, 20, 24, 28, 30), "MiddleEar_R": (19, 17, 21, 25, 29, 31),
    "IAC_L": (18,), "IAC_R": (19,),
    "TympanicCavity_L": (22, 20), "TympanicCavity_R": (23, 21),
    "VestibulSemi_L": (26, 24), "VestibulSemi_R": (27, 25),
    "Cochlea_L": (28,), "Cochlea_R": (29,),
    "ETbone_L": (32, 30), "ETbone_R": (33, 31),
    "Pituitary": (34,), "OralCavity": (35,),
    "Mandible_L": (36,), "Mandible_R": (37,),
    "Submandibular_L": (38,), "Submandibular_R": (39,),
    "Parotid_L": (40,), "Parotid_R": (41,),
    "Mastoid_L": (42,), "Mastoid_R": (43,),
    "TMjoint_L": (44,), "TMjoint_R": (45,),
    "SpinalCord": (46,), "Esophagus": (47,),
    "Larynx": (48, 49, 50, 51), "Larynx_Glottic": (49,), "Larynx_Supraglot": (50,),
    "PharynxConst": (51, 52), "Thyroid": (53,), "Trachea": (54,),
}
NUM_CLASSES = 54  # foreground classes; the label map also has 0 = background


def _class_regions() -> tuple[frozenset[str], ...]:
    regions: list[set[str]] = [set() for _ in range(NUM_CLASSES + 1)]
    for oar, labels in OAR_CLASSES.items():
        for label in labels:
            regions[label].add(oar)
    frozen = tuple(frozenset(r) for r in regions)
    if list(OAR_CLASSES) != list(OAR_NAMES):
        raise AssertionError("OAR_CLASSES must list the 45 OARs in official order")
    if any(not r for r in frozen[1:]) or len(set(frozen)) != len(frozen):
        raise AssertionError("each class must be covered by a distinct, non-empty set of OARs")
    return frozen


# CLASS_REGIONS[label] = the set of OARs that cover a voxel of that class (label 0: none).
CLASS_REGIONS: tuple[frozenset[str], ...] = _class_regions()


def contains(outer: str, inner: str) -> bool:
    """True if OAR ``outer`` contains OAR ``inner`` by definition (Eye_L contains Lens_L)."""
    a, b = set(OAR_CLASSES[get(outer).name]), set(OAR_CLASSES[get(inner).name])
    return a != b and b <= a


def overlaps(a: str, b: str) -> bool:
    """True if the two OARs may share voxels (they share a class)."""
    na, nb = get(a).name, get(b).name
    return na != nb and bool(set(OAR_CLASSES[na]) & set(OAR_CLASSES[nb]))


@lru_cache(maxsize=None)
def overlap_pairs() -> tuple[tuple[str, str], ...]:
    """Every unordered pair of OARs that may overlap, in catalogue order."""
    return tuple((a, b) for i, a in enumerate(OAR_NAMES) for b in OAR_NAMES[i + 1:] if overlaps(a, b))


def _class_name(region: frozenset[str]) -> str:
    """Name a class after the structures that cover it, leaving out the ones that contain others."""
    members = [n for n in OAR_NAMES if n in region]
    kept = [n for n in members if not any(contains(n, m) for m in members if m != n)]
    sides = {get(n).laterality for n in kept}
    if len(kept) == 1:
        return kept[0]
    side = sides.pop() if len(sides) == 1 else None
    stems = [n[:-2] if side else n for n in kept]
    return "_".join(stems) + (f"_{side}" if side else "")


# CLASS_NAMES[label]: "background", then e.g. "BrainStem", "TemporalLobe_Hippocampus_L", "Lens_L".
CLASS_NAMES: tuple[str, ...] = ("background",) + tuple(_class_name(r) for r in CLASS_REGIONS[1:])
GTV_CLASS_NAMES: tuple[str, ...] = ("background",) + GTV_NAMES


def class_labels() -> dict[str, int]:
    """The Task 1 label map's classes as nnU-Net's dataset.json ``labels`` (name -> value)."""
    return {name: value for value, name in enumerate(CLASS_NAMES)}


def gtv_class_labels() -> dict[str, int]:
    """The Task 2 label map's classes as nnU-Net's dataset.json ``labels`` (name -> value)."""
    return {name: value for value, name in enumerate(GTV_CLASS_NAMES)}


@lru_cache(maxsize=None)
def structure_mirror_permutation() -> tuple[int, ...]:
    """perm[i] = index of the structure that OAR i becomes under a left-right flip (partner or itself)."""
    index = {s.name: s.index for s in OARS}
    return tuple(index[s.partner] if s.partner else s.index for s in OARS)


@lru_cache(maxsize=None)
def class_mirror_permutation() -> tuple[int, ...]:
    """perm[label] = the class a voxel of ``label`` belongs to after a left-right flip (4 <-> 5, ...)."""
    by_region = {region: label for label, region in enumerate(CLASS_REGIONS)}
    mirrored = []
    for region in CLASS_REGIONS:
        flipped = frozenset(get(n).partner or n for n in region)
        mirrored.append(by_region[flipped])
    return tuple(mirrored)


# Bit k of a coverage key means "covered by OAR k"; 45 bits fit in uint64.
_CLASS_KEYS = np.array([sum(1 << get(n).index for n in r) for r in CLASS_REGIONS], dtype=np.uint64)
_KEY_ORDER = np.argsort(_CLASS_KEYS, kind="stable")
_SORTED_KEYS = _CLASS_KEYS[_KEY_ORDER]
_SORTED_LABELS = _KEY_ORDER.astype(np.uint8)
# _MEMBERSHIP[k, label] is True when class ``label`` is part of OAR k.
_MEMBERSHIP = np.zeros((len(OARS), NUM_CLASSES + 1), dtype=bool)
for _name, _labels in OAR_CLASSES.items():
    _MEMBERSHIP[get(_name).index, list(_labels)] = True

# --------------------------------------------------------------------------------------------
# recompose: 54-class label map -> 45 overlapping masks
# --------------------------------------------------------------------------------------------

Box = tuple[slice, ...]


class StructureMasks(CroppedMasks):
    """The 45 OAR masks of one label map, each held cropped to its bounding box (``arrays.CroppedMasks``).

    Indexing by any spelling gives the full-size boolean mask (allocated on demand); ``crop``
    gives the bounding box and the cropped mask, which is what memory-frugal consumers use.
    """

    def __getitem__(self, name: str) -> np.ndarray:
        return super().__getitem__(get(name).name)

    def __iter__(self) -> Iterator[str]:
        return iter(OAR_NAMES)

    def __len__(self) -> int:
        return len(OAR_NAMES)

    def crop(self, name: str) -> tuple[Box, np.ndarray]:
        """Bounding box (slices; empty for an empty structure) and the boolean mask inside it."""
        return super().crop(get(name).name)

    def voxel_count(self, name: str) -> int:
        """Number of voxels of a structure."""
        return int(np.count_nonzero(self.crop(name)[1]))

    def stack(self) -> np.ndarray:
        """All 45 masks as one (45, z, y, x) boolean array, in official order."""
        out = np.zeros((len(OARS), *self.shape), dtype=bool)
        for k, name in enumerate(OAR_NAMES):
            box, data = self.crop(name)
            out[k][box] = data
        return out


def _as_label_map(labelmap: np.ndarray, max_label: int, what: str) -> np.ndarray:
    """Validate an integer label map with values in 0..max_label and return it as uint8."""
    lm = np.asarray(labelmap)
    if lm.ndim != 3:
        raise InputError(f"{what} must be a 3D (z, y, x) label map, got shape {lm.shape}.")
    if not np.issubdtype(lm.dtype, np.integer):
        if np.issubdtype(lm.dtype, np.floating) and lm.size and np.array_equal(lm, np.round(lm)):
            lm = lm.astype(np.int64)
        else:
            raise InputError(f"{what} must hold integer labels, got {lm.dtype}.")
    if lm.size:
        low, high = lm.min(), lm.max()
        if low < 0 or high > max_label:
            raise InputError(
                f"{what} holds values {int(low)}..{int(high)}; expected 0..{max_label}. Is this the "
                f"right label map (Task 1 has 54 classes, Task 2 has 2)?")
    return lm if lm.dtype == np.uint8 else lm.astype(np.uint8)


def _union_box(boxes: list[Box | None], ndim: int) -> Box | None:
    present = [b for b in boxes if b is not None]
    if not present:
        return None
    return tuple(slice(min(b[d].start for b in present), max(b[d].stop for b in present)) for d in range(ndim))


def recompose(labelmap: np.ndarray) -> StructureMasks:
    """The 45 overlapping OAR masks of a 54-class label map, exactly per SEGRAP.md.

    One pass finds each class's bounding box; each OAR is then a lookup-table gather over the
    union of its classes' boxes only, so the cost follows the structures' size, not 45 volumes.
    """
    from scipy import ndimage  # here, not at the top: Slicer lists the catalogue without scipy installed

    lm = _as_label_map(labelmap, NUM_CLASSES, "The Task 1 label map")
    boxes = ndimage.find_objects(lm, max_label=NUM_CLASSES)
    empty = tuple(slice(0, 0) for _ in range(lm.ndim))
    crops: dict[str, tuple[Box, np.ndarray]] = {}
    for k, name in enumerate(OAR_NAMES):
        box = _union_box([boxes[label - 1] for label in OAR_CLASSES[name]], lm.ndim)
        if box is None:
            crops[name] = (empty, np.zeros((0,) * lm.ndim, dtype=bool))
        else:
            crops[name] = (box, _MEMBERSHIP[k][lm[box]])
    return StructureMasks(lm.shape, crops)


def recompose_gtv(labelmap: np.ndarray) -> dict[str, np.ndarray]:
    """GTVp and GTVnd masks of a Task 2 label map (1 = GTVp, 2 = GTVnd)."""
    lm = _as_label_map(labelmap, len(GTVS), "The Task 2 label map")
    return {s.name: lm == s.label for s in GTVS}


# --------------------------------------------------------------------------------------------
# decompose: 45 masks -> 54-class label map, with conflicts reported
# --------------------------------------------------------------------------------------------

CONFLICT_POLICIES = ("error", "nearest", "background")


@dataclass(frozen=True)
class Conflict:
    """Voxels covered by a combination of OARs that no class represents."""

    structures: tuple[str, ...]
    voxels: int
    bbox: tuple[tuple[int, int], ...]  # inclusive (first, last) index per axis, z, y, x
    example: tuple[int, ...]  # one such voxel (z, y, x)
    resolved_to: int | None = None  # class the voxels were given (None when the policy is "error")

    def describe(self) -> str:
        """One line for logs and reports."""
        where = ", ".join(f"{ax} {a}-{b}" for ax, (a, b) in zip("zyx", self.bbox))
        combo = " + ".join(self.structures)
        text = f"{combo}: {self.voxels} voxels in {where} (e.g. voxel z,y,x = {self.example})"
        if self.resolved_to is not None:
            text += f" -> class {self.resolved_to} ({CLASS_NAMES[self.resolved_to]})"
        return text


def _mask_stack_items(masks) -> list[tuple[int, Box | None, np.ndarray]]:
    """(OAR index, box, cropped mask) for each of the 45 OARs of a mapping or a (45, ...) array."""
    if isinstance(masks, StructureMasks):
        return [(k, *masks.crop(n)) for k, n in enumerate(OAR_NAMES)]
    if isinstance(masks, np.ndarray):
        if masks.ndim != 4 or masks.shape[0] != len(OARS):
            raise InputError(f"A mask stack must have shape (45, z, y, x), got {masks.shape}.")
        return [(k, None, masks[k]) for k in range(len(OARS))]
    if not isinstance(masks, Mapping):
        raise InputError("decompose takes a mapping of OAR name -> mask or a (45, z, y, x) array.")
    by_name: dict[str, np.ndarray] = {}
    for key, value in masks.items():
        s = get(key)
        if s.task != "oar":
            raise InputError(f"{key!r} is a Task 2 structure; the 54-class decomposition covers the 45 OARs only.")
        if s.name in by_name:
            raise InputError(f"{s.name} is given twice (as {key!r} and another spelling).")
        by_name[s.name] = np.asarray(value)
    missing = [n for n in OAR_NAMES if n not in by_name]
    if missing:
        raise InputError(f"decompose needs all 45 OAR masks; missing: {', '.join(missing)}. "
                         f"Pass an empty mask for a structure that is absent.")
    return [(get(n).index, None, by_name[n]) for n in OAR_NAMES]


def coverage_keys(masks) -> np.ndarray:
    """A uint64 volume whose bit k is set where OAR k's mask is set."""
    items = _mask_stack_items(masks)
    if isinstance(masks, StructureMasks):
        shape = masks.shape
    else:
        shape = masks.shape[1:] if isinstance(masks, np.ndarray) else items[0][2].shape
    keys = np.zeros(shape, dtype=np.uint64)
    for k, box, mask in items:
        if box is None and mask.shape != tuple(shape):
            raise InputError(f"Mask of {OAR_NAMES[k]} has shape {mask.shape}, expected {tuple(shape)} "
                             f"like {OAR_NAMES[0]}; all masks must be on one grid.")
        region = keys if box is None else keys[box]
        np.bitwise_or(region, np.uint64(1 << k), out=region, where=mask.astype(bool, copy=False))
    return keys


def _nearest_class(key: int) -> int:
    """Class with the smallest symmetric difference to a key; ties keep more structures, then lower label."""
    def cost(label: int) -> tuple[int, int, int]:
        ck = int(_CLASS_KEYS[label])
        return (bin(ck ^ key).count("1"), -bin(ck & key).count("1"), label)
    return min(range(NUM_CLASSES + 1), key=cost)


def _key_names(key: int) -> tuple[str, ...]:
    return tuple(n for k, n in enumerate(OAR_NAMES) if key >> k & 1)


def labels_from_keys(keys: np.ndarray, on_conflict: str = "error") -> tuple[np.ndarray, list[Conflict]]:
    """The 54-class label map of a coverage-key volume, and the conflicts found (see ``decompose``)."""
    if on_conflict not in CONFLICT_POLICIES:
        raise ValueError(f"on_conflict must be one of {CONFLICT_POLICIES}, got {on_conflict!r}")
    pos = np.searchsorted(_SORTED_KEYS, keys)
    np.minimum(pos, len(_SORTED_KEYS) - 1, out=pos)
    labelmap = _SORTED_LABELS[pos]
    invalid = _SORTED_KEYS[pos] != keys
    del pos
    conflicts: list[Conflict] = []
    if invalid.any():
        flat = np.flatnonzero(invalid)
        unique, inverse, counts = np.unique(keys.ravel()[flat], return_inverse=True, return_counts=True)
        order = np.argsort(inverse, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        for u, (key, count, start) in enumerate(zip(unique.tolist(), counts.tolist(), starts.tolist())):
            coords = np.unravel_index(flat[order[start:start + count]], keys.shape)
            resolved = None
            if on_conflict == "nearest":
                resolved = _nearest_class(int(key))
            elif on_conflict == "background":
                resolved = 0
            conflicts.append(Conflict(
                structures=_key_names(int(key)), voxels=int(count),
                bbox=tuple((int(c.min()), int(c.max())) for c in coords),
                example=tuple(int(c[0]) for c in coords), resolved_to=resolved))
            if resolved is not None:
                labelmap.ravel()[flat[order[start:start + count]]] = resolved
        conflicts.sort(key=lambda c: -c.voxels)
        if on_conflict == "error":
            lines = "\n  ".join(c.describe() for c in conflicts[:20])
            more = f"\n  ... and {len(conflicts) - 20} more combinations" if len(conflicts) > 20 else ""
            raise DecompositionConflictError(
                f"{int(counts.sum())} voxels are covered by combinations of structures that none of the 54 "
                f"classes represents:\n  {lines}{more}\nFix the contours, or choose on_conflict='nearest' "
                f"(closest valid class) or 'background' (drop those voxels).", conflicts)
    return labelmap, conflicts


def decompose_with_conflicts(masks, on_conflict: str = "error") -> tuple[np.ndarray, list[Conflict]]:
    """The 54-class label map of 45 OAR masks, and every voxel combination that matches no class.

    ``on_conflict``: ``"error"`` (default) raises DecompositionConflictError naming each combination;
    ``"nearest"`` gives such voxels the class whose structure set differs least (ties keep more of
    the annotated structures, then the lower label); ``"background"`` gives them label 0.
    """
    return labels_from_keys(coverage_keys(masks), on_conflict)


def decompose(masks, on_conflict: str = "error") -> np.ndarray:
    """The 54-class label map (uint8, z,y,x) of 45 OAR masks; see ``decompose_with_conflicts``."""
    return decompose_with_conflicts(masks, on_conflict)[0]
