"""The node's parts without a model run: addresses, settings, the CT selection rule, the spool, send and the SCP."""

from __future__ import annotations

import pydicom
import pytest
from node_peers import free_port, wait_until
from pydicom.uid import generate_uid
from SegRapSegmenterLib.errors import DicomNetworkError, InputError
from SegRapSegmenterLib.formats.pydicom_compat import save_file
from SegRapSegmenterLib.node.address import Destination, parse_destination
from SegRapSegmenterLib.node.audit import AuditLog, read_events
from SegRapSegmenterLib.node.config import load_config
from SegRapSegmenterLib.node.scp import StorageScp
from SegRapSegmenterLib.node.scu import echo, send_files
from SegRapSegmenterLib.node.selection import SelectionRule, SeriesSummary, select
from SegRapSegmenterLib.node.spool import Instance, Spool, case_id_for


def test_a_destination_is_ae_at_host_colon_port_and_a_bad_one_says_what_is_wrong():
    assert parse_destination("TPS@10.0.0.5:104") == Destination("TPS", "10.0.0.5", 104)
    for text, fragment in (("TPS10.0.0.5:104", "AE@HOST:PORT"), ("TPS@host:0", "port"),
                           ("A_TITLE_LONGER_THAN_16@h:104", "16"), ("TPS@host", "AE@HOST:PORT")):
        with pytest.raises(InputError, match=fragment):
            parse_destination(text)


