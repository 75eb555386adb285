"""The node's queue behind one interface: SQLite in the spool (migrated from older spools) and PostgreSQL (leases)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest
from postgres_peer import postgres_server, postgres_url  # noqa: F401  (fixtures)
from SegRapSegmenterLib.errors import InputError, OutputError
from SegRapSegmenterLib.node.queue import redact
from SegRapSegmenterLib.node.spool import Instance, Spool, open_queue

# the spool database as the node wrote it before the schema versions (the release before issue 29)
RELEASE_SCHEMA = """
CREATE TABLE instances (sop_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, series_uid TEXT NOT NULL,
  sop_class TEXT NOT NULL, modality TEXT, series_description TEXT, contrast_tags TEXT, calling_ae TEXT,
  received_at REAL, path TEXT);
CREATE INDEX instances_study ON instances (study_uid);
CREATE TABLE jobs (study_uid TEXT PRIMARY KEY, case_id TEXT NOT NULL, state TEXT NOT NULL, calling_ae TEXT,
  first_received REAL, last_received REAL, queued_at REAL, started_at REAL, finished_at REAL,
  plain_series TEXT, contrast_series TEXT, tasks TEXT, notes TEXT, attempts INTEGER DEFAULT 0,
  worker_pid INTEGER, rtstruct TEXT, rtstruct_uid TEXT, reason TEXT, late_instances INTEGER DEFAULT 0,
  previous_rtstruct_uid TEXT);
CREATE TABLE deliveries (study_uid TEXT NOT NULL, destination TEXT NOT NULL, state TEXT NOT NULL,
  attempts INTEGER DEFAULT 0, sent_at REAL, last_error TEXT, rtstruct_uid TEXT, retry_at REAL,
  PRIMARY KEY (study_uid, destination));
