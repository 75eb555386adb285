"""Fixtures of the training tests: nnU-Net's folders in a temporary directory, a small phantom release."""

from __future__ import annotations

import pytest
from SegRapSegmenterLib.phantom import cases as phantom


@pytest.fixture
def nnunet_dirs(tmp_path, monkeypatch):
    """nnU-Net's three folders under a temporary directory, set in the environment."""
    dirs = {name: tmp_path / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for name, path in dirs.items():
        path.mkdir()
        monkeypatch.setenv(name, str(path))
    monkeypatch.delenv("SEGRAP_PRETRAINED_WEIGHTS", raising=False)
    monkeypatch.delenv("SEGRAP_TRAINER_OPTIONS", raising=False)
    return dirs


@pytest.fixture(scope="session")
def phantom_release(tmp_path_factory):
    """Three small phantom cases written in the SegRap release layout (root, cases)."""
    root = tmp_path_factory.mktemp("release")
    cases = [phantom.make_case(i, seed=5, size="small") for i in range(3)]
    for case in cases:
        phantom.write_case(case, root)
    return root, cases
