"""Detached-data headers (issue 28, item 14e): an NRRD ``data file:`` or MetaImage ``ElementDataFile``
is followed only to a regular file in the header's own folder; a FIFO named there blocked the reader."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from SegRapSegmenterLib.errors import InputError
from SegRapSegmenterLib.formats.imaging import read_volume

SIZE = (8, 8, 4)


def _raw(path):
    path.write_bytes((np.full(SIZE[::-1], -1000, "<i2")).tobytes())
    return path


def _nhdr(path, data_line: str, extra: str = ""):
    path.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 8 8 4\nspacings: 1 1 2\nencoding: raw\n"
                    f"endian: little\n{data_line}\n{extra}")
    return path


def _mhd(path, data_file: str):
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 8 8 4\nElementSpacing = 1 1 2\n"
                    f"ElementType = MET_SHORT\nElementByteOrderMSB = False\nElementDataFile = {data_file}\n")
    return path


def test_a_header_with_its_data_file_beside_it_is_read(tmp_path):
    _raw(tmp_path / "ct.raw")
    image = read_volume(_nhdr(tmp_path / "ct.nhdr", "data file: ct.raw")).image
    assert image.GetSize() == SIZE and image.GetSpacing() == (1.0, 1.0, 2.0)
    _raw(tmp_path / "ct2.raw")
    assert read_volume(_mhd(tmp_path / "ct.mhd", "ct2.raw")).image.GetSize() == SIZE


@pytest.mark.parametrize("make, refused", [
    (lambda d: _nhdr(d / "ct.nhdr", f"data file: {_raw(d.parent / 'elsewhere.raw')}"), "outside the header's folder"),
    (lambda d: _nhdr(d / "ct.nhdr", "datafile: ../elsewhere.raw"), "outside the header's folder"),
    (lambda d: _nhdr(d / "ct.nhdr", "data file: LIST 2", "ct.raw\n../../etc/hostname\n"), "'../../etc/hostname'"),
    (lambda d: _mhd(d / "ct.mhd", "/dev/zero"), "'/dev/zero' lies outside"),
    (lambda d: _nhdr(d / "ct.nrrd", "data file: missing.raw"), "'missing.raw' is missing"),
])
def test_a_data_file_outside_the_header_folder_is_refused_before_reading(tmp_path, make, refused):
    folder = tmp_path / "case"
    folder.mkdir()
    _raw(folder / "ct.raw")
    header = make(folder)
    with pytest.raises(InputError, match=rf"{header.name}: .*{refused}"):
        read_volume(header)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
@pytest.mark.parametrize("make", [
    lambda d: _nhdr(d / "ct.nhdr", "data file: pipe.raw"),
    lambda d: _mhd(d / "ct.mhd", "pipe.raw"),
])
def test_a_fifo_as_the_data_file_is_refused_instead_of_blocking(tmp_path, make):
    os.mkfifo(tmp_path / "pipe.raw")
    header = make(tmp_path)
    code = ("from SegRapSegmenterLib.formats.imaging import read_volume\n"
            f"read_volume({str(header)!r})")
    try:  # the old reader opened the FIFO and waited for a writer for ever
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {header.name} blocked on the FIFO")
    assert done.returncode != 0 and "InputError" in done.stderr and "'pipe.raw' is not a regular file" in done.stderr