INSERT INTO jobs (study_uid, case_id, state, attempts, rtstruct_uid) VALUES ('1.5', 'study-a', 'running', 2, NULL);
INSERT INTO jobs (study_uid, case_id, state, rtstruct_uid) VALUES ('1.6', 'study-b', 'sent', '6.1');
INSERT INTO deliveries VALUES ('1.6', 'TPS@h:104', 'sent', 1, 5.0, NULL, '6.1', NULL);
"""


def _instance(study: str, n: int = 1) -> Instance:
    return Instance(study, study + ".1", f"{study}.1.{n}", "1.2.840.10008.5.1.4.1.1.2", "CT", "plain", (), "CT1")


def _queued(spool: Spool, study: str) -> None:
    spool.store(_instance(study), b"x")
    assert spool.queue(study, study + ".1", None, ("oar",), "")


def test_a_spool_of_the_release_before_schema_versions_is_migrated_and_keeps_its_jobs(tmp_path):
    old = sqlite3.connect(tmp_path / "node.sqlite")
    old.executescript(RELEASE_SCHEMA)
    old.close()
    spool = Spool(tmp_path)
    try:
        assert spool.schema_version() == 2
        assert {r[1] for r in spool._db.execute("PRAGMA table_info(jobs)")} >= {"claimed_by", "lease_until"}
        assert spool.delivered("1.6") == {"TPS@h:104"}  # what was sent stays sent
        recovered = spool.recover()  # the single node's start-up: every running job back in the queue
        assert [r["study_uid"] for r in recovered] == ["1.5"] and spool.job("1.5")["attempts"] == 1
        claimed = spool.claim()
        assert claimed["study_uid"] == "1.5" and claimed["claimed_by"] == spool.node and claimed["lease_until"]
    finally:
        spool.close()
    again = Spool(tmp_path)  # opening a migrated spool again changes nothing
    assert again.schema_version() == 2 and again.job("1.5")["state"] == "running"
    again.close()


def test_a_spool_database_newer_than_this_segrap_is_refused(tmp_path):
    Spool(tmp_path).close()
    db = sqlite3.connect(tmp_path / "node.sqlite")
    db.execute("INSERT INTO schema_version VALUES (99, 0)")
    db.commit()
    db.close()
    with pytest.raises(OutputError, match="schema version 99, newer than this segrap's 2"):
        Spool(tmp_path)


def test_two_nodes_on_postgresql_claim_different_jobs_and_take_over_only_an_expired_lease(tmp_path, postgres_url):
    a = Spool(tmp_path, postgres_url, node="node-a", lease_s=30)
    b = Spool(tmp_path, postgres_url, node="node-b", lease_s=30)
    try:
        assert a.schema_version() == b.schema_version() == 2  # the second node found the schema migrated
        a.register("host-a", 1, "0")
        b.register("host-b", 2, "")
        for study in ("1.1", "1.2"):
            _queued(a, study)
        first, second = a.claim(), b.claim()
        assert {first["study_uid"], second["study_uid"]} == {"1.1", "1.2"} and b.claim() is None
        assert first["claimed_by"] == "node-a" and second["claimed_by"] == "node-b"
        now = first["lease_until"] - 30
        assert b.take_over(now=now + 29) == []  # node-a's lease still runs: its job is left alone
        a.heartbeat(now=now + 20)  # node-a renews: its lease now ends at now + 50
        b.heartbeat(now=now + 40)  # node-b's, at now + 70
        assert b.take_over(now=now + 45) == []
        taken = b.take_over(now=now + 51)  # node-a went silent: its job is b's to run, the run counted
        assert [r["study_uid"] for r in taken] == [first["study_uid"]] and taken[0]["claimed_by"] == "node-a"
        job = a.job(first["study_uid"])
        assert job["state"] == "queued" and job["attempts"] == 1
        assert b.claim()["study_uid"] == first["study_uid"]
        # node-a was only slow: what its late run reports changes nothing of the study node-b now runs
        assert not a.set_rtstruct(first["study_uid"], "/late.dcm", "7.7")
        assert not a.fail(first["study_uid"], "late failure", running_here=True)
        a.requeue(first["study_uid"])
        job = a.job(first["study_uid"])
        assert (job["state"], job["claimed_by"], job["rtstruct"]) == ("running", "node-b", None)
        assert {n["name"]: n["running"] for n in b.nodes()} == {"node-a": 0, "node-b": 2}
        with pytest.raises(InputError, match="node name 'node-a' is in use"):
            Spool(tmp_path, postgres_url, node="node-a").register("host-c", 3, "")
        # node-b killed and restarted under its name at once: it takes its own running job back, the run not counted
        restarted = Spool(tmp_path, postgres_url, node="node-b", lease_s=30)
        restarted.register("host-b", 4, "", gone=lambda row: row["pid"] == 2)
        back = restarted.take_over(restart=True, now=now + 45)
        assert sorted(r["study_uid"] for r in back) == ["1.1", "1.2"]
        assert restarted.job(second["study_uid"])["attempts"] == 0
        restarted.close()
    finally:
        a.close()
        b.close()


def test_a_delivery_claimed_by_one_node_is_not_sent_by_another(tmp_path, postgres_url):
    a = Spool(tmp_path, postgres_url, node="node-a", lease_s=30)
    b = Spool(tmp_path, postgres_url, node="node-b", lease_s=30)
    try:
        _queued(a, "1.3")
        a.claim()
        a.set_rtstruct("1.3", "/x.dcm", "9.9")
        a.to_delivery("1.3")
        claimed = a.next_delivery("TPS@h:104")
        assert claimed["study_uid"] == "1.3"
        assert b.next_delivery("TPS@h:104") is None  # a's courier holds it
        assert b.next_delivery("PACS@h:104")["study_uid"] == "1.3"  # another destination is another row
        restarted = Spool(tmp_path, postgres_url, node="node-a", lease_s=30)  # node-a killed mid-send, back at once
        restarted.take_over(restart=True)
        assert restarted.next_delivery("TPS@h:104")["study_uid"] == "1.3"  # its own send is free to try again
        restarted.close()
        a.delivery_attempt("1.3", "TPS@h:104", None, rtstruct_uid="9.9")
        assert b.next_delivery("TPS@h:104") is None  # sent: never a second time
        assert b.next_delivery("TPS@h:104", now=claimed["first_received"] + 10**6) is None
        assert a.conclude_delivery("1.3", ["TPS@h:104", "PACS@h:104"]) is None  # PACS still pending
        b.delivery_attempt("1.3", "PACS@h:104", None, rtstruct_uid="9.9")
        assert b.conclude_delivery("1.3", ["TPS@h:104", "PACS@h:104"]) == ("sent", None)
        assert a.conclude_delivery("1.3", ["TPS@h:104", "PACS@h:104"]) is None  # concluded once
    finally:
        a.close()
        b.close()


def test_an_unreachable_database_is_an_input_error_that_never_shows_the_password(tmp_path):
    url = "postgresql://segrap:s3cret-pw@127.0.0.1:1/queue"
    assert redact(url) == "postgresql://segrap:***@127.0.0.1:1/queue"
    with pytest.raises(InputError) as caught:
        open_queue(url, tmp_path)
    assert "s3cret-pw" not in str(caught.value)
    assert "postgresql://segrap:***@127.0.0.1:1/queue" in str(caught.value) and "cannot connect" in str(caught.value)


def test_psycopg_is_imported_only_for_a_postgresql_queue_and_its_absence_is_said(tmp_path):
    code = (f"import sys; from SegRapSegmenterLib.node.spool import Spool; Spool({str(tmp_path)!r}).close(); "
            "assert 'psycopg' not in sys.modules, 'psycopg imported for SQLite'; "
            "sys.modules['psycopg'] = None\n"
            "from SegRapSegmenterLib.errors import InputError, OutputError\n"
            "try:\n Spool('x', 'postgresql://u:pw@db.example/q')\n"
            "except InputError as e:\n print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "postgresql://u:***@db.example/q: the PostgreSQL queue needs the psycopg package" in out.stdout
    assert "pw@" not in out.stdout


def test_serve_with_an_unreachable_queue_exits_3_naming_the_url_without_its_password(tmp_path):
    url = "postgresql://segrap:s3cret-pw@127.0.0.1:1/queue"
    for args in (["--spool", str(tmp_path), "--port", "0", "--bundle", "demo"], ["--status"]):
        out = subprocess.run([sys.executable, "-m", "SegRapSegmenterLib.cli", "serve", "--queue", url, *args],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 3, out.stderr
        assert "--queue postgresql://segrap:***@127.0.0.1:1/queue: cannot connect" in out.stderr
        assert "s3cret-pw" not in out.stdout + out.stderr


def test_a_single_node_refuses_a_spool_that_nodes_of_a_shared_queue_serve_from(tmp_path):
    from SegRapSegmenterLib.node.config import load_config
    from SegRapSegmenterLib.node.service import SHARED_MARKER, Node

    tmp_path.joinpath(SHARED_MARKER).write_text("postgresql://segrap:***@db/q\n")  # as a shared node writes it
    node = Node(load_config(None, spool=tmp_path, port=0, device="cpu", bundle="demo", workers=1))
    with pytest.raises(InputError, match=r"nodes on the queue postgresql://segrap:\*\*\*@db/q serve from this"):
        node.run()  # before it clears the temporary folders that hold those nodes' own
    node.spool.close()
    from SegRapSegmenterLib.node.service import status_text

    with pytest.raises(InputError, match=r"give --status --queue postgresql://segrap:\*\*\*@db/q"):
        status_text(tmp_path)


def test_a_single_node_restarted_mid_send_sends_again_at_once(tmp_path):
    spool = Spool(tmp_path)
    _queued(spool, "1.4")
    spool.claim()
    spool.set_rtstruct("1.4", "/x.dcm", "4.4")
    spool.to_delivery("1.4")
    assert spool.next_delivery("TPS@h:104")["study_uid"] == "1.4"
    assert spool.next_delivery("TPS@h:104") is None  # claimed: the courier is sending it
    spool.close()
    restarted = Spool(tmp_path)  # killed mid-send, started again
    restarted.recover()
    assert restarted.next_delivery("TPS@h:104")["study_uid"] == "1.4"  # no lease to wait out
    restarted.close()
