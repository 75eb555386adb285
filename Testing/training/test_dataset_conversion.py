"""SegRap release -> nnU-Net raw dataset on phantom cases: labels, links, conflicts, resuming, orientation,
nnU-Net's own check."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from SegRapSegmenterLib import cli
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.errors import DecompositionConflictError, InputError
from SegRapSegmenterLib.phantom import cases as phantom
from SegRapSegmenterLib.phantom.cases import CASES_DIR
from SegRapSegmenterLib.training.convert import ORIENTATION, ORIENTATION_KEY, convert_release, orientation_of


def _array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _verify(dataset_dir):
    """nnU-Net's own integrity check of a raw dataset (raises on any problem)."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(dataset_dir), num_processes=1)


def test_task1_labels_are_the_decomposition_of_the_45_mask_files(phantom_release, tmp_path):
    root, cases = phantom_release
    report = convert_release(root, tmp_path / "raw", "oar", 601)
    out = report.dataset_dir
    assert out.name == "Dataset601_SegRapOAR"
    for case in cases:
        case_dir = root / CASES_DIR / case.case_id
        masks = {n: _array(case_dir / f"{n}.nii.gz") > 0 for n in S.OAR_NAMES}
        labels = _array(out / "labelsTr" / f"{case.case_id}.nii.gz")
        assert np.array_equal(labels, S.decompose(masks))
        assert np.array_equal(labels, case.labelmap)
        image = out / "imagesTr" / f"{case.case_id}_0000.nii.gz"
        assert os.stat(image).st_ino == os.stat(case_dir / "image.nii.gz").st_ino  # a link, not a copy
    assert all(c.onehot_checked and c.onehot_differing_voxels == 0 and not c.conflicts for c in report.cases)
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "CT"} and dataset["numTraining"] == 3
    assert dataset["labels"] == S.class_labels() and len(dataset["labels"]) == 55
    _verify(out)


def test_task2_uses_the_contrast_ct_and_labels_gtvp_1_gtvnd_2(phantom_release, tmp_path):
    root, cases = phantom_release
    out = convert_release(root, tmp_path / "raw", "gtv", 602).dataset_dir
    for case in cases:
        case_dir = root / CASES_DIR / case.case_id
        labels = _array(out / "labelsTr" / f"{case.case_id}.nii.gz")
        assert np.array_equal(labels, case.gtv_labelmap) and set(np.unique(labels)) <= {0, 1, 2}
        image = out / "imagesTr" / f"{case.case_id}_0000.nii.gz"
        assert os.stat(image).st_ino == os.stat(case_dir / "image_contrast.nii.gz").st_ino
    assert json.loads((out / "dataset.json").read_text())["labels"] == {"background": 0, "GTVp": 1, "GTVnd": 2}
    _verify(out)


@pytest.fixture
def release_copy(phantom_release, tmp_path):
    root, cases = phantom_release
    copy = tmp_path / "release"
    shutil.copytree(root, copy)
    return copy, cases


def _add_lens_outside_the_eye(root, case):
    """Draw a voxel of Lens_L where no Eye_L is: a combination none of the 54 classes represents."""
    path = root / CASES_DIR / case.case_id / "Lens_L.nii.gz"
    image = sitk.ReadImage(str(path))
    lens = sitk.GetArrayFromImage(image)
    lens[0, 0, 0] = 1
    out = sitk.GetImageFromArray(lens)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(path), useCompression=True)


