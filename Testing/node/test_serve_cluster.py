"""Two ``segrap serve`` nodes on one PostgreSQL queue and one spool folder: a node killed mid-contour loses its
study to the other once its lease expires, and the destination gets one complete RTSTRUCT per study (issue 29)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pydicom
from node_peers import dcmtk, free_port, storescu, wait_until
from postgres_peer import postgres_server, postgres_url  # noqa: F401  (fixtures)

LEASE_S = 3  # short, set by the config file: the survivor takes over a few seconds after the kill


def _jobs(url: str) -> dict[str, dict]:
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(url, row_factory=dict_row) as db:
        return {r["study_uid"]: r for r in db.execute("SELECT * FROM jobs")}


def _events(spool, node: str, event: str) -> list[dict]:
    path = spool / f"audit-{node}.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [e for e in map(json.loads, lines) if e["event"] == event]


def _is_python(pid) -> bool:
    """The node's worker process runs (it is a Python process, not yet gone)."""
    try:
        return bool(pid) and "python" in psutil.Process(int(pid)).name().lower()
    except psutil.Error:
        return False


def test_a_node_killed_while_it_contours_loses_its_study_to_the_other_node_and_each_study_is_sent_once(
        tmp_path, phantom_studies, node_factory, storescp_factory, postgres_url):
    dcmtk("storescu")
    tps = storescp_factory(tmp_path / "tps", free_port())
    spool = tmp_path / "spool"  # one folder, as on a network filesystem
    config = tmp_path / "node.toml"
    # a password in the URL (the test server trusts loopback and ignores it): it must never be written anywhere
    queue = postgres_url.replace("segrap@", "segrap:pw-never-logged@", 1)
    config.write_text(f'queue = "{queue}"\nlease = {LEASE_S}\nsettle = 1\nworkers = 1\ntasks = "oar"\n'
                      f'destinations = ["{tps.destination}"]\n')
    ports = {"node-a": free_port(), "node-b": free_port()}
    victim, other = phantom_studies
    nodes = {"node-a": node_factory(spool, ports["node-a"], "--config", str(config), "--node-name", "node-a")}
    assert storescu(victim.ct_dir, ports["node-a"]).returncode == 0  # each scanner sends to its own node
    # node-a claims its own study first: a node-b already running could claim it (any node takes any study), and
    # CI's run under load once let node-b start before node-a's settle time had passed
    wait_until(lambda: _jobs(postgres_url).get(victim.study_uid, {}).get("claimed_by") == "node-a", 120,
               "node-a to claim its study")
    # node-b starts meanwhile, with two workers (one for its own study, one for the study it will take over)
    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(node_factory, spool, ports["node-b"], "--config", str(config), "--node-name",
                               "node-b", "--workers", "2")
        wait_until(lambda: _is_python(_jobs(postgres_url).get(victim.study_uid, {}).get("worker_pid")), 120,
                   "node-a's worker to run the model")
        assert _jobs(postgres_url)[victim.study_uid]["claimed_by"] == "node-a"  # its lease held while it ran
        time.sleep(2)  # into the run (the demo takes 5 s or more for a study), as in test_serve_faults
        nodes["node-a"].kill()
        killed_at = time.time()
        nodes["node-b"] = starting.result()
    assert not _events(spool, "node-a", "job_finished")  # it was killed mid-contour
    assert storescu(other.ct_dir, ports["node-b"]).returncode == 0
    victim = victim.study_uid

    # node-b takes node-a's study over once the lease expired, and delivers both
    wait_until(lambda: all(j["state"] == "sent" for j in _jobs(postgres_url).values()), 240,
               "both studies to be delivered", interval=1)
    recovered = _events(spool, "node-b", "job_recovered")
    assert [(e["study_uid"], e["from_node"]) for e in recovered] == [(victim, "node-a")]
    started = [e for e in _events(spool, "node-b", "job_started") if e["study_uid"] == victim]
    assert len(started) == 1 and started[0]["attempt"] == 2  # the killed run counts (a study that kills is bounded)
    took_over = time.mktime(time.strptime(recovered[0]["time"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert took_over >= killed_at - 1  # not before node-a's lease could have expired (audit times: whole seconds)

    received: dict[str, list] = {}
    for path in tps.files():
        ds = pydicom.dcmread(path)
        received.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    assert {uid: len(v) for uid, v in received.items()} == {s.study_uid: 1 for s in phantom_studies}
    for study in phantom_studies:  # complete: every slice that was sent is referenced
        rtstruct = received[study.study_uid][0]
        series = rtstruct.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
            .RTReferencedSeriesSequence[0]
        referenced = {str(item.ReferencedSOPInstanceUID) for item in series.ContourImageSequence}
        sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in study.ct_dir.glob("*.dcm")}
        assert referenced == sent and str(rtstruct.SOPInstanceUID) == _jobs(postgres_url)[study.study_uid][
            "rtstruct_uid"]

    status = subprocess.run([sys.executable, "-m", "SegRapSegmenterLib.cli", "serve", "--status", "--queue",
                             queue], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    lines = {line.split(":")[0]: line for line in status.stdout.splitlines() if line.startswith("node ")}
    assert "GONE" in lines["node node-a"] and "alive" in lines["node node-b"]
    assert f"pid {nodes['node-b'].process.pid}" in lines["node node-b"] and "running jobs 0" in lines["node node-b"]
    assert nodes["node-b"].terminate() == 0
    written = [status.stdout, (tmp_path / "serve.log").read_text(), *(p.read_text() for p in spool.glob("audit*"))]
    assert "segrap:***@" in status.stdout and not any("pw-never-logged" in text for text in written)
