"""``segrap serve`` under faults that end studies or hold back deliveries: a refusing destination, a worker killed in
every run, new images for a delivered study, a destination that is down beside one that is up.

Kills and restarts of the node, a worker killed once and a destination going down and up are in
test_restart_faults.py (one node's spool through ten faults).
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import psutil
import pydicom
from node_peers import audit_events, dcmtk, free_port, storescu, wait_until


def test_a_destination_refusing_rtstruct_storage_fails_that_study_fast_and_the_next_study_is_contoured(
        tmp_path, thin_studies, node_factory):
    from pynetdicom import AE, evt

    dcmtk("storescu")
    ae = AE(ae_title="NORT")  # a peer that stores CT images but not RT Structure Sets
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.2")
    ae.add_supported_context("1.2.840.10008.1.1")
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0)])
    try:
        spool, port = tmp_path / "spool", free_port()
        node_factory(spool, port, "--destination", f"NORT@127.0.0.1:{server.server_address[1]}", "--settle", "1",
                     "--tasks", "oar")
        first, second = thin_studies
        assert storescu(first.ct_dir, port).returncode == 0
        wait_until(lambda: audit_events(spool, "failed"), 240, "the first study to fail its delivery", interval=1)
        assert storescu(second.ct_dir, port).returncode == 0
        wait_until(lambda: len(audit_events(spool, "failed")) == 2, 240, "the second study to be contoured too",
                   interval=1)
    finally:
        server.shutdown()
    assert {e["study_uid"] for e in audit_events(spool, "job_finished")} == {first.study_uid, second.study_uid}
    refused = audit_events(spool, "delivery_failed")
    assert len(refused) == 2 and all(e["permanent"] and e["attempt"] == 1 for e in refused)
    assert all("does not accept RT Structure Set Storage" in e["error"] for e in refused)
    assert not audit_events(spool, "delivery_retry")
    with sqlite3.connect(f"file:{spool / 'node.sqlite'}?mode=ro", uri=True) as db:
        states = db.execute("SELECT state, reason FROM jobs").fetchall()
        deliveries = db.execute("SELECT state FROM deliveries").fetchall()
    assert [s for s, _ in states] == ["failed", "failed"]
    assert all("does not accept RT Structure Set Storage" in r for _, r in states)
    assert [d for (d,) in deliveries] == ["failed", "failed"]
    # the node's umask: the RTSTRUCTs and everything else the workers wrote are the node user's only
    written = [p for p in (spool / "jobs").rglob("*") if p.is_file()]
    assert any(p.suffix == ".dcm" for p in written)
    assert {p.stat().st_mode & 0o077 for p in written} == {0}


def test_a_worker_killed_in_every_run_fails_its_study_after_the_third_run(tmp_path, thin_studies, node_factory,
                                                                        storescp_factory):
    """A worker killed once is run again (test_restart_faults); one killed in every run fails after three."""
    dcmtk("storescu")
    study = thin_studies[1]
    tps = storescp_factory(tmp_path / "tps", free_port())
    spool, port = tmp_path / "spool", free_port()
    node = node_factory(spool, port, "--destination", tps.destination, "--settle", "1", "--tasks", "oar")
    assert storescu(study.ct_dir, port).returncode == 0
    killed: set[int] = set()

    def new_worker():
        for child in psutil.Process(node.process.pid).children(recursive=True):
            try:
                if child.pid not in killed and "SegRapSegmenterLib.worker" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        return None

    for _ in range(3):  # killed at its start, as the OOM killer would, in every run
        worker = wait_until(new_worker, 120, "the next worker to start", interval=0.05)
        killed.add(worker.pid)
        worker.kill()
    wait_until(lambda: audit_events(spool, "failed"), 120, "the study to fail", interval=0.5)
    job = _job_of(spool, study.study_uid)
    assert job["state"] == "failed" and job["attempts"] == 3
    assert job["reason"].startswith("the worker died in 3 runs (last: the worker killed by SIGKILL")
    assert [e["attempt"] for e in audit_events(spool, "job_retry")] == [1, 2]
    assert [e["attempt"] for e in audit_events(spool, "job_started")] == [1, 2, 3]
    assert not tps.files()


def _job_of(spool, study_uid: str) -> dict:
    with sqlite3.connect(f"file:{spool / 'node.sqlite'}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM jobs WHERE study_uid=?", (study_uid,)).fetchone()
    return dict(row) if row else {}


def _referenced_images(path) -> set[str]:
    rtstruct = pydicom.dcmread(path)
    series = rtstruct.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    return {str(item.ReferencedSOPInstanceUID) for item in series.ContourImageSequence}


def _ct_files(phantom) -> list:
    return sorted(phantom.ct_dir.glob("*.dcm"))


def _uids(files) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}


def test_new_images_reopen_a_delivered_study_and_rerun_and_redeliver_requeue_it(
        tmp_path, thin_studies, node_factory, storescp_factory):
    dcmtk("storescu")
    study = thin_studies[1]
    files = _ct_files(study)
    tps = storescp_factory(tmp_path / "tps", free_port())
    spool, port = tmp_path / "spool", free_port()
    node_factory(spool, port, "--destination", tps.destination, "--settle", "1", "--tasks", "oar")

    def delivered(count: int, files_there: int | None = None) -> list:
        wait_until(lambda: len(audit_events(spool, "finished")) == count, 240, f"delivery {count}", interval=1)
        wait_until(lambda: len(tps.files()) == (files_there or count), 30, f"file {count} at the destination")
        return sorted(tps.files(), key=lambda p: p.stat().st_mtime)

    assert storescu(files[:10], port).returncode == 0
    [first] = delivered(1)
    assert _referenced_images(first) == _uids(files[:10])

    # the rest of the series arrives after the delivery: the study is contoured again, the new RTSTRUCT replaces
    assert storescu(files, port).returncode == 0
    second = delivered(2)[-1]
    first_uid, second_uid = (str(pydicom.dcmread(p).SOPInstanceUID) for p in (first, second))
    assert _referenced_images(second) == _uids(files) and second_uid != first_uid
    assert audit_events(spool, "sent")[-1]["replaces"] == first_uid
    assert audit_events(spool, "study_reopened")

    def serve(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "SegRapSegmenterLib.cli", "serve", *flags, "--spool",
                               str(spool)], capture_output=True, text=True, timeout=60)

    redeliver = serve("--redeliver", study.study_uid)
    assert redeliver.returncode == 0, redeliver.stderr
    delivered(3, files_there=2)  # storescp names its files by SOP instance UID: the same file, stored over itself
    assert audit_events(spool, "sent")[-1]["rtstruct_uid"] == second_uid
    rerun = serve("--rerun", study.study_uid)
    assert rerun.returncode == 0, rerun.stderr
    fourth = delivered(4, files_there=3)[-1]
    assert str(pydicom.dcmread(fourth).SOPInstanceUID) not in (first_uid, second_uid)
    assert _referenced_images(fourth) == _uids(files)
    assert len(audit_events(spool, "job_started")) == 3  # first, reopened, rerun; the redelivery ran nothing
    unknown = serve("--rerun", "1.2.3.4.5")
    assert unknown.returncode == 3 and "no such study" in unknown.stderr


def test_a_destination_that_is_down_delays_only_its_own_deliveries_not_contouring_or_other_destinations(
        tmp_path, thin_studies, node_factory, storescp_factory):
    dcmtk("storescu")
    first, second = thin_studies
    up = storescp_factory(tmp_path / "up", free_port(), "UP")
    down_port = free_port()  # nothing listens there until the end
    config = tmp_path / "node.toml"
    config.write_text(f'destinations = ["{up.destination}", "DOWN@127.0.0.1:{down_port}"]\n'
                      "[delivery]\nattempts = 500\nfirst_delay_s = 0.5\nmax_delay_s = 1.0\ntimeout_s = 3\n")
    spool, port = tmp_path / "spool", free_port()
    node_factory(spool, port, "--config", str(config), "--settle", "1", "--tasks", "oar")
    assert storescu(first.ct_dir, port).returncode == 0
    wait_until(lambda: audit_events(spool, "delivery_retry"), 240, "the first retry to DOWN", interval=1)
    assert storescu(second.ct_dir, port).returncode == 0
    # both studies contoured and at UP while DOWN is still down
    wait_until(lambda: len(up.files()) == 2, 240, "both RTSTRUCTs at the destination that is up", interval=1)
    assert {e["study_uid"] for e in audit_events(spool, "job_finished")} == {first.study_uid, second.study_uid}
    assert not audit_events(spool, "finished")
    down = storescp_factory(tmp_path / "down", down_port, "DOWN")
    wait_until(lambda: len(audit_events(spool, "finished")) == 2, 60, "both studies delivered to DOWN too")
    assert len(down.files()) == 2 and len(up.files()) == 2
    assert {e["destination"] for e in audit_events(spool, "sent")} == {up.destination, down.destination}
    # the start-up check warned about the destination that was down, and only about it
    assert [e["destination"] for e in audit_events(spool, "destination_unreachable")] == [down.destination]
