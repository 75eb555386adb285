"""Small array helpers shared by the modules that keep masks cropped to their bounding boxes."""

from __future__ import annotations

import numpy as np

from .errors import InputError

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
