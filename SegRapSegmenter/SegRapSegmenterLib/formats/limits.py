"""Size limits on untrusted images: the declared size is checked before any voxel is read or decoded.

An image header is a few bytes that can declare gigabytes (a 120-byte NRRD header declaring 2048 x
2048 x 512 voxels makes a reader allocate 4 GiB before it finds the data missing), and compressed
DICOM pixel data can inflate a thousand-fold. Readers check the declared size against these limits
first. ``SEGRAP_MAX_VOXELS`` raises (or lowers) the voxel limit for a site with larger scans.

A voxel spacing is checked too: a few-KB CT that declares 2e-7 mm pixels is resampled to the
network's millimetres into a degenerate grid and cost a worker gigabytes; CT voxels lie between
MIN_SPACING_MM and MAX_SPACING_MM along every axis.

A detached-data header (NRRD ``data file:``, MetaImage ``ElementDataFile =``) names files the
reader opens: each must be a regular file in the header's own folder (not /dev/zero, a FIFO that
blocks the reader for ever, or another user's file elsewhere).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

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


HEADER_BYTES = 1 << 16  # a detached-data header is text: its fields lie in the first 64 KiB


def _detached_names(path: Path) -> list[str]:
    """The data files an NRRD/NHDR or MetaImage header names (none when the data are in the file itself)."""
    with open(path, "rb") as fh:
        head = fh.read(HEADER_BYTES)
    name = path.name.lower()
    if name.endswith((".nrrd", ".nhdr")) and head.startswith(b"NRRD"):
        lines, separator, keys = head.split(b"\n\n", 1)[0].decode("latin-1").splitlines(), ":", ("data file",
                                                                                                  "datafile")
    elif name.endswith((".mhd", ".mha")):
        lines, separator, keys = head.decode("latin-1").splitlines(), "=", ("elementdatafile",)
    else:
        return []
    for k, line in enumerate(lines):
        key, _, value = line.partition(separator)
        if key.strip().lower() not in keys:
            continue
        fields = value.split()
        if not fields or fields[0] == "LOCAL":  # MetaImage: the data follow the header in this file
            return []
        if fields[0] == "LIST":  # the names follow, one a line
            return [x.strip() for x in lines[k + 1:] if x.strip()]
        if "%" in fields[0] and len(fields) >= 4:  # a printf pattern: first, last, step
            try:
                first, last, step = (int(f) for f in fields[1:4])
                numbers = range(first, last + (1 if step > 0 else -1), step)
                if len(numbers) > MAX_AXIS:
                    raise ValueError(f"{len(numbers)} files")
                return [fields[0] % n for n in numbers]
            except (ValueError, TypeError) as exc:
                return [f"an unusable file pattern {value.strip()!r} ({exc})"]
        return [value.strip()]
    return []


def check_detached_data(path: Path, where: str, error: type[Exception] = InputError) -> None:
    """Refuse a header whose data files are not regular files in its own folder, before a reader opens them."""
    path = Path(path)
    try:
        names = _detached_names(path)
    except OSError as exc:
        raise error(f"{where}: cannot be read ({exc}).") from exc
    folder = path.parent.resolve()
    for name in names:
        target = (folder / name).resolve()  # an absolute name stays absolute
        if target.parent != folder and folder not in target.parents:
            raise error(f"{where}: refused: the header's data file {name!r} lies outside the header's folder "
                        f"{folder}; keep detached data next to its header.")
        try:
            mode = os.stat(target).st_mode
        except OSError:
            raise error(f"{where}: the header's data file {name!r} is missing.") from None
        if not stat.S_ISREG(mode):
            raise error(f"{where}: refused: the header's data file {name!r} is not a regular file (a device, "
                        f"FIFO or folder would block or flood the reader).")
