"""segrap export-rtstruct and segrap dicom-phantom: any .seg.nrrd onto its CT series, misfits refused."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from SegRapSegmenterLib import cli
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.cli import main
from SegRapSegmenterLib.formats.rtstruct import read_rtstruct
from SegRapSegmenterLib.formats.segfile import write_seg_nrrd

SOME = ("Brain", "Lens_R", "Cochlea_L", "Parotid_L", "GTVp")  # catalogue order
BAD_INPUT = getattr(cli, "EXIT_INPUT", cli.EXIT_ERROR)  # the exit code of a bad input


def _masks(standard, names=SOME) -> dict[str, np.ndarray]:
    return {n: standard.masks[n] for n in names}


def _export(seg, ct_dir, out, *extra) -> int:
    return main(["export-rtstruct", str(seg), "--reference-ct", str(ct_dir), "-o", str(out), *extra])


def _subgrid(image: sitk.Image, start_xyz, size_xyz, spacing_factor=1.0) -> sitk.Image:
    """A grid inside ``image`` (same direction) starting at voxel ``start_xyz``, as Slicer crops segmentations."""
    ref = sitk.Image([int(v) for v in size_xyz], sitk.sitkUInt8)
    ref.SetDirection(image.GetDirection())
    ref.SetSpacing([s * spacing_factor for s in image.GetSpacing()])
    ref.SetOrigin(image.TransformIndexToPhysicalPoint([int(v) for v in start_xyz]))
    return ref


def _resampled(masks, source: sitk.Image, target: sitk.Image) -> dict[str, np.ndarray]:
    out = {}
    for name, mask in masks.items():
        img = sitk.GetImageFromArray(mask.astype(np.uint8))
        img.CopyInformation(source)
        moved = sitk.Resample(img, target, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        out[name] = sitk.GetArrayFromImage(moved) > 0
    return out


def test_a_segmentation_on_the_ct_grid_exports_exactly(standard, tmp_path, dciodvfy, capsys):
    masks = dict(standard.masks)
    seg = write_seg_nrrd(tmp_path / "result.seg.nrrd", masks, standard.volume.image,
                         provenance={"model": {"name": "SegRap DKFZ", "version": "3.1"}})
    out = tmp_path / "RS.dcm"
    assert _export(seg, standard.written.ct_dir, out) == 0
    assert str(out) in capsys.readouterr().out
    assert dciodvfy(out) == []
    back = read_rtstruct(out, standard.volume)
    assert set(back) == set(S.STRUCTURE_NAMES)
    assert all(np.array_equal(back[n], masks[n]) for n in S.STRUCTURE_NAMES)
    ds = pydicom.dcmread(out)
    assert ds.StructureSetROISequence[0].ROIGenerationDescription == "SegRap DKFZ 3.1"
    assert ds.SeriesInstanceUID != standard.volume.series.series_uid
    assert ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == standard.volume.series.frame_of_reference_uid


def test_segrap_roi_names_on_request(standard, tmp_path):
    seg = write_seg_nrrd(tmp_path / "s.seg.nrrd", _masks(standard), standard.volume.image)
    out = tmp_path / "RS.dcm"
    assert _export(seg, standard.written.ct_dir, out, "--roi-names", "segrap") == 0
    assert [r.ROIName for r in pydicom.dcmread(out).StructureSetROISequence] == list(SOME)


def test_a_cropped_slicer_style_segmentation_is_placed_back_exactly(standard, tmp_path, capsys):
    masks = _masks(standard)
    ct = standard.volume.image
    crop = _subgrid(ct, (10, 8, 4), (80, 84, 40))
    seg = write_seg_nrrd(tmp_path / "edited.seg.nrrd", _resampled(masks, ct, crop), crop)
    out = tmp_path / "RS.dcm"
    assert _export(seg, standard.written.ct_dir, out) == 0
    assert "resampled onto the CT grid (nearest neighbour)" in capsys.readouterr().out
    assert "resampled onto the CT grid" in pydicom.dcmread(out).StructureSetDescription
    back = read_rtstruct(out, standard.volume)
    assert all(np.array_equal(back[n], masks[n]) for n in SOME)


def test_a_segmentation_on_a_finer_grid_is_resampled_and_says_so(standard, tmp_path, dciodvfy):
    masks = _masks(standard, ("Brain", "OralCavity"))
    ct = standard.volume.image
    fine = _subgrid(ct, (0, 0, 0), (150, 150, 120), spacing_factor=0.5)
    seg = write_seg_nrrd(tmp_path / "fine.seg.nrrd", _resampled(masks, ct, fine), fine)
    out = tmp_path / "RS.dcm"
    assert _export(seg, standard.written.ct_dir, out) == 0
    ds = pydicom.dcmread(out)
    assert "150x150x120 grid of 1x1x1.5 mm" in ds.StructureSetDescription
    assert dciodvfy(out) == []
    back = read_rtstruct(out, standard.volume)
    brain = masks["Brain"]
    overlap = 2 * np.logical_and(back["Brain"], brain).sum() / (back["Brain"].sum() + brain.sum())
    assert overlap > 0.95


@pytest.mark.parametrize("shift_mm", [400.0, 60.0])
def test_a_segmentation_outside_the_ct_is_refused_and_nothing_is_written(standard, tmp_path, capsys, shift_mm):
    masks = _masks(standard, ("Brain", "Trachea"))
    moved = sitk.Image(standard.volume.image)
    moved.SetOrigin(np.add(moved.GetOrigin(), (shift_mm, 0.0, 0.0)).tolist())
    seg = write_seg_nrrd(tmp_path / "moved.seg.nrrd", masks, moved)
    out = tmp_path / "RS.dcm"
    assert _export(seg, standard.written.ct_dir, out) == BAD_INPUT
    err = capsys.readouterr().err
    assert "does not fit the CT" in err and "Brain" in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moved.seg.nrrd"]


def test_a_bad_ct_folder_writes_nothing(standard, tmp_path, capsys):
    seg = write_seg_nrrd(tmp_path / "s.seg.nrrd", _masks(standard), standard.volume.image)
    out = tmp_path / "RS.dcm"
    assert _export(seg, standard.written.root, out) == BAD_INPUT  # two CT series: plain and contrast
    assert "--ct-series" in capsys.readouterr().err
    assert not out.exists()
    assert _export(seg, standard.written.root, out, "--ct-series", standard.written.ct_series_uid) == 0
    assert out.exists()


def test_dicom_phantom_command_writes_both_series(tmp_path, capsys):
    from SegRapSegmenterLib.formats.dicom import series_case_id

    assert main(["dicom-phantom", "--out", str(tmp_path), "--variant", "oblique", "--slices", "4", "--masks"]) == 0
    assert len(list((tmp_path / "CT").iterdir())) == 4 and len(list((tmp_path / "CT_contrast").iterdir())) == 4
    truth = list(tmp_path.glob("study-*.seg.nrrd"))  # named as `segrap segment` names the series' case
    assert len(truth) == 1 and truth[0].name[:-len(".seg.nrrd")] == series_case_id(tmp_path / "CT")
    assert str(tmp_path / "CT") in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Segmentation files whose header contradicts their array: refused with exit 3, naming file and contradiction
# --------------------------------------------------------------------------------------------


def _valid_file(standard, tmp_path):
    import nrrd

    seg = write_seg_nrrd(tmp_path / "good.seg.nrrd", _masks(standard), standard.volume.image)
    return nrrd.read(str(seg), index_order="C")


def _rewrite(tmp_path, name, data, header):
    import nrrd

    path = tmp_path / name
    custom = {k: "string" for k in header if k.startswith(("Segment", "SegRap"))}
    nrrd.write(str(path), data, header=header, index_order="C", custom_field_map=custom)
    return path


def _layers_transposed(data, header):
    """The issue's case: a (z, y, x, layer) array written as if its first NRRD axis were the layers."""
    flipped = np.ascontiguousarray(np.moveaxis(data, -1, 0))  # NRRD axes: x, y, z, layer -> list axis = x
    h = dict(header)
    h.pop("sizes", None)
    return flipped, h


