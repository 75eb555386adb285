"""Fixtures of the training tests: nnU-Net's folders in a temporary directory, a small phantom release, and that
release planned and preprocessed by nnU-Net once for the training runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from SegRapSegmenterLib.phantom import cases as phantom
from SegRapSegmenterLib.training.convert import convert_release
from training_helpers import PLANNED_DATASET


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


@pytest.fixture(scope="session")
def planned_oar(phantom_release, tmp_path_factory) -> tuple[Path, Path, str]:
    """Two cases of the release converted for Task 1 and planned and preprocessed by nnU-Net's own command (dataset
    integrity verified), once per session: (nnUNet_raw, nnUNet_preprocessed, dataset folder name). The two training
    runs (test_training_smoke_run, test_finetune_resenc) each copy it with ``planned_copy`` and add their own plans;
    two cases, not three, since nnU-Net's final validation predicts every case of fold 'all'."""
    _, cases = phantom_release
    base = tmp_path_factory.mktemp("planned_oar")
    root = base / "release"
    for case in cases[:2]:
        phantom.write_case(case, root)
    dirs = {name: base / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    dataset_dir = convert_release(root, dirs["nnUNet_raw"], "oar", PLANNED_DATASET).dataset_dir
    env = {**os.environ, **{k: str(v) for k, v in dirs.items()}, "nnUNet_def_n_proc": "1"}
    env.pop("nnUNet_extTrainer", None)
    proc = subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d",
                           str(PLANNED_DATASET), "-c", "3d_fullres", "-np", "1", "-npfp", "1",
                           "--verify_dataset_integrity"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"nnU-Net's planning failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert (dirs["nnUNet_preprocessed"] / dataset_dir.name / "nnUNetPlans.json").is_file()
    return dirs["nnUNet_raw"], dirs["nnUNet_preprocessed"], dataset_dir.name