def test_flags_win_over_the_config_file_and_a_misspelt_setting_is_an_error(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('ae_title = "FROMFILE"\nport = 4000\nsettle = 45\ndestinations = ["TPS@h:104"]\n'
                    'allow_ae = ["CT1"]\n[delivery]\nattempts = 3\n[selection]\nmin_slices = 20\n')
    config = load_config(path, spool=tmp_path / "spool", port=5000, allow_ae=["PACS", "CT2"], destinations=[])
    assert (config.ae_title, config.port, config.settle_s) == ("FROMFILE", 5000, 45.0)
    assert config.allow_ae == ("PACS", "CT2") and config.destinations == (Destination("TPS", "h", 104),)
    assert config.delivery.attempts == 3 and config.selection.min_slices == 20
    assert config.delivery.delay(1) < config.delivery.delay(3) <= config.delivery.max_delay_s
    path.write_text('ae_titel = "X"\n')
    with pytest.raises(InputError, match="ae_titel"):
        load_config(path, spool=tmp_path)
    assert load_config(None, spool=tmp_path).host == "127.0.0.1"  # listening beyond this machine is a choice
    with pytest.raises(InputError, match="--spool"):
        load_config(None)
    with pytest.raises(InputError, match="--tasks"):
        load_config(None, spool=tmp_path, tasks="oar,lungs")


def _series(uid, description="", instances=50, tags=(), modality="CT"):
    return SeriesSummary(uid, modality, description, instances, tuple(tags))


def test_the_contrast_ct_is_found_by_its_agent_tag_or_its_description_and_plain_wins_on_plain_words():
    rule = SelectionRule()
    by_tag = select([_series("1.1", "Head neck"), _series("1.2", "Head neck 2", tags=["ContrastBolusAgent"])], rule)
    assert (by_tag.plain, by_tag.contrast, by_tag.tasks) == ("1.1", "1.2", ("oar", "gtv"))
    by_text = select([_series("1.1", "HN non-contrast"), _series("1.2", "HN C+ venous")], rule)
    assert (by_text.plain, by_text.contrast) == ("1.1", "1.2")
    custom = select([_series("1.1", "serie A"), _series("1.2", "serie B")],
                    SelectionRule(contrast_patterns=(r"serie b",)))
    assert custom.contrast == "1.2"
    # the notes go to the audit log and stderr: they name the pattern, never the description (it may hold PHI)
    named = select([_series("1.1", "Doe^John plain"), _series("1.2", "Doe^John C+")], rule)
    assert any("matches '\\\\bc\\\\+'" in n for n in named.notes), named.notes
    assert not any("Doe" in n for n in named.notes)


def test_a_plain_ct_alone_gets_the_oars_and_a_study_without_usable_ct_gets_nothing():
    rule = SelectionRule(min_slices=10)
    plain_only = select([_series("1.1", "Plain CT"), _series("1.9", "MR T1", modality="MR")], rule)
    assert plain_only.tasks == ("oar",) and any("GTVs need a contrast CT" in n for n in plain_only.notes)
    none = select([_series("1.1", "scout", instances=3), _series("1.2", "MR", modality="MR")], rule)
    assert not none.usable and any("no usable CT" in n for n in none.notes)
    contrast_only = select([_series("1.2", "CE", tags=["ContrastBolusAgent"])], rule)
    assert (contrast_only.plain, contrast_only.contrast, contrast_only.tasks) == ("1.2", "1.2", ("oar", "gtv"))


def _instance(study, series, sop, ae="CT1"):
    return Instance(study, series, sop, "1.2.840.10008.5.1.4.1.1.2", "CT", "desc", (), ae)


def test_the_spool_queue_goes_received_queued_running_sent_and_survives_a_restart(tmp_path):
    spool = Spool(tmp_path)
    for k in range(3):
        assert spool.store(_instance("1.2.3", "1.2.3.4", f"1.2.3.4.{k}"), b"data", now=100.0 + k) == "received"
    assert spool.settled(30, now=120.0) == [] and spool.settled(30, now=133.0) == ["1.2.3"]
    assert [(s.series_uid, s.instances) for s in spool.series_of("1.2.3")] == [("1.2.3.4", 3)]
    assert spool.queue("1.2.3", "1.2.3.4", None, ("oar",), "plain only")
    job = spool.claim()
    assert job["state"] == "running" and job["attempts"] == 1 and job["case_id"] == case_id_for("1.2.3")
    assert spool.claim() is None
    spool.set_rtstruct("1.2.3", str(tmp_path / "rs.dcm"), "9.9")
    spool.close()

    spool = Spool(tmp_path)  # a restart: the running job is queued again, its RTSTRUCT kept
    [recovered] = spool.recover()
    assert recovered["study_uid"] == "1.2.3" and spool.job("1.2.3")["state"] == "queued"
    assert spool.claim()["rtstruct_uid"] == "9.9"
    assert spool.delivery_attempt("1.2.3", "TPS@h:104", "refused") == 1
    assert spool.delivery_attempt("1.2.3", "TPS@h:104", None) == 2
    assert spool.delivered("1.2.3") == {"TPS@h:104"}
    spool.finish("1.2.3")
    # an image sent again changes nothing; a new image reopens the study for a run whose RTSTRUCT replaces this one
    assert spool.store(_instance("1.2.3", "1.2.3.4", "1.2.3.4.2"), b"again") == "late"
    assert spool.job("1.2.3")["state"] == "sent" and spool.job("1.2.3")["late_instances"] == 1
    assert spool.store(_instance("1.2.3", "1.2.3.4", "1.2.3.4.9"), b"new", now=200.0) == "reopened"
    job = spool.job("1.2.3")
    assert (job["state"], job["rtstruct_uid"], job["previous_rtstruct_uid"], job["attempts"]) == \
        ("received", None, "9.9", 0)
    assert spool.delivered("1.2.3") == set()  # the destination holds the replaced RTSTRUCT only
    spool.close()


def test_the_settle_clock_restarts_at_node_start_and_rerun_redeliver_need_a_finished_study(tmp_path):
    spool = Spool(tmp_path)
    spool.store(_instance("1.6", "1.6.1", "1.6.1.1"), b"x", now=100.0)
    assert spool.settled(30, now=1000.0) == ["1.6"]  # 900 s "quiet", but the node was down for them
    assert spool.restart_settle_clocks(now=1000.0) == 1
    assert spool.settled(30, now=1020.0) == [] and spool.settled(30, now=1031.0) == ["1.6"]
    with pytest.raises(InputError, match="is received"):
        spool.rerun("1.6")
    with pytest.raises(InputError, match="no such study"):
        spool.redeliver("9.9.9")
    spool.fail("1.6", "no usable CT")
    with pytest.raises(InputError, match="no RTSTRUCT"):
        spool.redeliver("1.6")
    spool.rerun("1.6")
    assert spool.job("1.6")["state"] == "received" and spool.job("1.6")["reason"] is None
    spool.close()


def test_a_failed_study_sent_again_is_reopened_and_uids_that_are_not_uids_are_refused(tmp_path):
    spool = Spool(tmp_path)
    spool.store(_instance("1.5", "1.5.1", "1.5.1.1"), b"x")
    spool.fail("1.5", "no usable CT")
    assert spool.store(_instance("1.5", "1.5.1", "1.5.1.2"), b"x") == "reopened"
    assert spool.job("1.5")["state"] == "received" and spool.job("1.5")["reason"] is None
    with pytest.raises(ValueError):
        spool.store(_instance("1.5", "../../etc", "1.5.1.3"), b"x")
    assert not (tmp_path / "etc").exists() and list((tmp_path / "incoming").iterdir()) == []
    spool.close()


@pytest.fixture
def scp(tmp_path):
    """The node's SCP in this process (no model run), allowing the calling AE title CT1 only."""
    spool = Spool(tmp_path / "spool")
    server = StorageScp("SEGRAP", "127.0.0.1", 0, spool, AuditLog(spool.audit_path), allow_ae=("CT1",))
    server.start()
    yield server
    server.stop()
    spool.close()


def test_send_stores_a_ct_series_in_the_scp_and_says_why_when_it_cannot(scp, phantom_studies, tmp_path):
    study = phantom_studies[0]
    dest = Destination("SEGRAP", "127.0.0.1", scp.port)
    echo(dest, "CT1")
    report = send_files([study.ct_dir], dest, "CT1")
    assert len(report.sent) == 48 and len(list((scp.spool.root / "studies").rglob("*.dcm"))) == 48
    assert scp.spool.job(study.study_uid)["calling_ae"] == "CT1"

    with pytest.raises(DicomNetworkError, match="rejected.*Calling AE title not recognised"):
        send_files([study.ct_dir], dest, "INTRUDER")
    with pytest.raises(DicomNetworkError, match="no DICOM connection"):
        send_files([study.ct_dir], Destination("SEGRAP", "127.0.0.1", free_port()), "CT1", timeout=5)
    ds = pydicom.dcmread(sorted(study.ct_dir.glob("*.dcm"))[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    save_file(ds, tmp_path / "mr.dcm")
    with pytest.raises(DicomNetworkError, match="status 0x0122.*CT images only"):
        send_files([tmp_path / "mr.dcm"], dest, "CT1")
    with pytest.raises(InputError, match="not a readable DICOM file"):
        (tmp_path / "notes.txt").write_text("not DICOM")
        send_files([tmp_path / "notes.txt"], dest, "CT1")
    events = [e["event"] for e in read_events(scp.spool.audit_path)]
    assert "association_rejected" in events and "instance_refused" in events
    assert len(list((scp.spool.root / "studies").rglob("*.dcm"))) == 48


def test_a_store_the_peer_refuses_is_an_error_naming_the_file_and_status(tmp_path, phantom_studies):
    from pynetdicom import AE, evt

    ae = AE(ae_title="FULL")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.2")
    ae.add_supported_context("1.2.840.10008.1.1")
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xA700)])
    try:
        dest = Destination("FULL", "127.0.0.1", server.server_address[1])
        first = sorted(phantom_studies[0].ct_dir.glob("*.dcm"))[0]
        with pytest.raises(DicomNetworkError, match=r"refused .*CT0001.dcm.*0xA700"):
            send_files([first], dest)
    finally:
        server.shutdown()


