"""Size limits on untrusted images: the declared size is checked before any voxel is read or decoded.

An image header is a few bytes that can declare gigabytes (a 120-byte NRRD header declaring 2048 x
2048 x 512 voxels makes a reader allocate 4 GiB before it finds the data missing), and compressed
DICOM pixel data can inflate a thousand-fold. Readers check the declared size against these limits
first. ``SEGRAP_MAX_VOXELS`` raises (or lowers) the voxel limit for a site with larger scans.

A voxel spacing is checked too: a few-KB CT that declares 2e-7 mm pixels is resampled to the
network's millimetres into a degenerate grid and cost a worker gigabytes; CT voxels lie between
MIN_SPACING_MM and MAX_SPACING_MM along every axis.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..errors import InputError

DEFAULT_MAX_VOXELS = 1 << 29  # 537 million voxels: 1024 x 1024 x 512, about 1 GiB of int16
MAX_AXIS = 8192  # voxels along any one axis (the longest whole-body CTs have ~3000 slices)
MIN_SPACING_MM = 0.05  # finer than any clinical CT (high-resolution temporal bone CT: ~0.2 mm)
MAX_SPACING_MM = 20.0  # coarser than any CT slice (thick old reconstructions: 10 mm)


def max_voxels() -> int:
    """The voxel limit: ``SEGRAP_MAX_VOXELS`` when set, else 2**29."""
    value = os.environ.get("SEGRAP_MAX_VOXELS", "")
    try:
        return int(value) if value else DEFAULT_MAX_VOXELS
    except ValueError:
        raise InputError(f"SEGRAP_MAX_VOXELS={value!r} is not a whole number of voxels.") from None


def check_size(size: Sequence[int], where: str, error: type[Exception] = InputError) -> None:
    """Refuse a declared image size (x, y, z) with too many voxels, or an axis over MAX_AXIS, before reading it."""
    size = [int(n) for n in size]
    count = 1
    for n in size:
        count *= max(n, 0)
    shown = " x ".join(str(n) for n in size)
    if any(n > MAX_AXIS for n in size):
        raise error(f"{where}: declares {shown} voxels; an axis of more than {MAX_AXIS} voxels is not a CT volume "
                    f"this tool can process.")
    limit = max_voxels()
    if count > limit:
        raise error(f"{where}: declares {shown} = {count:,} voxels, over the limit of {limit:,} "
                    f"(SEGRAP_MAX_VOXELS); refused before reading.")


def check_spacing(spacing: Sequence[float], where: str, error: type[Exception] = InputError,
                  names: Sequence[str] = ("x", "y", "z")) -> None:
    """Refuse a voxel spacing (mm) outside MIN_SPACING_MM..MAX_SPACING_MM, or not a number, before resampling."""
    for name, value in zip(names, spacing):
        value = float(value)
        if not MIN_SPACING_MM <= value <= MAX_SPACING_MM:  # also NaN
            raise error(f"{where}: a voxel spacing of {value:.6g} mm along {name} is not a CT's (a CT voxel is "
                        f"{MIN_SPACING_MM} to {MAX_SPACING_MM} mm); refused before resampling, which would need "
                        f"a grid of that many more voxels. Check the header's spacing.")
