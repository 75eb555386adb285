"""CT series as PACS export them: JPEG Lossless SV1, JPEG-LS and JPEG 2000 lossless are read, segmented and exported.

The phantom's CT is transcoded by DCMTK (dcmcjpeg, dcmcjpls: encoders independent of the decoder,
python-gdcm) where DCMTK is installed, and by GDCM itself for JPEG 2000 (DCMTK's free toolkit has
no JPEG 2000 codec) and when it is not. Every syntax reads to the uncompressed series' volume (the same
HU and grid: what `segrap segment` reads from a folder, so its labels are a function of it) and serves as
export-rtstruct's reference; `segrap segment` itself runs once on the uncompressed series and once on a
compressed one (JPEG-LS, DCMTK-encoded where DCMTK is there), and the two runs give the same labels.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from SegRapSegmenterLib import cli
from SegRapSegmenterLib.formats.dicom import read_ct_series
from SegRapSegmenterLib.formats.rtstruct import read_rtstruct
from SegRapSegmenterLib.formats.segfile import read_seg_nrrd
from SegRapSegmenterLib.phantom.dicom_series import write_variant

SYNTAXES = {  # name: (transfer syntax UID, DCMTK command or None for GDCM)
    "jpeg-lossless-sv1": ("1.2.840.10008.1.2.4.70", ["dcmcjpeg", "+e1"]),
    "jpeg-ls-lossless": ("1.2.840.10008.1.2.4.80", ["dcmcjpls", "+el"]),
    "jpeg2000-lossless": ("1.2.840.10008.1.2.4.90", None),
}
SLICES = 24  # enough anatomy for the demo model, few slices for CI


def _gdcm_transcode(src: Path, dst: Path, uid: str) -> None:
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read(), src
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(uid)))
    change.SetInput(reader.GetImage())
    assert change.Change(), f"GDCM cannot encode {uid}"
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write(), dst


def transcode(src_dir: Path, dst_dir: Path, name: str, peer=None) -> Path:
    """Every file of a series folder in the transfer syntax ``name``: DCMTK (``peer`` finds it) where it has the
    codec, else GDCM."""
    uid, command = SYNTAXES[name]
    dst_dir.mkdir(parents=True)
    tool = peer(command[0], f"the {name} encoder") if command and peer else None
    for src in sorted(src_dir.iterdir()):
        if tool:
            subprocess.run([tool, *command[1:], str(src), str(dst_dir / src.name)], check=True, timeout=60)
        else:
            _gdcm_transcode(src, dst_dir / src.name, uid)
    assert {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            for p in dst_dir.iterdir()} == {uid}
    return dst_dir


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The uncompressed phantom CT series (few slices) and its HU volume."""
    written = write_variant("standard", tmp_path_factory.mktemp("plain"), slices=SLICES)
    return written, read_ct_series(written.ct_dir).image


def _same_volume(image: sitk.Image, plain: sitk.Image) -> bool:
    """The same HU voxels on the same grid (size, spacing, origin, direction)."""
    return (np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(plain))
            and image.GetSize() == plain.GetSize() and image.GetSpacing() == plain.GetSpacing()
            and image.GetOrigin() == plain.GetOrigin() and image.GetDirection() == plain.GetDirection())


@pytest.mark.parametrize("name", sorted(SYNTAXES))
def test_gdcm_encoded_series_reads_to_the_same_hounsfield_units(plain, tmp_path, name):
    """Cheap, and needs no peer: the decoders (python-gdcm, a core dependency) give the stored values back."""
    written, image = plain
    folder = transcode(written.ct_dir, tmp_path / name, name)
    volume = read_ct_series(folder)
    assert volume.series.transfer_syntax == SYNTAXES[name][0]
    assert _same_volume(volume.image, image)


def _segment(ct_dir: Path, out: Path, capsys) -> dict[str, np.ndarray]:
    rc = cli.main(["segment", "--ct", str(ct_dir), "--tasks", "oar", "--out", str(out), "--case-id", "case",
                   "--bundle", "demo", "--device", "cpu", "--json"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    return read_seg_nrrd(out / "case.seg.nrrd").masks


@pytest.fixture(scope="module")
def plain_labels(plain, tmp_path_factory):
    """`segrap segment` on the uncompressed series, run once and shared by every syntax."""
    written, _ = plain
    out = tmp_path_factory.mktemp("plain-out")
    rc = cli.main(["segment", "--ct", str(written.ct_dir), "--tasks", "oar", "--out", str(out), "--case-id", "case",
                   "--bundle", "demo", "--device", "cpu", "--json"])
    assert rc == 0
    masks = read_seg_nrrd(out / "case.seg.nrrd").masks
    assert sum(bool(m.any()) for m in masks.values()) >= 10, "the demo model found too little to compare"
    return out / "case.seg.nrrd", masks


@pytest.mark.parametrize("name", sorted(SYNTAXES))
def test_a_peer_encoded_series_reads_to_the_same_volume_and_is_an_rtstruct_reference(plain, plain_labels, tmp_path,
                                                                                     dciodvfy, peer, name):
    written, image = plain
    folder = transcode(written.ct_dir, tmp_path / name, name, peer)
    volume = read_ct_series(folder)  # the reader `segrap segment` runs on a folder: same volume, same labels
    assert volume.series.transfer_syntax == SYNTAXES[name][0]
    assert _same_volume(volume.image, image)
    seg_path, expected = plain_labels
    # the compressed series as export-rtstruct's reference: headers only, any syntax
    rs = tmp_path / "RS.dcm"
    assert cli.main(["export-rtstruct", str(seg_path), "--reference-ct", str(folder), "-o", str(rs)]) == 0
    assert dciodvfy(rs) == []
    back = read_rtstruct(rs, read_ct_series(written.ct_dir))
    assert all(np.array_equal(back[n], expected[n]) for n in expected)


def test_segment_on_a_compressed_series_gives_the_uncompressed_labels(plain, plain_labels, tmp_path, capsys, peer):
    written, _ = plain
    folder = transcode(written.ct_dir, tmp_path / "jpeg-ls", "jpeg-ls-lossless", peer)
    labels = _segment(folder, tmp_path / "out", capsys)
    _, expected = plain_labels
    assert set(labels) == set(expected)
    assert all(np.array_equal(labels[n], expected[n]) for n in expected), "labels differ from the uncompressed run"
