"""``segrap serve`` with DCMTK as scanner and planning system: studies in, one RTSTRUCT per study out."""

from __future__ import annotations

import pydicom
from node_peers import audit_events, dciodvfy_errors, dcmtk, free_port, storescu, wait_until
from pydicom.uid import generate_uid
from SegRapSegmenterLib.formats.pydicom_compat import save_file
from SegRapSegmenterLib.node.spool import Spool

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def _sop_uids(folder) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sorted(folder.glob("*.dcm"))}


def _referenced(rtstruct) -> tuple[str, str, set[str]]:
    """(study UID, frame of reference UID, referenced CT SOP instance UIDs) of an RTSTRUCT."""
    frame = rtstruct.ReferencedFrameOfReferenceSequence[0]
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    return (str(rtstruct.StudyInstanceUID), str(frame.FrameOfReferenceUID),
            {str(item.ReferencedSOPInstanceUID) for item in series.ContourImageSequence})


def _mr_file(phantom, tmp_path):
    ds = pydicom.dcmread(sorted(phantom.ct_dir.glob("*.dcm"))[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "MR"
    path = tmp_path / "mr.dcm"
    save_file(ds, path)
    return path, str(ds.SOPInstanceUID)


def _send_truncated_ct(phantom, port: int) -> int:
    """C-STORE a CT image whose pixel data is cut short (pynetdicom as the sender); returns the status."""
    from pynetdicom import AE

    ds = pydicom.dcmread(sorted(phantom.ct_dir.glob("*.dcm"))[0])
    ds.SOPInstanceUID = generate_uid()
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3 * 2]
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", port, ae_title="SEGRAP")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def test_two_studies_each_get_one_rtstruct_and_bad_senders_are_refused(tmp_path, phantom_studies, node_factory,
                                                                       storescp_factory):
    dcmtk("storescu")
    first, second = phantom_studies
    tps = storescp_factory(tmp_path / "tps", free_port())
    spool, port = tmp_path / "spool", free_port()
    node = node_factory(spool, port, "--destination", tps.destination, "--allow-ae", "SCANNER", "--settle", "2")

    # a calling AE title not on the allow-list: association rejected, nothing stored
    rejected = storescu(first.ct_dir, port, calling_ae="INTRUDER")
    assert rejected.returncode != 0
    assert "calling ae title not recognized" in (rejected.stdout + rejected.stderr).lower()
    assert audit_events(spool, "association_rejected")[0]["calling_ae"] == "INTRUDER"
    assert not list((spool / "studies").rglob("*.dcm"))

    # the first study (CT + contrast CT), then an MR image and a truncated CT: refused, the node keeps serving
    assert storescu([first.ct_dir, first.contrast_dir], port).returncode == 0
    mr_path, mr_uid = _mr_file(first, tmp_path)
    mr = storescu(mr_path, port)
    assert "Refused: SOPClassNotSupported" in mr.stdout + mr.stderr
    assert _send_truncated_ct(first, port) == 0xA900
    refused = {e["sop_uid"]: e["status"] for e in audit_events(spool, "instance_refused")}
    assert refused[mr_uid] == "0x0122" and "0xA900" in refused.values()

    # the second study (plain CT only) arrives while the first one runs
    wait_until(lambda: audit_events(spool, "job_started"), 120, "the first job to start")
    assert storescu(second.ct_dir, port).returncode == 0

    wait_until(lambda: len(audit_events(spool, "finished")) == 2, 400, "both studies to be delivered", interval=1)
    received = {str(ds.StudyInstanceUID): ds for ds in (pydicom.dcmread(p) for p in tps.files())}
    assert len(tps.files()) == 2 and set(received) == {first.study_uid, second.study_uid}
    for phantom in (first, second):
        rtstruct = received[phantom.study_uid]
        assert rtstruct.Modality == "RTSTRUCT"
        assert _referenced(rtstruct) == (phantom.study_uid, phantom.frame_of_reference_uid, _sop_uids(phantom.ct_dir))
        assert dciodvfy_errors(next(p for p in tps.files() if pydicom.dcmread(p).StudyInstanceUID ==
                                    phantom.study_uid)) == []
    first_rois = {str(r.ROIName) for r in received[first.study_uid].StructureSetROISequence}
    second_rois = {str(r.ROIName) for r in received[second.study_uid].StructureSetROISequence}
    assert any("GTV" in name.upper() for name in first_rois)
    assert second_rois and not any("GTV" in name.upper() for name in second_rois)
    queued = {e["study_uid"]: e for e in audit_events(spool, "job_queued")}
    assert queued[second.study_uid]["tasks"] == ["oar"]
    assert "GTVs need a contrast CT" in queued[second.study_uid]["selection"]

    # the queue as --status prints it, and a clean exit on SIGTERM
    assert node.terminate() == 0
    assert audit_events(spool)[-1]["event"] == "stopped"
    jobs = {row["study_uid"]: row["state"] for row in Spool(spool).jobs()}
    assert jobs == {first.study_uid: "sent", second.study_uid: "sent"}


