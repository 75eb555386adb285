"""`segrap segment` on DICOM folders reads each file's header once for discovery (case id, identity check and the
reader share the series found), then each file once with its voxels: counted on the real pydicom reads of a real
run, stopped when the run turns to the model (no inference)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pydicom
import pytest
from SegRapSegmenterLib import pipeline
from SegRapSegmenterLib.errors import Cancelled
from SegRapSegmenterLib.phantom import cases as phantom
from SegRapSegmenterLib.phantom.dicom_series import write_phantom_dicom
from SegRapSegmenterLib.runner import SegmentRequest


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    case = phantom.make_case(1, seed=99, size="small")
    return write_phantom_dicom(case, tmp_path_factory.mktemp("header_reads") / "dicom", seed=99)


def _reads_until(stage: str, req: SegmentRequest, monkeypatch) -> tuple[Counter, Counter]:
    """(header-only reads, full reads) per file while ``pipeline.run`` goes up to its first ``stage`` progress."""
    headers, full = Counter(), Counter()
    dcmread = pydicom.dcmread

    def counted(fp, *args, **kwargs):
        (headers if kwargs.get("stop_before_pixels") else full)[Path(fp)] += 1
        return dcmread(fp, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counted)

    def progress(name, fraction, message):
        if name == stage:
            raise Cancelled(f"stopped at {stage} by the test")

    with pytest.raises(Cancelled, match=f"stopped at {stage}"):
        pipeline.run(req, progress=progress)
    monkeypatch.setattr(pydicom, "dcmread", dcmread)
    return headers, full


def test_each_ct_file_header_is_read_once_then_once_with_its_voxels(study, tmp_path, monkeypatch):
    req = SegmentRequest(ct=str(study.ct_dir), contrast_ct=str(study.contrast_dir), out_dir=str(tmp_path / "out"),
                         bundle="demo", device="cpu")
    headers, full = _reads_until("oar-model", req, monkeypatch)  # the CT read; the contrast CT's voxels come later
    ct_files, contrast_files = sorted(study.ct_dir.iterdir()), sorted(study.contrast_dir.iterdir())
    assert len(ct_files) > 10
    assert {p: headers[p] for p in ct_files} == dict.fromkeys(ct_files, 1)
    assert {p: full[p] for p in ct_files} == dict.fromkeys(ct_files, 1)
    # the contrast CT's headers were read for the identity check, once, and its voxels not yet
    assert {p: headers[p] for p in contrast_files} == dict.fromkeys(contrast_files, 1)
    assert not any(full[p] for p in contrast_files)


def test_a_contrast_ct_alone_is_discovered_once_and_read_once(study, tmp_path, monkeypatch):
    req = SegmentRequest(ct=None, contrast_ct=str(study.contrast_dir), tasks=("gtv",), out_dir=str(tmp_path / "out"),
                         bundle="demo", device="cpu")
    headers, full = _reads_until("gtv-model", req, monkeypatch)
    files = sorted(study.contrast_dir.iterdir())
    assert {p: (headers[p], full[p]) for p in files} == dict.fromkeys(files, (1, 1))
    assert not any(p.parent == study.ct_dir for p in [*headers, *full])
