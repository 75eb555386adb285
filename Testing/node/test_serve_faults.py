"""``segrap serve`` under faults: killed with SIGKILL mid-job, destination down, restarts: one RTSTRUCT per study."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import psutil
import pydicom
from node_peers import audit_events, dcmtk, free_port, storescu, wait_until


def _job(spool) -> dict:
    with sqlite3.connect(f"file:{spool / 'node.sqlite'}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM jobs").fetchall()
    return dict(rows[0]) if rows else {}


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_killed_node_reruns_its_job_and_a_destination_that_comes_up_late_gets_one_rtstruct(
        tmp_path, phantom_studies, node_factory, storescp_factory):
    dcmtk("storescu")
    study = phantom_studies[0]
    tps_port, port, spool = free_port(), free_port(), tmp_path / "spool"
    # every worker starts 5 s late, through a launcher that then execs this Python (as Slicer's launcher
    # does): the demo contours a small study in about 5 s, and without the delay a rerun could finish
    # before the node's SIGTERM reached it, which keeps its RTSTRUCT and rightly runs no third time
    launcher = tmp_path / "slow-python"
    launcher.write_text(f"#!/bin/sh\nsleep 5\nexec '{sys.executable}' \"$@\"\n")
    launcher.chmod(0o755)
    config = tmp_path / "node.toml"
    config.write_text(f"""
ae_title = "SEGRAP"
settle = 600  # the --settle flag wins
destinations = ["TPS@127.0.0.1:{tps_port}"]
python = "{launcher}"