def test_conflicting_case_is_named_or_resolved_and_reported(release_copy, tmp_path):
    root, cases = release_copy
    bad = cases[1]
    _add_lens_outside_the_eye(root, bad)
    with pytest.raises(DecompositionConflictError, match=f"(?s){bad.case_id}.*Lens_L: 1 voxels"):
        convert_release(root, tmp_path / "raw_error", "oar", 601)

    report = convert_release(root, tmp_path / "raw", "oar", 601, on_conflict="nearest")
    by_case = {c.case_id: c for c in report.cases}
    assert [c.case_id for c in report.cases if c.conflicts] == [bad.case_id]
    assert "Lens_L: 1 voxels" in by_case[bad.case_id].conflicts[0] and "-> class" in by_case[bad.case_id].conflicts[0]
    assert by_case[bad.case_id].onehot_differing_voxels == 1  # the organisers' map disagrees at that voxel
    assert f"{bad.case_id}: 1 conflicting combinations" in report.summary()
    saved = json.loads((report.dataset_dir / "conversion_report.json").read_text())
    assert saved[bad.case_id]["conflicts"] == by_case[bad.case_id].conflicts


def test_conversion_resumes_and_names_a_missing_file(release_copy, tmp_path):
    root, cases = release_copy
    raw = tmp_path / "raw"
    first = convert_release(root, raw, "gtv", 602)
    (first.dataset_dir / "labelsTr" / f"{cases[2].case_id}.nii.gz").unlink()
    again = convert_release(root, raw, "gtv", 602)
    assert [c.skipped for c in again.cases] == [True, True, False]
    missing = root / CASES_DIR / cases[0].case_id / "Parotid_L.nii.gz"
    missing.unlink()
    with pytest.raises(InputError, match=f"{missing}: missing"):
        convert_release(root, tmp_path / "raw2", "oar", 601)


def test_cli_convert_prints_the_summary(phantom_release, tmp_path, capsys):
    root, _ = phantom_release
    code = cli.main(["train", "convert", "--segrap-root", str(root), "--out", str(tmp_path / "raw"), "--task", "gtv",
                     "--dataset-id", "702"])
    assert code == 0
    assert "Dataset702_SegRapGTV: 3 cases (0 already done)" in capsys.readouterr().out


def _centroid_x(labels, value):
    return float(np.nonzero(labels == value)[2].mean())


@pytest.mark.parametrize("direction", ["flipped", "rotated"])
def test_cases_stored_flipped_or_rotated_are_written_in_lps_on_the_same_anatomy(direction, tmp_path):
    identity = phantom.make_case(0, seed=5, size="small")
    case = phantom.make_case(0, seed=5, size="small", direction=direction)
    root = tmp_path / "release"
    phantom.write_case(case, root)
    report = convert_release(root, tmp_path / "raw", "oar", 601)
    out = report.dataset_dir
    image = sitk.ReadImage(str(out / "imagesTr" / f"{case.case_id}_0000.nii.gz"))
    label_image = sitk.ReadImage(str(out / "labelsTr" / f"{case.case_id}.nii.gz"))
    assert orientation_of(case.ct) != "LPS"
    assert orientation_of(image) == orientation_of(label_image) == ORIENTATION == "LPS"
    labels = sitk.GetArrayFromImage(label_image)
    # the exact permutation/flip of the stored labels, and the same anatomy as the case stored in LPS
    assert np.array_equal(labels, sitk.GetArrayFromImage(sitk.DICOMOrient(case.label_image(case.labelmap), "LPS")))
    assert np.array_equal(labels, identity.labelmap)
    assert np.allclose(image.GetOrigin(), identity.ct.GetOrigin()) and image.GetSize() == identity.ct.GetSize()
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(sitk.DICOMOrient(case.ct, "LPS")))
    for left in ("Parotid_L", "Eye_L", "Cochlea_L"):
        right = S.get(left).partner
        # in LPS storage +x (higher index) is the patient's left
        assert _centroid_x(labels, S.class_labels()[left]) > _centroid_x(labels, S.class_labels()[right])
    assert json.loads((out / "dataset.json").read_text())[ORIENTATION_KEY] == "LPS"
    again = convert_release(root, tmp_path / "raw", "oar", 601)
    assert [c.skipped for c in again.cases] == [True]  # written in LPS: resuming keeps it
    _verify(out)
