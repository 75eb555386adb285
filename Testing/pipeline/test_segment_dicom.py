"""`segrap segment --rtstruct` on a DICOM CT series: the structure set references the original CT."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pydicom
from SegRapSegmenterLib import cli
from SegRapSegmenterLib.formats.dicom import read_ct_series
from SegRapSegmenterLib.formats.rtstruct import read_rtstruct
from SegRapSegmenterLib.formats.segfile import read_seg_nrrd
from SegRapSegmenterLib.phantom import cases as phantom
from SegRapSegmenterLib.phantom.dicom_series import write_phantom_dicom

HELD_OUT_SEED = 99  # a cohort the demo model never saw (it was trained on seed 2023)


def test_rtstruct_from_a_dicom_ct_references_its_instances(tmp_path, capsys):
    case = phantom.make_case(1, seed=HELD_OUT_SEED, size="small")
    written = write_phantom_dicom(case, tmp_path / "dicom", seed=HELD_OUT_SEED)
    out = tmp_path / "out"
    rc = cli.main(["segment", "--ct", str(written.ct_dir), "--contrast-ct", str(written.contrast_dir),
                   "--tasks", "gtv", "--rtstruct", "--out", str(out), "--case-id", "patient1", "--bundle", "demo",
                   "--device", "cpu", "--json"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    done = [json.loads(line) for line in capsys.readouterr().out.splitlines()][-1]
    rtstruct = pydicom.dcmread(done["outputs"]["rtstruct"])
    ct_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in written.ct_dir.iterdir()}
    referenced = {item.ReferencedSOPInstanceUID for item in rtstruct.ReferencedFrameOfReferenceSequence[0]
                  .RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].ContourImageSequence}
    assert referenced == ct_uids
    assert rtstruct.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == written.frame_of_reference_uid
    assert [r.ROIName for r in rtstruct.StructureSetROISequence] == ["GTVp", "GTVn"]
    # issue 31: the provenance names the structure set it belongs with, by UID and checksum
    from SegRapSegmenterLib.inference.bundles import sha256_file

    listed = json.loads(open(done["outputs"]["provenance"]).read())["outputs"]["rtstruct"]
    assert listed == {"file": "patient1_RTSTRUCT.dcm", "sha256": sha256_file(done["outputs"]["rtstruct"]),
                      "sop_instance_uid": rtstruct.SOPInstanceUID}
    # the structure set holds what the .seg.nrrd holds
    volume = read_ct_series(written.ct_dir)
    from_rt = read_rtstruct(done["outputs"]["rtstruct"], volume)
    seg = read_seg_nrrd(done["outputs"]["segmentation"])
    for name in ("GTVp", "GTVnd"):
        assert np.array_equal(from_rt[name], seg.masks[name])
    if shutil.which("dciodvfy"):
        report = subprocess.run(["dciodvfy", done["outputs"]["rtstruct"]], capture_output=True, text=True)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert errors == []
