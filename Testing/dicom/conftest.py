"""Fixtures of the DICOM tests: each phantom variant written as DICOM and read back once per session."""

from __future__ import annotations

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


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines dciodvfy (dicom3tools) reports as errors for one file."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dciodvfy is not installed (Debian package dicom3tools; .ci/run installs it)")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


@pytest.fixture(scope="session")
def dciodvfy():
    return dciodvfy_errors