# the compressed transfer syntaxes a scanner or PACS may send, and how the test makes them: DCMTK's
# dcmcjpeg (+e1: process 14 SV1, +el: process 14) and dcmcjpls (lossless, +en near-lossless); DCMTK has
# no JPEG 2000 encoder, so python-gdcm writes those
COMPRESSIONS = {"1.2.840.10008.1.2.4.70": ("dcmcjpeg", "+e1"), "1.2.840.10008.1.2.4.57": ("dcmcjpeg", "+el"),
                "1.2.840.10008.1.2.4.80": ("dcmcjpls", "+el"), "1.2.840.10008.1.2.4.81": ("dcmcjpls", "+en"),
                "1.2.840.10008.1.2.4.90": ("gdcm", "JPEG2000Lossless"), "1.2.840.10008.1.2.4.91": ("gdcm", "JPEG2000")}
LOSSLESS = {"1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"}


def _compress(source, target, syntax: str) -> None:
    import subprocess

    tool, option = COMPRESSIONS[syntax]
    if tool == "gdcm":
        import gdcm

        reader = gdcm.ImageReader()
        reader.SetFileName(str(source))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, option)))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(target))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
    else:
        subprocess.run([dcmtk(tool), option, str(source), str(target)], check=True, capture_output=True, timeout=60)
    assert str(pydicom.dcmread(target, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax


def _storescu_proposing(syntax: str, folder) -> tuple[str, ...]:
    """storescu options that propose CT Image Storage in ``syntax`` only (a config file: its -x options lack .57)."""
    config = folder / f"storescu-{syntax}.cfg"
    config.write_text(f"[[TransferSyntaxes]]\n[TS]\nTransferSyntax1 = {syntax}\n[[PresentationContexts]]\n[PC]\n"
                      f"PresentationContext1 = 1.2.840.10008.5.1.4.1.1.2\\TS\n[[Profiles]]\n[CT]\n"
                      f"PresentationContexts = PC\n")
    return ("-xf", str(config), "CT")


def test_jpeg_lossless_jpeg_ls_and_jpeg_2000_ct_sent_by_storescu_are_stored_and_decode(tmp_path, phantom_studies):
    import numpy as np
    from SegRapSegmenterLib.node.audit import AuditLog
    from SegRapSegmenterLib.node.scp import StorageScp

    dcmtk("storescu")
    sources = sorted(phantom_studies[0].ct_dir.glob("*.dcm"))
    sent = {}
    for k, syntax in enumerate(COMPRESSIONS):
        target = tmp_path / "compressed" / f"{k}.dcm"
        target.parent.mkdir(exist_ok=True)
        _compress(sources[k], target, syntax)
        sent[syntax] = (sources[k], target)
    spool = Spool(tmp_path / "spool")
    server = StorageScp("SEGRAP", "127.0.0.1", 0, spool, AuditLog(spool.audit_path))
    server.start()
    try:
        for syntax, (_, target) in sent.items():
            result = storescu(target, server.port, options=_storescu_proposing(syntax, tmp_path))
            assert result.returncode == 0, result.stdout + result.stderr
    finally:
        server.stop()
    for syntax, (source, target) in sent.items():
        uid = str(pydicom.dcmread(target, stop_before_pixels=True).SOPInstanceUID)
        [stored] = list((spool.root / "studies").rglob(f"{uid}.dcm"))
        ds = pydicom.dcmread(stored)
        assert str(ds.file_meta.TransferSyntaxUID) == syntax  # stored as it came, decoded by the pipeline
        original = pydicom.dcmread(source).pixel_array.astype(np.int32)
        decoded = ds.pixel_array.astype(np.int32)
        if syntax in LOSSLESS:
            assert np.array_equal(decoded, original), syntax
        else:
            assert np.abs(decoded - original).max() <= 0.02 * (np.ptp(original) + 1), syntax
    spool.close()


def test_a_jpeg_ls_study_is_contoured_and_delivered(tmp_path, phantom_studies, node_factory, storescp_factory):
    dcmtk("storescu")
    study = phantom_studies[0]
    folder = tmp_path / "jpeg-ls"
    folder.mkdir()
    for path in sorted(study.ct_dir.glob("*.dcm")):
        _compress(path, folder / path.name, "1.2.840.10008.1.2.4.80")
    tps = storescp_factory(tmp_path / "tps", free_port())
    spool, port = tmp_path / "spool", free_port()
    node_factory(spool, port, "--destination", tps.destination, "--settle", "1", "--tasks", "oar")
    assert storescu(folder, port, options=_storescu_proposing("1.2.840.10008.1.2.4.80", tmp_path)).returncode == 0
    wait_until(lambda: audit_events(spool, "finished"), 240, "the JPEG-LS study to be delivered", interval=1)
    [rtstruct] = [pydicom.dcmread(p) for p in tps.files()]
    assert _referenced(rtstruct)[2] == _sop_uids(study.ct_dir)