def test_the_slicer_logic_sends_through_the_same_code(scp, phantom_studies):
    from SegRapSegmenterLib.slicer_bridge.logic import SegmentationLogic

    first = sorted(phantom_studies[0].ct_dir.glob("*.dcm"))[0]
    report = SegmentationLogic.sendRtStruct(first, f"SEGRAP@127.0.0.1:{scp.port}", calling_ae="CT1")
    assert report.sent == [str(pydicom.dcmread(first, stop_before_pixels=True).SOPInstanceUID)]
    with pytest.raises(DicomNetworkError, match="rejected"):
        SegmentationLogic.sendRtStruct(first, f"SEGRAP@127.0.0.1:{scp.port}")


def test_the_readme_node_configuration_loads(tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```toml\n(# node.toml.*?)```", readme, re.S)
    assert block, "README.md: no node.toml example"
    (tmp_path / "node.toml").write_text(block.group(1))
    config = load_config(tmp_path / "node.toml", spool=tmp_path / "spool")
    assert config.destinations[0] == Destination("TPS", "10.0.0.5", 104) and config.allow_ae == ("CT_SIM", "PACS")
    assert config.selection.min_slices == 10 and config.delivery.attempts == 8


def test_the_full_node_configuration_in_docs_loads(tmp_path):
    """docs/node.md holds every setting (the README only a minimal file); it must load as it is written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "node.md").read_text(encoding="utf-8")
    block = re.search(r"```toml\n(# node.toml.*?)```", text, re.S)
    assert block, "docs/node.md: no node.toml example"
    (tmp_path / "node.toml").write_text(block.group(1))
    config = load_config(tmp_path / "node.toml", spool=tmp_path / "spool")
    assert [str(d) for d in config.destinations] == ["TPS@10.0.0.5:104", "PACS@10.0.0.7:104"]
    assert config.device == "cuda" and config.delivery.first_delay_s == 10 and config.selection.min_slices == 10
    assert (config.idle_s, config.association_s, config.max_pdu_kb, config.audit_max_mb) == (60, 3600, 256, 64)


RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"


def _ct_only_scp(ae_title: str = "NORT"):
    """A pynetdicom Storage SCP that accepts CT Image Storage and C-ECHO but not RT Structure Set Storage."""
    from pynetdicom import AE, evt

    ae = AE(ae_title=ae_title)
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.2")
    ae.add_supported_context("1.2.840.10008.1.1")
    return ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])


def _rtstruct_like(phantom, tmp_path):
    """A file of the RT Structure Set Storage SOP class (a CT header relabelled: only the class matters here)."""
    ds = pydicom.dcmread(sorted(phantom.ct_dir.glob("*.dcm"))[0], stop_before_pixels=True)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"
    path = tmp_path / "rtstruct.dcm"
    save_file(ds, path)
    return path


def test_a_peer_that_does_not_accept_rtstruct_storage_is_a_permanent_refusal_naming_the_sop_class(
        tmp_path, phantom_studies):
    from SegRapSegmenterLib.errors import DicomRefusedError

    server = _ct_only_scp()
    try:
        dest = Destination("NORT", "127.0.0.1", server.server_address[1])
        with pytest.raises(DicomRefusedError, match="does not accept RT Structure Set Storage"):
            send_files([_rtstruct_like(phantom_studies[0], tmp_path)], dest)
    finally:
        server.shutdown()


def test_a_job_that_raises_anything_unexpected_is_failed_and_the_worker_slot_goes_on(tmp_path):
    import threading

    from SegRapSegmenterLib.node.service import Node

    config = load_config(None, spool=tmp_path / "spool", port=0, device="cpu", bundle="demo", workers=1)
    node = Node(config)
    for study in ("1.7.1", "1.7.2"):  # queued without a plain CT series: the job cannot build its request
        node.spool.store(_instance(study, study + ".1", study + ".1.1"), b"x")
        assert node.spool.queue(study, None, None, ("oar",), "broken on purpose")
    loop = threading.Thread(target=node._worker_loop, args=(node.runners[0],), daemon=True)
    loop.start()
    try:
        wait_until(lambda: all(node.spool.job(s)["state"] == "failed" for s in ("1.7.1", "1.7.2")), 30,
                   "both broken jobs to be failed")
    finally:
        node.stop()
        loop.join(10)
    assert not loop.is_alive()
    for study in ("1.7.1", "1.7.2"):
        assert node.spool.job(study)["reason"].startswith("internal error: TypeError")
    crashes = [e for e in read_events(node.spool.audit_path) if e["event"] == "internal_error"]
    assert [e["study_uid"] for e in crashes] == ["1.7.1", "1.7.2"]
    node.spool.close()


def test_a_permanent_association_rejection_or_refusal_status_is_refused_for_good_and_an_outage_is_not(
        tmp_path, phantom_studies):
    from pynetdicom import AE, evt
    from SegRapSegmenterLib.errors import DicomRefusedError

    first = sorted(phantom_studies[0].ct_dir.glob("*.dcm"))[0]
    statuses = {"1": 0xA900, "2": 0xA700}
    ae = AE(ae_title="PICKY")
    ae.require_called_aet = True  # rejected (permanent): called AE title not recognised
    ae.maximum_associations = 1  # a second association at once: rejected (transient): local limit exceeded
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.2")
    ae.add_supported_context("1.2.840.10008.1.1")
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
        (evt.EVT_C_STORE, lambda event: statuses[event.assoc.requestor.ae_title[-1]])])
    port = server.server_address[1]

    def idle() -> None:  # the server's one association slot is free again
        wait_until(lambda: not server.active_associations, 10, "the previous association to end", interval=0.05)

    try:
        with pytest.raises(DicomRefusedError, match="Called AE title not recognised"):
            send_files([first], Destination("SOMEONE", "127.0.0.1", port))
        idle()
        with pytest.raises(DicomRefusedError, match="0xA900"):
            send_files([first], Destination("PICKY", "127.0.0.1", port), "SENDER1")
        idle()
        with pytest.raises(DicomNetworkError, match="0xA700") as transient:
            send_files([first], Destination("PICKY", "127.0.0.1", port), "SENDER2")
        assert not isinstance(transient.value, DicomRefusedError)
        idle()
        holder = AE(ae_title="HOLDER")
        holder.add_requested_context("1.2.840.10008.1.1")
        held = holder.associate("127.0.0.1", port, ae_title="PICKY")
        assert held.is_established
        try:
            with pytest.raises(DicomNetworkError, match="Local limit exceeded") as busy:
                send_files([first], Destination("PICKY", "127.0.0.1", port), "SENDER1")
            assert not isinstance(busy.value, DicomRefusedError)
        finally:
            held.release()
    finally:
        server.shutdown()


def test_a_full_spool_database_or_disk_refuses_with_out_of_resources_and_the_scp_keeps_serving(
        tmp_path, phantom_studies):
    spool = Spool(tmp_path / "spool")
    server = StorageScp("SEGRAP", "127.0.0.1", 0, spool, AuditLog(spool.audit_path), min_free_mb=0)
    server.start()
    files = sorted(phantom_studies[0].ct_dir.glob("*.dcm"))
    dest = Destination("SEGRAP", "127.0.0.1", server.port)
    try:
        # SQLite's page limit makes this connection answer "database or disk is full", as a full disk does
        pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
        spool._db.execute(f"PRAGMA max_page_count={pages}")
        with pytest.raises(DicomNetworkError, match="0xA700: spool database: database or disk is full"):
            for path in files:  # a page or two may still be free: the first that needs a new one is refused
                send_files([path], dest)
        spool._db.execute("PRAGMA max_page_count=1073741823")
        assert len(send_files([files[-1]], dest).sent) == 1  # the same SCP, still serving

        server.min_free_mb = spool.free_mb() + 1e6  # the watermark: more free space than the disk has
        with pytest.raises(DicomNetworkError, match="0xA700: spool disk low"):
            send_files([files[-2]], dest)
    finally:
        server.stop()
    reasons = [e["reason"] for e in read_events(spool.audit_path) if e["event"] == "instance_refused"]
    assert any("database or disk is full" in r for r in reasons) and any("below" in r for r in reasons)
    assert str(pydicom.dcmread(files[-2], stop_before_pixels=True).SOPInstanceUID) not in \
        {p.stem for p in (spool.root / "studies").rglob("*.dcm")}
    spool.close()


def test_connections_trickling_an_association_request_are_dropped_and_do_not_lock_senders_out(
        tmp_path, phantom_studies):
    import socket
    import threading
    import time

    from pynetdicom.pdu import A_ASSOCIATE_RQ

    spool = Spool(tmp_path / "spool")
    server = StorageScp("SEGRAP", "127.0.0.1", 0, spool, AuditLog(spool.audit_path), negotiation_s=3)
    server.start()
    request = A_ASSOCIATE_RQ()
    request.calling_ae_title, request.called_ae_title = "SLOW", "SEGRAP"
    data = request.encode()  # a real A-ASSOCIATE-RQ, sent one byte a second
    stop = threading.Event()
    cut: list[bool] = []

    def trickle() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            for i in range(len(data)):
                if stop.wait(1.0):
                    return
                try:
                    s.sendall(data[i:i + 1])
                except OSError:  # the node closed the connection
                    cut.append(True)
                    return

    slow = [threading.Thread(target=trickle, daemon=True) for _ in range(20)]  # more than the 16 slots
    for t in slow:
        t.start()
    try:
        time.sleep(1.5)  # every slot is taken now
        dest = Destination("SEGRAP", "127.0.0.1", server.port)
        started = time.monotonic()
        wait_until(lambda: _echoes(dest), 20, "a C-ECHO to get through", interval=0.5)
        assert time.monotonic() - started < 15  # within the 3 s deadline and a few retries, not the trickle's 60+ s
        send_files([sorted(phantom_studies[0].ct_dir.glob("*.dcm"))[0]], dest)
        wait_until(lambda: len(cut) == 20, 20, "every trickling connection to be closed by the node")
    finally:
        stop.set()
        server.stop()
    dropped = [e for e in read_events(spool.audit_path) if e["event"] == "association_dropped"]
    # beyond the 8 connections that may negotiate at once, each new one closes the oldest; the rest wait out 3 s
    room = [e for e in dropped if "the oldest makes room" in e["reason"]]
    assert len(dropped) == 20 and len(room) >= 20 - server.max_negotiating
    assert all("within 3 s" in e["reason"] for e in dropped if e not in room)
    spool.close()


def _echoes(dest) -> bool:
    try:
        echo(dest, "CT1", timeout=5)
    except DicomNetworkError:
        return False
    return True


def _ct_of_size(phantom, tmp_path, megabytes: float):
    """A valid CT image whose pixel data makes it about ``megabytes`` MB (square, 16-bit)."""
    import numpy as np

    ds = pydicom.dcmread(sorted(phantom.ct_dir.glob("*.dcm"))[0])
    side = int((megabytes * 1e6 / 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.PixelData = np.zeros((side, side), dtype=np.uint16).tobytes()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / f"ct-{megabytes:g}mb.dcm"
    save_file(ds, path)
    return path


def test_a_data_set_over_the_cap_is_refused_and_one_far_over_it_ends_its_association(tmp_path, phantom_studies,
                                                                                       caplog):
    import logging
    import time

    caplog.set_level(logging.INFO)  # pynetdicom's logging on, as in the whole suite
    spool = Spool(tmp_path / "spool")
    server = StorageScp("SEGRAP", "127.0.0.1", 0, spool, AuditLog(spool.audit_path), max_instance_mb=1)
    server.start()
    dest = Destination("SEGRAP", "127.0.0.1", server.port)
    phantom = phantom_studies[0]
    try:
        with pytest.raises(DicomNetworkError, match="0xA700: data set of 2 MB, over the node's cap of 1 MB"):
            send_files([_ct_of_size(phantom, tmp_path, 1.5)], dest)
        far_over = _ct_of_size(phantom, tmp_path, 8)
        for _ in range(3):  # one in three such sends took 107 s on a loaded machine before the node reset the link
            started = time.monotonic()
            with pytest.raises(DicomNetworkError, match="no answer to the C-STORE"):
                send_files([far_over], dest)
            # the sender learns at once: the node resets the connection it drops (a plain close left the sender
            # probing a zero window for tcp_fin_timeout), and the sender aborts rather than awaits a release
            assert time.monotonic() - started < 10
        small = _ct_of_size(phantom, tmp_path, 0.5)
        assert len(send_files([small], dest).sent) == 1  # still serving, and a data set under the cap is stored
    finally:
        server.stop()
    events = read_events(spool.audit_path)
    assert [e["reason"] for e in events if e["event"] == "association_dropped"] == \
        ["over 2 MB for one data set (the cap is 1 MB)"] * 3
    assert len(list((spool.root / "studies").rglob("*.dcm"))) == 1
    spool.close()


def test_what_holds_patient_data_is_readable_by_the_node_user_only(tmp_path):
    import os
    import stat

    old = os.umask(0o022)  # a permissive umask: the spool sets its own modes
    try:
        spool = Spool(tmp_path / "spool")
        spool.store(_instance("1.8", "1.8.1", "1.8.1.1"), b"x")
        AuditLog(spool.audit_path).write("started")
    finally:
        os.umask(old)
    mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
    root = spool.root
    assert {mode(p) for p in (root, root / "studies", root / "incoming", root / "jobs")} == {0o700}
    assert mode(root / "studies" / "1.8") == 0o700 and mode(root / "studies" / "1.8" / "1.8.1") == 0o700
    assert mode(root / "studies" / "1.8" / "1.8.1" / "1.8.1.1.dcm") == 0o600
    assert mode(spool.db_path) == 0o600 and mode(spool.audit_path) == 0o600
    spool.close()


def test_a_node_loop_that_ends_or_dies_while_the_node_runs_stops_the_node_with_exit_1(tmp_path):
    from SegRapSegmenterLib.node.service import Node

    node = Node(load_config(None, spool=tmp_path / "spool", port=0, device="cpu", bundle="demo", workers=1))

    def dies() -> None:
        raise RuntimeError("the loop's own bug")

    node._guarded("worker slot 0", dies)
    assert node.stop_event.is_set() and node._fatal == "worker slot 0 died: RuntimeError: the loop's own bug"
    assert node.run() == 1  # run() with the stop already set: it stops at once and says why
    events = read_events(node.spool.audit_path)
    assert events[-2]["event"] == "stopping" and events[-2]["reason"].startswith("worker slot 0 died")
    assert events[-1] == {**events[-1], "event": "stopped", "exit_code": 1}

    calm = Node(load_config(None, spool=tmp_path / "spool2", port=0, device="cpu", bundle="demo", workers=1))
    calm._guarded("courier to TPS", lambda: None)  # a loop that returns while the node runs is as fatal
    assert calm._fatal == "courier to TPS ended while the node was running" and calm.stop_event.is_set()
    calm.spool.close()


def test_an_older_nodes_database_is_migrated_and_its_deliveries_still_count(tmp_path):
    import sqlite3

    old = sqlite3.connect(tmp_path / "node.sqlite")  # the first release's tables, a study sent to TPS
    old.executescript("""
CREATE TABLE jobs (study_uid TEXT PRIMARY KEY, case_id TEXT NOT NULL, state TEXT NOT NULL, calling_ae TEXT,
  first_received REAL, last_received REAL, queued_at REAL, started_at REAL, finished_at REAL, plain_series TEXT,
  contrast_series TEXT, tasks TEXT, notes TEXT, attempts INTEGER DEFAULT 0, worker_pid INTEGER, rtstruct TEXT,
  rtstruct_uid TEXT, reason TEXT, late_instances INTEGER DEFAULT 0);
CREATE TABLE deliveries (study_uid TEXT NOT NULL, destination TEXT NOT NULL, state TEXT NOT NULL,
  attempts INTEGER DEFAULT 0, sent_at REAL, last_error TEXT, PRIMARY KEY (study_uid, destination));
INSERT INTO jobs (study_uid, case_id, state, rtstruct_uid) VALUES ('1.9', 'study-x', 'sent', '9.1');
INSERT INTO deliveries VALUES ('1.9', 'TPS@h:104', 'sent', 1, 5.0, NULL);
""")
    old.commit()
    old.close()
    spool = Spool(tmp_path)
    assert spool.delivered("1.9") == {"TPS@h:104"}  # not sent a second time after the upgrade
    assert spool.job("1.9")["previous_rtstruct_uid"] is None
    spool.close()


def test_an_association_over_the_limit_is_audited_as_such_not_as_an_unknown_ae_title(scp):
    from pynetdicom import AE

    held = []
    try:
        for _ in range(16):  # every slot taken by an allowed sender
            ae = AE(ae_title="CT1")
            ae.add_requested_context("1.2.840.10008.1.1")
            held.append(ae.associate("127.0.0.1", scp.port, ae_title="SEGRAP"))
        assert all(a.is_established for a in held)
        with pytest.raises(DicomNetworkError, match="Local limit exceeded"):
            echo(Destination("SEGRAP", "127.0.0.1", scp.port), "CT1", timeout=5)
    finally:
        for assoc in held:
            assoc.release()
    with pytest.raises(DicomNetworkError, match="Calling AE title not recognised"):
        echo(Destination("SEGRAP", "127.0.0.1", scp.port), "INTRUDER", timeout=5)
    reasons = [e["reason"] for e in read_events(scp.spool.audit_path) if e["event"] == "association_rejected"]
    assert reasons == ["local limit exceeded (16 associations at once)", "calling AE title not on the allow-list"]


def test_status_says_whether_a_node_serves_the_spool_and_marks_runs_a_dead_node_left(tmp_path):
    import os
    import subprocess
    import sys

    from SegRapSegmenterLib.node.service import status_text

    spool = Spool(tmp_path)
    spool.store(_instance("1.4", "1.4.1", "1.4.1.1"), b"x")
    assert spool.queue("1.4", "1.4.1", None, ("oar",), "")
    spool.claim()  # running, as a killed node leaves it
    spool.close()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "node.pid").write_text(gone.stdout.strip())
    text = status_text(tmp_path)
    assert "node: NOT RUNNING" in text and "(interrupted: the node is not running)" in text
    assert "node: running" not in text
    (tmp_path / "node.pid").write_text(str(os.getpid()))  # this pytest process is no 'serve' process either
    assert "node: NOT RUNNING" in status_text(tmp_path)


def test_serve_refuses_to_start_without_its_model_bundle_before_it_listens(tmp_path):
    import subprocess
    import sys

    port = free_port()
    run = subprocess.run([sys.executable, "-m", "SegRapSegmenterLib.cli", "serve", "--spool", str(tmp_path / "spool"),
                          "--port", str(port), "--bundle", "no-such-bundle", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 4 and "'no-such-bundle' is not installed" in run.stderr
    assert not (tmp_path / "spool" / "node.pid").exists()  # it stopped before claiming the spool or listening


def test_a_spool_whose_folders_are_symbolic_links_is_refused(tmp_path):
    from SegRapSegmenterLib.errors import OutputError

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "studies").symlink_to(elsewhere)
    with pytest.raises(OutputError, match="studies is a symbolic link"):
        Spool(tmp_path / "spool")
    assert list(elsewhere.iterdir()) == []


def test_images_a_contoured_study_holds_already_are_counted_once_per_association_not_audited_one_by_one(
        scp, phantom_studies):
    study = phantom_studies[1]
    dest = Destination("SEGRAP", "127.0.0.1", scp.port)
    send_files([study.ct_dir], dest, "CT1")
    scp.spool.fail(study.study_uid, "finished for this test")  # as after a run
    scp.spool.finish(study.study_uid)
    send_files([study.ct_dir], dest, "CT1")  # the whole series again

    def closed_events() -> list:
        return [e for e in read_events(scp.spool.audit_path) if e["event"] == "association_closed"]

    closed = wait_until(lambda: len(closed_events()) == 2 and closed_events(), 10, "both associations closed")
    events = read_events(scp.spool.audit_path)
    assert closed[-1]["stored"] == 48 and closed[-1]["already_held"] == 48
    assert not [e for e in events if e["event"] in ("late_instance", "study_reopened")]
    assert scp.spool.job(study.study_uid)["late_instances"] == 48


def test_finished_studies_older_than_keep_days_lose_their_images_and_outputs_but_not_their_history(tmp_path):
    spool = Spool(tmp_path)
    for study, finished_at in (("1.11", 1000.0), ("1.12", 1000.0 + 9 * 86400)):
        spool.store(_instance(study, study + ".1", study + ".1.1"), b"x")
        (tmp_path / "jobs" / case_id_for(study)).mkdir()
        spool.fail(study, "finished")
        with spool._tx() as db:
            db.execute("UPDATE jobs SET finished_at=? WHERE study_uid=?", (finished_at, study))
    spool.store(_instance("1.13", "1.13.1", "1.13.1.1"), b"x")  # still arriving: never purged
    assert spool.purge(keep_days=7, now=1000.0 + 10 * 86400) == ["1.11"]
    assert not (tmp_path / "studies" / "1.11").exists() and not (tmp_path / "jobs" / case_id_for("1.11")).exists()
    assert (tmp_path / "studies" / "1.12").is_dir() and (tmp_path / "studies" / "1.13").is_dir()
    assert spool.series_of("1.11") == [] and spool.job("1.11")["state"] == "failed"
    assert spool.purge(keep_days=7, now=1000.0 + 10 * 86400) == []  # once
    spool.close()


def test_the_temporary_files_a_killed_node_left_in_its_spool_are_removed_at_the_next_start(tmp_path):
    import tempfile

    from SegRapSegmenterLib.node.service import Node

    spool_dir = tmp_path / "spool"
    Spool(spool_dir).close()
    left = spool_dir / "tmp" / "segrap-run-abc123"  # a worker's run folder, as a SIGKILLed node leaves it
    left.mkdir()
    (left / "request.json").write_text("{}")
    (spool_dir / "tmp" / "tmpq1w2e3.dcm").write_bytes(b"half a data set")
    node = Node(load_config(None, spool=spool_dir, port=0, device="cpu", bundle="demo", workers=1))
    node._recover()
    assert list((spool_dir / "tmp").iterdir()) == []
    assert [e["partial_files"] for e in read_events(node.spool.audit_path) if e["event"] == "spool_cleaned"] == [2]
    before = tempfile.tempdir
    node.stop()
    assert node.run() == 0 and tempfile.tempdir == before  # run() points tempfile at spool/tmp only while it runs


def test_a_start_tells_a_run_that_ended_without_stopped_from_a_clean_stop(tmp_path):
    from SegRapSegmenterLib.node.service import _unclean_end

    audit = AuditLog(tmp_path / "audit.jsonl")
    assert _unclean_end(audit.path) is None  # a new spool: no earlier run
    audit.write("started")
    audit.write("stopped")
    audit.write("association_closed", how="EVT_ABORTED")  # a straggler after the clean stop
    assert _unclean_end(audit.path) is None
    audit.write("started")
    audit.write("job_started", study_uid="1.2.3")
    with open(audit.path, "a") as f:
        f.write('{"time": "2026-12-06T00:00:00Z", "event": "sen')  # the line the SIGKILL cut
    assert _unclean_end(audit.path)["event"] == "job_started"
    for i in range(300):  # a run of months: its 'started' is beyond the tail that is read
        audit.write("association", calling_ae=f"SCANNER{i}")
    assert _unclean_end(audit.path, tail_bytes=4096)["event"] == "association"


def test_the_scp_refuses_to_start_on_a_pynetdicom_whose_hooks_differ_and_warns_on_an_unchecked_release(
        tmp_path, monkeypatch):
    import pynetdicom
    from pynetdicom.dul import DULServiceProvider

    spool = Spool(tmp_path / "spool")
    audit = AuditLog(spool.audit_path)
    monkeypatch.setattr(pynetdicom, "__version__", "3.9.0")
    server = StorageScp("SEGRAP", "127.0.0.1", 0, spool, audit)
    server.start()
    try:
        assert echo(Destination("SEGRAP", "127.0.0.1", server.port)) is None  # the bounds' hooks are there: it serves
    finally:
        server.stop()
    warning = [e for e in read_events(spool.audit_path) if e["event"] == "warning"]
    assert len(warning) == 1 and "pynetdicom 3.9.0" in warning[0]["reason"] and "3.0" in warning[0]["reason"]

    def reads_otherwise(self):  # a DUL that reads a PDU some other way: the node's length bound would not apply
        return self.socket.recv(1 << 16)

    monkeypatch.setattr(DULServiceProvider, "_read_pdu_data", reads_otherwise)
    with pytest.raises(DicomNetworkError, match=r"lacks the DUL's 6-byte header read, the DUL's read of the announced "
                                                r"length\. Install a 3\.0 release"):
        StorageScp("SEGRAP", "127.0.0.1", 0, spool, audit).start()
    assert read_events(spool.audit_path)[-1]["event"] == "refused_to_start"
    spool.close()