[delivery]
attempts = 200
first_delay_s = 0.5
max_delay_s = 1.0
timeout_s = 5
""")
    args = ("--config", str(config), "--settle", "1")
    node = node_factory(spool, port, *args)
    assert storescu([study.ct_dir, study.contrast_dir], port).returncode == 0

    # kill -9 while the worker runs (the orphaned worker dies at its next event on the broken pipe, or the
    # restarted node stops it)
    worker_pid = wait_until(lambda: _job(spool).get("worker_pid"), 120, "the worker to start")
    time.sleep(2)
    node.kill()

    # the restarted node reruns the job; SIGTERM during that run puts the job back in the queue
    node = node_factory(spool, port, *args)
    recovered = wait_until(lambda: audit_events(spool, "job_recovered"), 30, "the job to be recovered")
    assert recovered[0]["study_uid"] == study.study_uid
    wait_until(lambda: not _running(worker_pid), 15, "the orphaned worker to be gone")
    wait_until(lambda: len(audit_events(spool, "job_started")) == 2, 30, "the rerun to start")
    assert node.terminate() == 0
    assert audit_events(spool, "job_requeued") and _job(spool)["state"] == "queued"

    # started again, it runs the job and retries the destination that is down
    node = node_factory(spool, port, *args)
    wait_until(lambda: len(audit_events(spool, "delivery_retry")) >= 2, 300, "two failed delivery attempts",
               interval=1)
    tps = storescp_factory(tmp_path / "tps", tps_port)
    wait_until(lambda: audit_events(spool, "finished"), 60, "the delivery once the destination is up")
    assert len(tps.files()) == 1
    rtstruct = pydicom.dcmread(tps.files()[0])
    assert str(rtstruct.StudyInstanceUID) == study.study_uid
    assert str(rtstruct.SOPInstanceUID) == _job(spool)["rtstruct_uid"]
    # neither the run the node's kill interrupted nor the one SIGTERM requeued is counted: restarts use up no runs
    assert [e["attempt"] for e in audit_events(spool, "job_started")] == [1, 1, 1]

    # killed again after the delivery, then restarted: nothing is sent a second time
    node.kill()
    node = node_factory(spool, port, *args)
    time.sleep(4)  # several completion and queue cycles of the restarted node
    assert len(tps.files()) == 1
    assert len(audit_events(spool, "sent")) == 1 and len(audit_events(spool, "job_started")) == 3
    assert _job(spool)["state"] == "sent"
    assert node.terminate() == 0
    status = subprocess.run([sys.executable, "-m", "SegRapSegmenterLib.cli", "serve", "--status", "--spool",
                             str(spool)], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert f"sent     {study.study_uid}" in status.stdout
    assert f"-> TPS@127.0.0.1:{tps_port}: sent after" in status.stdout


def test_a_destination_refusing_rtstruct_storage_fails_that_study_fast_and_the_next_study_is_contoured(
        tmp_path, phantom_studies, node_factory):
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
        first, second = phantom_studies
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


def test_a_worker_killed_by_the_os_is_run_again_up_to_three_runs(tmp_path, phantom_studies, node_factory,
                                                                   storescp_factory):
    import os
    import signal

    dcmtk("storescu")
    first, second = phantom_studies
    tps = storescp_factory(tmp_path / "tps", free_port())
    launcher = tmp_path / "slow-python"  # 3 s before the worker's Python starts: time to kill it, as the OOM killer
    launcher.write_text(f"#!/bin/sh\nsleep 3\nexec '{sys.executable}' \"$@\"\n")
    launcher.chmod(0o755)
    spool, port = tmp_path / "spool", free_port()
    node_factory(spool, port, "--destination", tps.destination, "--settle", "1", "--tasks", "oar",
                 "--python", str(launcher))

    def kill_next_worker(study_uid: str, seen: set) -> None:
        def new_worker():
            pid = _job_of(spool, study_uid).get("worker_pid")
            return pid if pid and pid not in seen else None

        pid = wait_until(new_worker, 120, "the next worker to start", interval=0.1)
        seen.add(pid)
        os.kill(pid, signal.SIGKILL)

    # killed once: the study runs again and is delivered
    assert storescu(first.ct_dir, port).returncode == 0
    seen: set = set()
    kill_next_worker(first.study_uid, seen)
    wait_until(lambda: audit_events(spool, "finished"), 240, "the rerun to be delivered", interval=1)
    [retry] = audit_events(spool, "job_retry")
    assert retry["attempt"] == 1 and "killed by SIGKILL" in retry["reason"]
    assert [e["attempt"] for e in audit_events(spool, "job_started")] == [1, 2]
    assert len(tps.files()) == 1

    # killed in every run: failed after the third, with the reason
    assert storescu(second.ct_dir, port).returncode == 0
    wait_until(lambda: _job_of(spool, second.study_uid).get("state") == "running", 60, "the second job to start")
    for _ in range(3):
        kill_next_worker(second.study_uid, seen)
    wait_until(lambda: audit_events(spool, "failed"), 120, "the second study to fail", interval=1)
    job = _job_of(spool, second.study_uid)
    assert job["state"] == "failed" and job["attempts"] == 3
    assert job["reason"].startswith("the worker died in 3 runs (last: the worker killed by SIGKILL")
    assert len(audit_events(spool, "job_retry")) == 3 and len(tps.files()) == 1


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


def test_a_study_cut_by_a_node_kill_waits_a_full_settle_after_the_restart_for_the_resend(
        tmp_path, phantom_studies, node_factory, storescp_factory):
    dcmtk("storescu")
    study = phantom_studies[0]
    files = _ct_files(study)
    tps = storescp_factory(tmp_path / "tps", free_port())
    spool, port = tmp_path / "spool", free_port()
    args = ("--destination", tps.destination, "--settle", "8", "--tasks", "oar")
    node = node_factory(spool, port, *args)
    assert storescu(files[:24], port).returncode == 0  # the transfer is cut here by the node's crash
    node.kill()
    time.sleep(10)  # down longer than the settle time
    node_factory(spool, port, *args)
    assert storescu(files, port).returncode == 0  # the scanner sends the whole series again
    wait_until(lambda: audit_events(spool, "finished"), 240, "the study to be delivered", interval=1)
    assert audit_events(spool, "settle_restarted")[0]["studies"] == 1
    assert len(audit_events(spool, "job_started")) == 1 and len(tps.files()) == 1
    assert _referenced_images(tps.files()[0]) == _uids(files)  # every slice, not the 24 before the crash


def test_new_images_reopen_a_delivered_study_and_rerun_and_redeliver_requeue_it(
        tmp_path, phantom_studies, node_factory, storescp_factory):
    dcmtk("storescu")
    study = phantom_studies[1]
    files = _ct_files(study)
    tps = storescp_factory(tmp_path / "tps", free_port())
    spool, port = tmp_path / "spool", free_port()
    node_factory(spool, port, "--destination", tps.destination, "--settle", "1", "--tasks", "oar")

    def delivered(count: int, files_there: int | None = None) -> list:
        wait_until(lambda: len(audit_events(spool, "finished")) == count, 240, f"delivery {count}", interval=1)
        wait_until(lambda: len(tps.files()) == (files_there or count), 30, f"file {count} at the destination")
        return sorted(tps.files(), key=lambda p: p.stat().st_mtime)

    assert storescu(files[:24], port).returncode == 0
    [first] = delivered(1)
    assert _referenced_images(first) == _uids(files[:24])

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
        tmp_path, phantom_studies, node_factory, storescp_factory):
    dcmtk("storescu")
    first, second = phantom_studies
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
