"""Fixtures of the model-store tests: an empty store under a temporary SEGRAP_HOME, a writable demo bundle."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from SegRapSegmenterLib.inference import bundles as M


@pytest.fixture()
def store(tmp_path, monkeypatch) -> Path:
    """An empty store under a temporary SEGRAP_HOME."""
    monkeypatch.setenv("SEGRAP_HOME", str(tmp_path / "home"))
    return M.store_root()


@pytest.fixture()
def bundle_copy(tmp_path) -> Path:
    """A writable copy of the demo bundle."""
    target = tmp_path / "bundle"
    shutil.copytree(M.DEMO_BUNDLE_PATH, target)
    return target
