"""Slicer .seg.nrrd files: overlapping segments in few layers, names, colors, terminology, geometry."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.errors import GeometryError, InputError
from SegRapSegmenterLib.formats import segfile
from SegRapSegmenterLib.phantom import cases as phantom


def _all_masks(case) -> dict[str, np.ndarray]:
    return {**dict(case.oar_masks().items()), **case.gtv_masks()}


def test_47_overlapping_structures_round_trip_in_three_layers(tmp_path, small_case):
    masks = _all_masks(small_case)
    path = segfile.write_seg_nrrd(tmp_path / "case.seg.nrrd", masks, small_case.ct, provenance={"model": "x"})
    back = segfile.read_seg_nrrd(path)
    assert back.segment_names == list(S.STRUCTURE_NAMES)
    for name in S.STRUCTURE_NAMES:
        assert np.array_equal(back.masks[name], masks[name]), name
    assert back.masks["Lens_L"].any() and not (back.masks["Lens_L"] & ~back.masks["Eye_L"]).any()
    assert back.colors["Parotid_L"] == pytest.approx(tuple(c / 255 for c in S.get("Parotid_L").color), abs=1e-5)
    assert back.provenance == {"model": "x"}
    # the deepest anatomical stack is 3 (Brain, temporal lobe, hippocampus), and GTVs overlap OARs
    assert sitk.ReadImage(str(path)).GetNumberOfComponentsPerPixel() <= 4
    assert not list(tmp_path.glob(".*"))  # no temp file left


def test_file_reads_in_slicerio_with_terminology_and_geometry(tmp_path):
    case = phantom.make_case(0, seed=2, size="small", direction="oblique")
    masks = _all_masks(case)
    path = segfile.write_seg_nrrd(tmp_path / "case.seg.nrrd", masks, case.ct)
    seg = slicerio.read_segmentation(str(path))
    names = [s["name"] for s in seg["segments"]]
    assert names == list(S.STRUCTURE_NAMES)
    parotid = slicerio.segment_from_name(seg, "Parotid_L")
    assert parotid["terminology"]["type"] == ["SCT", "45289007", "Parotid gland"]
    assert parotid["terminology"]["typeModifier"] == ["SCT", "7771000", "Left"]
    assert parotid["layer"] == 0 and seg["voxels"].shape[0] == 3  # 3 layers, i, j, k
    ijk_to_lps = np.asarray(seg["ijkToLPS"])
    direction = np.array(case.ct.GetDirection()).reshape(3, 3)
    assert np.allclose(ijk_to_lps[:3, :3], direction * np.array(case.ct.GetSpacing())[None, :], atol=1e-6)
    assert np.allclose(ijk_to_lps[:3, 3], case.ct.GetOrigin(), atol=1e-6)
    lens = slicerio.extract_segments(seg, [("Lens_R", 1)])
    # slicerio gives voxels in i, j, k order; ours are z, y, x
    assert np.array_equal(np.transpose(np.asarray(lens["voxels"]), (2, 1, 0)) > 0, masks["Lens_R"])
    eye = slicerio.extract_segments(seg, [("Eye_R", 1)])
    assert not ((np.asarray(lens["voxels"]) > 0) & ~(np.asarray(eye["voxels"]) > 0)).any()
    back = segfile.read_seg_nrrd(path)
    assert np.allclose(back.reference.GetDirection(), case.ct.GetDirection())
    assert np.allclose(back.reference.GetOrigin(), case.ct.GetOrigin())


def test_other_segment_names_are_kept(tmp_path, small_case):
    shape = small_case.labelmap.shape
    blob = np.zeros(shape, bool)
    blob[10:12, 20:30, 20:30] = True
    path = segfile.write_seg_nrrd(tmp_path / "x.seg.nrrd", {"parotid_r": blob, "My boost volume": blob}, small_case.ct)
    back = segfile.read_seg_nrrd(path)
    assert back.segment_names == ["Parotid_R", "My boost volume"]
    assert np.array_equal(back.masks["My boost volume"], blob)


def test_mask_on_another_grid_is_refused(tmp_path, small_case):
    with pytest.raises(GeometryError, match="Brain"):
        segfile.write_seg_nrrd(tmp_path / "x.seg.nrrd", {"Brain": np.zeros((3, 4, 5), bool)}, small_case.ct)
    assert not list(tmp_path.iterdir())


def test_unreadable_file_names_the_file(tmp_path):
    bad = tmp_path / "broken.seg.nrrd"
    bad.write_bytes(b"not a nrrd")
    with pytest.raises(InputError, match="broken.seg.nrrd"):
        segfile.read_seg_nrrd(bad)
    with pytest.raises(InputError, match="no such"):
        segfile.read_seg_nrrd(tmp_path / "missing.seg.nrrd")