def _value_nobody_names(data, header):
    data = data.copy()
    data[5, 5, 5, 0] = 200
    return data, header


def _extent_outside(data, header):
    return data, {**header, "Segment0_Extent": "0 400 0 10 0 10"}


def _geometry_missing(data, header):
    h = {k: v for k, v in header.items() if k != "space directions"}
    return data, h


def _layer_missing(data, header):
    return data, {**header, "Segment1_Layer": "7"}


@pytest.mark.parametrize("damage, expected", [
    (_layers_transposed, "which no segment is in"),
    (_value_nobody_names, "label value 200"),
    (_extent_outside, "outside the file's grid"),
    (_geometry_missing, "no 'space directions'"),
    (_layer_missing, "layer 7"),
], ids=["layer-count", "label-value", "extent", "geometry", "layer-index"])
def test_a_contradictory_segmentation_file_exits_3(standard, tmp_path, capsys, damage, expected):
    data, header = _valid_file(standard, tmp_path)
    bad = _rewrite(tmp_path, "bad.seg.nrrd", *damage(data, header))
    out_dir = tmp_path / "never"
    assert _export(bad, standard.written.ct_dir, out_dir / "RS.dcm") == BAD_INPUT == 3
    err = capsys.readouterr().err
    assert str(bad) in err and expected in err, err
    assert not out_dir.exists()


def test_export_rtstruct_decodes_no_ct_pixels(standard, tmp_path, dciodvfy):
    """Every CT slice holds pixel data nobody can decode (MPEG-2): only the headers are needed, so it works."""
    import shutil

    from pydicom.encaps import encapsulate

    ct = tmp_path / "ct"
    shutil.copytree(standard.written.ct_dir, ct)
    for path in ct.iterdir():
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
        ds.PixelData = encapsulate([b"\x00\x00\x01\xb3"])
        ds.save_as(path)
    seg = write_seg_nrrd(tmp_path / "result.seg.nrrd", _masks(standard), standard.volume.image)
    out = tmp_path / "RS.dcm"
    assert _export(seg, ct, out) == 0
    assert dciodvfy(out) == []
    back = read_rtstruct(out, standard.volume)
    assert all(np.array_equal(back[n], standard.masks[n]) for n in SOME)
