"""The install hint of node.scu when pynetdicom is missing must not replace Slicer 5.10's pydicom 2.4.4.

pynetdicom 3 requires pydicom 3, so a bare ``pip_install('pynetdicom')`` in Slicer 5.10 would upgrade
the pydicom its DICOM plugins import (pydicom 2.4.4: SuperBuild/External_python-dicom-requirements.cmake
v5.10.0:44). The hint holds this Python's pydicom; pip, given that, resolves a pynetdicom that fits it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys

import pytest
from SegRapSegmenterLib.errors import DicomNetworkError
from SegRapSegmenterLib.node import scu


def _message_without_pynetdicom(monkeypatch) -> str:
    monkeypatch.setitem(sys.modules, "pynetdicom", None)  # import pynetdicom now raises ImportError
    with pytest.raises(DicomNetworkError) as caught:
        scu._pynetdicom_ae()
    return str(caught.value)


def test_the_hint_holds_this_pythons_pydicom(monkeypatch):
    message = _message_without_pynetdicom(monkeypatch)
    held = f"pydicom=={importlib.metadata.version('pydicom')}"
    assert f"slicer.util.pip_install(['pynetdicom>=2.1,<4', '{held}'])" in message
    assert "pip_install('pynetdicom')" not in message
    assert "'Send to'" in message  # the panel's constrained install


def test_pip_accepts_the_hinted_requirements(monkeypatch):
    message = _message_without_pynetdicom(monkeypatch)
    args = ast.literal_eval(re.search(r"pip_install\((\[.*?\])\)", message).group(1))
    assert args[0] == "pynetdicom>=2.1,<4"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index",
                           "--disable-pip-version-check", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Would install" not in proc.stdout  # pydicom stays as it is (and pynetdicom is installed here)
