"""Small array helpers shared by the modules that keep masks cropped to their bounding boxes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .errors import GeometryError, InputError

Box = tuple[slice, slice, slice]
EMPTY_BOX: Box = (slice(0, 0), slice(0, 0), slice(0, 0))


def bounding_box(mask: np.ndarray) -> Box | None:
    """The (z, y, x) slices that hold every set voxel of ``mask``, or None when it is empty."""
    if mask.ndim != 3:
        raise InputError(f"A structure mask must be 3D (z, y, x), got shape {mask.shape}.")
    along_z = mask.any(axis=(1, 2))
    if not along_z.any():
        return None
    z = np.flatnonzero(along_z)
    plane = mask[z[0]:z[-1] + 1].any(axis=0)
    y = np.flatnonzero(plane.any(axis=1))
    x = np.flatnonzero(plane.any(axis=0))
    return (slice(int(z[0]), int(z[-1]) + 1), slice(int(y[0]), int(y[-1]) + 1), slice(int(x[0]), int(x[-1]) + 1))


def uint8_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A mask or label map (z, y, x) as a uint8 image with ``reference``'s geometry (direction included)."""
    image = sitk.GetImageFromArray(np.asarray(array).astype(np.uint8, copy=False))
    image.CopyInformation(reference)
    return image


def crop_of(masks: Mapping[str, np.ndarray], key: str) -> tuple[Box, np.ndarray]:
    """Box and cropped mask of one entry of any mask mapping (cropped ones are not expanded)."""
    if hasattr(masks, "crop"):
        box, data = masks.crop(key)
        return box, np.asarray(data, dtype=bool)
    full = np.asarray(masks[key], dtype=bool)
    box = bounding_box(full) or EMPTY_BOX
    return box, full[box]


class CroppedMasks(Mapping):
    """Masks held cropped to their bounding boxes; ``masks[name]`` builds the full (z, y, x) mask on demand.

    47 full masks of a 126 x 1024 x 1024 CT take 6 GB; their crops a small part of that.
    ``crop(name)`` gives the box (slices) and the cropped mask.
    """

    def __init__(self, shape: tuple[int, int, int], crops: dict[str, tuple[Box, np.ndarray]] | None = None):
        self.shape = tuple(int(n) for n in shape)
        self._crops = dict(crops or {})

    @classmethod
    def of(cls, *mappings: Mapping[str, np.ndarray]) -> "CroppedMasks":
        """The masks of one or more mappings (full masks, or anything with ``crop`` and ``shape``), cropped."""
        out: CroppedMasks | None = None
        for mapping in mappings:
            for key in mapping:
                here = tuple(mapping.shape) if hasattr(mapping, "crop") else np.shape(mapping[key])
                if out is None:
                    out = cls(here)
                elif tuple(here) != out.shape:
                    raise GeometryError(f"Mask {key!r} has shape {tuple(here)}, the others {out.shape}.")
                out.put(str(key), *crop_of(mapping, key))
        return out if out is not None else cls((0, 0, 0))

    def put(self, key: str, box: Box, data: np.ndarray) -> None:
        """Store a cropped mask (box on this grid, data of the box's shape)."""
        self._crops[key] = (box, np.asarray(data, dtype=bool))

    def put_full(self, key: str, mask: np.ndarray) -> None:
        """Store a full-size mask, cropped to its bounding box."""
        if np.shape(mask) != self.shape:
            raise GeometryError(f"Mask {key!r} has shape {np.shape(mask)}, the grid {self.shape}.")
        self.put(key, *crop_of({key: mask}, key))

    def subset(self, keys: Iterable[str]) -> "CroppedMasks":
        keep = set(keys)
        return CroppedMasks(self.shape, {k: v for k, v in self._crops.items() if k in keep})

    def __getitem__(self, key: str) -> np.ndarray:
        box, data = self._crops[key]
        full = np.zeros(self.shape, dtype=bool)
        full[box] = data
        return full

    def __iter__(self):
        return iter(self._crops)

    def __len__(self) -> int:
        return len(self._crops)

    def crop(self, key: str) -> tuple[Box, np.ndarray]:
        """Bounding box (slices) and the mask inside it."""
        return self._crops[key]


@dataclass(frozen=True)
class Crop:
    """A boolean mask on a (z, y, x) grid of ``shape``, held as its bounding box and the data inside it."""

    shape: tuple[int, int, int]
    box: Box | None  # None for an empty mask
    data: np.ndarray  # bool, the mask inside ``box`` (empty array when ``box`` is None)

    @classmethod
    def of(cls, mask: np.ndarray) -> "Crop":
        """The crop of a full-size mask (any dtype; non-zero is inside)."""
        mask = np.asarray(mask)
        mask = mask if mask.dtype == bool else mask != 0
        box = bounding_box(mask)
        if box is None:
            return cls.empty(mask.shape)
        return cls(tuple(mask.shape), box, np.ascontiguousarray(mask[box]))

    @classmethod
    def from_box(cls, shape: Sequence[int], box: Sequence[slice] | None, data: np.ndarray) -> "Crop":
        """A crop from a box and the mask inside it (as ``StructureMasks.crop`` gives them); tightened."""
        data = np.asarray(data, dtype=bool)
        if box is None or data.size == 0 or not data.any():
            return cls.empty(shape)
        inner = bounding_box(data)
        tight = tuple(slice(b.start + i.start, b.start + i.stop) for b, i in zip(box, inner))
        return cls(tuple(int(n) for n in shape), tight, np.ascontiguousarray(data[inner]))

    @classmethod
    def empty(cls, shape: Sequence[int]) -> "Crop":
        return cls(tuple(int(n) for n in shape), None, np.zeros((0, 0, 0), dtype=bool))

    @property
    def is_empty(self) -> bool:
        return self.box is None

    def count(self) -> int:
        """Number of voxels inside."""
        return 0 if self.box is None else int(np.count_nonzero(self.data))

    def full(self) -> np.ndarray:
        """The full-size boolean mask."""
        out = np.zeros(self.shape, dtype=bool)
        if self.box is not None:
            out[self.box] = self.data
        return out

    def within(self, box: Box) -> np.ndarray:
        """The mask over ``box`` (a box of the same grid), zero outside this crop."""
        out = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
        if self.box is None:
            return out
        lo = [max(a.start, b.start) for a, b in zip(self.box, box)]
        hi = [min(a.stop, b.stop) for a, b in zip(self.box, box)]
        if any(h <= l for l, h in zip(lo, hi)):
            return out
        dst = tuple(slice(l - b.start, h - b.start) for l, h, b in zip(lo, hi, box))
        src = tuple(slice(l - a.start, h - a.start) for l, h, a in zip(lo, hi, self.box))
        out[dst] = self.data[src]
        return out
