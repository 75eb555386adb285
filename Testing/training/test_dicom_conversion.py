"""An institution's DICOM exports (CT series + RTSTRUCT per case) -> nnU-Net dataset: names mapped, gaps refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.formats.dicom import read_ct_series
from SegRapSegmenterLib.formats.rtstruct import read_rtstruct, write_rtstruct
from SegRapSegmenterLib.phantom import cases as phantom
from SegRapSegmenterLib.phantom.dicom_series import write_phantom_dicom
from SegRapSegmenterLib.training.convert_dicom import convert_dicom


def _export(case, folder, masks, on_contrast=False):
    """Write a case's CT series and an RTSTRUCT of ``masks`` on the plain (or contrast) CT, as a PACS export."""
    written = write_phantom_dicom(case, folder)
    volume = read_ct_series(written.contrast_dir if on_contrast else written.ct_dir)
    write_rtstruct(masks, volume, folder / "RS.dcm", model_name="clinic", model_version="1", roi_names="tg263")
    return volume


@pytest.fixture(scope="module")
def dicom_root(tmp_path_factory):
    """Two Task 1 cases: 'complete' (45 OARs in TG-263 names plus a couch ROI), 'gaps' (no chiasm)."""
    root = tmp_path_factory.mktemp("dicom_exports")
    cases = [phantom.make_case(i, seed=11, size="small") for i in range(2)]
    complete = dict(cases[0].oar_masks())
    complete["CouchSurface"] = np.zeros(cases[0].labelmap.shape, bool)
    complete["CouchSurface"][0, :4, :4] = True
    volume = _export(cases[0], root / "complete case", complete)
    gaps = {k: v for k, v in cases[1].oar_masks().items() if k != "Chiasm"}
    _export(cases[1], root / "gaps", gaps)
    return root, volume


def test_task1_from_rtstruct_labels_the_decomposition_of_the_mapped_rois(dicom_root, tmp_path):
    root, volume = dicom_root
    report = convert_dicom(root, tmp_path / "raw", "oar", 611)
    by_case = {c.case_id: c for c in report.cases}
    assert set(by_case) == {"complete_case", "gaps"}
    assert by_case["complete_case"].unmapped_rois == ["CouchSurface"] and not by_case["complete_case"].refused
    out = report.dataset_dir
    labels = sitk.ReadImage(str(out / "labelsTr" / "complete_case.nii.gz"))
    image = sitk.ReadImage(str(out / "imagesTr" / "complete_case_0000.nii.gz"))
    assert labels.GetSize() == image.GetSize() == volume.image.GetSize()
    assert np.allclose(labels.GetDirection(), volume.image.GetDirection())
    masks = read_rtstruct(root / "complete case" / "RS.dcm", volume)
    expected = S.decompose({n: masks[n] for n in S.OAR_NAMES})
    assert np.array_equal(sitk.GetArrayFromImage(labels), expected)
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(volume.image))
    assert "Chiasm" in by_case["gaps"].refused and "learned as background" in by_case["gaps"].refused
    assert not (out / "labelsTr" / "gaps.nii.gz").exists()
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 1
    assert "gaps: REFUSED" in report.summary() and "CouchSurface" in report.summary()


def test_task2_from_rtstruct_on_the_contrast_ct_takes_a_missing_gtvnd_as_empty(tmp_path):
    case = phantom.make_case(0, seed=12, size="small")
    gtv = case.gtv_masks()
    _export(case, tmp_path / "exports" / "node_negative", {"GTVp": gtv["GTVp"]}, on_contrast=True)
    report = convert_dicom(tmp_path / "exports", tmp_path / "raw", "gtv", 612)
    (only,) = report.cases
    assert not only.refused and "node-negative" in only.notes[0]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(report.dataset_dir / "labelsTr" / "node_negative.nii.gz")))
    assert set(np.unique(labels)) == {0, 1} and np.count_nonzero(labels) > 0
