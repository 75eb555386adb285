"""The node's queue: received instances, one job per study, deliveries and nodes, behind one interface.

The statements are written once, in SQLite's dialect; a backend (``queue_sqlite``: the default, a file
in the spool; ``queue_postgres``: one database for many machines) supplies the connection, the
transaction and the translation of the few words the two dialects spell differently. A job is
claimed by a node (``claimed_by``) with a lease (``lease_until``) that the node's heartbeat renews;
a job whose lease expired is taken over by another node. A delivery is claimed the same way, on the
row that the key (study, destination) makes unique, so one RTSTRUCT goes to a destination however
many nodes run. Every backend migrates its schema through an ordered list (table ``schema_version``).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

from ..errors import InputError

DEFAULT_LEASE_S = 60.0
_HELD = " AND state='running' AND (claimed_by IS NULL OR claimed_by=?)"  # the job is still this node's run


def default_node_name() -> str:
    """This process's node name: the host and the process id (unique while it runs)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (what errors and logs may show)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class JobQueue:
    """The queue's operations; a backend sets ``_db`` (a connection) and ``_tx`` (one transaction)."""

    SKIP_LOCKED = ""  # PostgreSQL: FOR UPDATE SKIP LOCKED, so two nodes never claim the same job

    def __init__(self, node: str | None = None, lease_s: float = DEFAULT_LEASE_S):
        self.node = node or default_node_name()
        self.lease_s = lease_s
        self._lock = threading.RLock()

    # the backend's part
    @contextmanager
    def _tx(self) -> Iterator:
        raise NotImplementedError
        yield  # pragma: no cover

    def _query(self, sql: str, args: tuple = ()) -> list:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    @property
    def where(self) -> str:
        """Where the queue is, fit to show (a file, or the URL without its password)."""
        raise NotImplementedError

    def schema_version(self) -> int:
        """The last migration this database has had."""
        raise NotImplementedError

    # ---------------------------------------------------------------- receiving

    def record_instance(self, inst, path: str, case_id: str, now: float) -> str:
        """Record a stored instance (its study's job ``case_id`` when new); returns the job's state (received,
        reopened or late)."""
        with self._tx() as db:
            known = db.execute("SELECT 1 FROM instances WHERE sop_uid=? AND study_uid=?",
                               (inst.sop_uid, inst.study_uid)).fetchone() is not None
            db.execute("INSERT INTO instances (sop_uid, study_uid, series_uid, sop_class, modality, "
                       "series_description, contrast_tags, calling_ae, received_at, path) VALUES (?,?,?,?,?,?,?,?,?,?) "
                       "ON CONFLICT (sop_uid) DO UPDATE SET study_uid=excluded.study_uid, "
                       "series_uid=excluded.series_uid, sop_class=excluded.sop_class, modality=excluded.modality, "
                       "series_description=excluded.series_description, contrast_tags=excluded.contrast_tags, "
                       "calling_ae=excluded.calling_ae, received_at=excluded.received_at, path=excluded.path",
                       (inst.sop_uid, inst.study_uid, inst.series_uid, inst.sop_class, inst.modality,
                        inst.series_description, ",".join(inst.contrast_tags), inst.calling_ae, now, path))
            inserted = db.execute("INSERT INTO jobs (study_uid, case_id, state, calling_ae, first_received, "
                                  "last_received) VALUES (?,?,?,?,?,?) ON CONFLICT (study_uid) DO NOTHING",
                                  (inst.study_uid, case_id, "received", inst.calling_ae, now,
                                   now)).rowcount
            if inserted == 1:
                return "received"
            row = db.execute("SELECT state FROM jobs WHERE study_uid=?", (inst.study_uid,)).fetchone()
            if row["state"] in ("received", "queued"):
                db.execute("UPDATE jobs SET state='received', last_received=? WHERE study_uid=?",
                           (now, inst.study_uid))
                return "received"
            if not known and row["state"] != "running":  # a new image for a contoured study: contour it again
                self._reopen(db, inst.study_uid, now)
                return "reopened"
            if row["state"] == "failed":  # a study sent again after a failure gets a fresh start
                # the stored RTSTRUCT is kept when a destination already holds it: one structure set per study
                db.execute("UPDATE jobs SET state='received', last_received=?, attempts=0, reason=NULL, "
                           "rtstruct=CASE WHEN EXISTS (SELECT 1 FROM deliveries d WHERE d.study_uid=jobs.study_uid "
                           "AND d.state='sent') THEN rtstruct END, rtstruct_uid=CASE WHEN EXISTS (SELECT 1 FROM "
                           "deliveries d WHERE d.study_uid=jobs.study_uid AND d.state='sent') THEN rtstruct_uid END "
                           "WHERE study_uid=?", (now, inst.study_uid))
                db.execute("DELETE FROM deliveries WHERE study_uid=? AND state!='sent'", (inst.study_uid,))
                return "reopened"
            # a running job notices new images when its run ends (reopen_if_changed); a resent image changes nothing
            db.execute("UPDATE jobs SET late_instances=late_instances+1 WHERE study_uid=?", (inst.study_uid,))
            return "late"

    @staticmethod
    def _reopen(db, study_uid: str, now: float) -> None:
        """Back to ``received`` for a new run: the next RTSTRUCT (a new SOP instance UID) replaces the earlier one."""
        db.execute("UPDATE jobs SET state='received', last_received=?, attempts=0, reason=NULL, worker_pid=NULL, "
                   "previous_rtstruct_uid=COALESCE((SELECT d.rtstruct_uid FROM deliveries d WHERE "
                   "d.study_uid=jobs.study_uid AND d.state='sent' ORDER BY d.sent_at DESC LIMIT 1), "
                   "previous_rtstruct_uid), rtstruct=NULL, rtstruct_uid=NULL WHERE study_uid=?", (now, study_uid))
        db.execute("DELETE FROM deliveries WHERE study_uid=? AND state!='sent'", (study_uid,))

    def purgeable(self, finished_before: float) -> list:
        """Studies sent or failed before that time whose images are still in the spool (study_uid, case_id)."""
        return self._query("SELECT j.study_uid, j.case_id FROM jobs j WHERE j.state IN ('sent', 'failed') AND "
                           "j.finished_at<? AND EXISTS (SELECT 1 FROM instances i WHERE i.study_uid=j.study_uid)",
                           (finished_before,))

    def forget_images(self, study_uid: str) -> None:
        """The rows of a purged study's images (its job and deliveries stay: the queue's history)."""
        with self._tx() as db:
            db.execute("DELETE FROM instances WHERE study_uid=?", (study_uid,))
            db.execute("UPDATE jobs SET rtstruct=NULL WHERE study_uid=?", (study_uid,))

    def reopen_if_changed(self, study_uid: str) -> bool:
        """After a run: when new images arrived while it ran, the study goes back to ``received`` (True)."""
        with self._tx() as db:
            row = db.execute("SELECT (SELECT MAX(i.received_at) FROM instances i WHERE i.study_uid=?) AS last_at, "
                             "started_at FROM jobs WHERE study_uid=?", (study_uid, study_uid)).fetchone()
            if row is None or row["last_at"] is None or row["started_at"] is None \
                    or row["last_at"] <= row["started_at"]:
                return False
            self._reopen(db, study_uid, time.time())
            return True

    def restart_settle_clocks(self, now: float | None = None) -> int:
        """At start-up: the studies still receiving wait a full ``settle`` again (the downtime is not quiet)."""
        with self._tx() as db:
            return db.execute("UPDATE jobs SET last_received=? WHERE state='received' AND last_received<?",
                              (time.time() if now is None else now,) * 2).rowcount

    def rerun(self, study_uid: str) -> None:
        """``--rerun``: contour the study again; the new RTSTRUCT replaces the earlier one at every destination."""
        with self._tx() as db:
            self._require_finished(db, study_uid, "--rerun")
            self._reopen(db, study_uid, time.time())

    def redeliver(self, study_uid: str) -> str:
        """``--redeliver``: send the study's RTSTRUCT (the same file, same UID) to every destination again."""
        from pathlib import Path

        with self._tx() as db:
            row = self._require_finished(db, study_uid, "--redeliver")
            if not row["rtstruct"] or not Path(row["rtstruct"]).is_file():
                raise InputError(f"--redeliver {study_uid}: this study has no RTSTRUCT in the spool; use --rerun.")
            db.execute("DELETE FROM deliveries WHERE study_uid=?", (study_uid,))
            db.execute("UPDATE jobs SET state='delivering', reason=NULL WHERE study_uid=?", (study_uid,))
            return str(row["rtstruct_uid"])

    @staticmethod
    def _require_finished(db, study_uid: str, flag: str):
        row = db.execute("SELECT * FROM jobs WHERE study_uid=?", (study_uid,)).fetchone()
        if row is None:
            raise InputError(f"{flag} {study_uid}: no such study in this spool (see --status).")
        if row["state"] not in ("sent", "failed"):
            raise InputError(f"{flag} {study_uid}: the study is {row['state']}; it will be contoured and sent "
                             f"anyway. Use {flag} on a study that is sent or failed.")
        return row

    def settled(self, settle_s: float, now: float | None = None) -> list[str]:
        """Studies in ``received`` with no instance for ``settle_s`` seconds."""
        now = time.time() if now is None else now
        rows = self._query("SELECT study_uid FROM jobs WHERE state='received' AND last_received<=? "
                           "ORDER BY first_received", (now - settle_s,))
        return [r["study_uid"] for r in rows]

    def series_of(self, study_uid: str):
        """One summary per series of the study (for ``selection.select``)."""
        from .selection import SeriesSummary

        rows = self._query("SELECT series_uid, MAX(modality) AS modality, MAX(series_description) AS "
                           "series_description, MAX(contrast_tags) AS contrast_tags, COUNT(*) AS n "
                           "FROM instances WHERE study_uid=? GROUP BY series_uid", (study_uid,))
        return [SeriesSummary(r["series_uid"], r["modality"] or "", r["series_description"] or "", int(r["n"]),
                              tuple(t for t in (r["contrast_tags"] or "").split(",") if t)) for r in rows]

    # ---------------------------------------------------------------- the jobs

    def job(self, study_uid: str):
        rows = self._query("SELECT * FROM jobs WHERE study_uid=?", (study_uid,))
        return rows[0] if rows else None

    def jobs(self) -> list:
        return self._query("SELECT * FROM jobs ORDER BY first_received")

    def queue(self, study_uid: str, plain: str, contrast: str | None, tasks: tuple[str, ...], notes: str) -> bool:
        """received -> queued with the chosen series; False when an instance arrived meanwhile."""
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET state='queued', queued_at=?, plain_series=?, contrast_series=?, "
                             "tasks=?, notes=? WHERE study_uid=? AND state='received'",
                             (time.time(), plain, contrast, ",".join(tasks), notes, study_uid))
            return cur.rowcount == 1

    def fail(self, study_uid: str, reason: str, notes: str | None = None, running_here: bool = False,
             received_only: bool = False) -> bool:
        """-> failed; with ``running_here`` only while this node still holds the running job, with ``received_only``
        only from ``received`` (no other node got there first). True: it did."""
        guard, args = (_HELD, (self.node,)) if running_here else (" AND state='received'", ()) if received_only \
            else ("", ())
        with self._tx() as db:
            return db.execute("UPDATE jobs SET state='failed', finished_at=?, reason=?, notes=COALESCE(?, notes), "
                              "worker_pid=NULL WHERE study_uid=?" + guard,
                              (time.time(), reason, notes, study_uid, *args)).rowcount == 1

    def claim(self):
        """The oldest queued job, now running on this node with a lease (attempts + 1); None when none is queued."""
        with self._tx() as db:
            row = db.execute("SELECT study_uid FROM jobs WHERE state='queued' ORDER BY queued_at LIMIT 1"
                             + self.SKIP_LOCKED).fetchone()
            if row is None:
                return None
            now = time.time()
            db.execute("UPDATE jobs SET state='running', started_at=?, attempts=attempts+1, claimed_by=?, "
                       "lease_until=? WHERE study_uid=?", (now, self.node, now + self.lease_s, row["study_uid"]))
            return db.execute("SELECT * FROM jobs WHERE study_uid=?", (row["study_uid"],)).fetchone()

    def set_worker_pid(self, study_uid: str, pid: int | None) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET worker_pid=? WHERE study_uid=?", (pid, study_uid))

    def set_rtstruct(self, study_uid: str, path: str, sop_uid: str) -> bool:
        """The run's RTSTRUCT; False (nothing changed) when this node no longer holds the job (its lease expired
        and another node took it over)."""
        with self._tx() as db:
            return db.execute("UPDATE jobs SET rtstruct=?, rtstruct_uid=?, worker_pid=NULL WHERE study_uid=?" + _HELD,
                              (path, sop_uid, study_uid, self.node)).rowcount == 1

    def requeue(self, study_uid: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET state='queued', worker_pid=NULL, attempts=CASE WHEN attempts>0 THEN "
                       "attempts-1 ELSE 0 END WHERE study_uid=?" + _HELD, (study_uid, self.node))

    def retry(self, study_uid: str) -> None:
        """running -> queued after a run that died; the run counts (``attempts`` is kept)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state='queued', queued_at=?, worker_pid=NULL WHERE study_uid=?" + _HELD,
                       (time.time(), study_uid, self.node))

    def finish(self, study_uid: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET state='sent', finished_at=?, worker_pid=NULL, reason=NULL WHERE study_uid=?",
                       (time.time(), study_uid))

    def recover(self) -> list:
        """Every job left running, back in the queue (returned as they were): one node on its own queue, at start.

        The interrupted run is not counted: a node restart must not use up a healthy job's runs.
        """
        with self._tx() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state='running'").fetchall()
            db.execute("UPDATE jobs SET state='queued', attempts=CASE WHEN attempts>0 THEN attempts-1 ELSE 0 END "
                       "WHERE state='running'")
            db.execute("UPDATE deliveries SET lease_until=NULL WHERE lease_until IS NOT NULL")  # sends cut short
            return rows

    def take_over(self, restart: bool = False, now: float | None = None) -> list:
        """Running jobs whose lease expired (their node is gone) and, at a ``restart``, those this node's name held,
        back in the queue; returned as they were. The run counts when another node held it (a study that kills
        its node is not retried forever); never a job whose node still renews its lease."""
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state='running' AND (lease_until IS NULL OR lease_until<? "
                              "OR claimed_by=?)" + self.SKIP_LOCKED, (now, self.node if restart else "")).fetchall()
            for row in rows:
                db.execute("UPDATE jobs SET state='queued', queued_at=?, worker_pid=NULL, lease_until=NULL, "
                           "attempts=CASE WHEN claimed_by=? AND attempts>0 THEN attempts-1 ELSE attempts END "
                           "WHERE study_uid=? AND state='running'", (now, self.node, row["study_uid"]))
            if restart:  # the sends this node's name had under way when it was killed: free to try again now
                db.execute("UPDATE deliveries SET lease_until=NULL WHERE claimed_by=? AND lease_until IS NOT NULL",
                           (self.node,))
            return rows

    def heartbeat(self, now: float | None = None) -> None:
        """Renew the leases of this node's running jobs and deliveries, and its row in ``nodes``."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("UPDATE jobs SET lease_until=? WHERE state='running' AND claimed_by=?",
                       (now + self.lease_s, self.node))
            db.execute("UPDATE deliveries SET lease_until=? WHERE claimed_by=? AND lease_until IS NOT NULL",
                       (now + self.lease_s, self.node))
            db.execute("UPDATE nodes SET heartbeat=? WHERE name=?", (now, self.node))

    # ---------------------------------------------------------------- nodes

    def register(self, host: str, pid: int, gpus: str, now: float | None = None, gone=lambda row: False) -> None:
        """This node in ``nodes``; refused while a live node (heartbeat within its lease, and not ``gone``: e.g. a
        killed process of this machine) has the same name."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute("SELECT * FROM nodes WHERE name=?", (self.node,)).fetchone()
            if row is not None and row["stopped"] is None and row["pid"] != pid \
                    and now - float(row["heartbeat"]) <= float(row["lease_s"]) and not gone(row):
                raise InputError(f"node name {self.node!r} is in use by the live node on {row['host']} (process "
                                 f"{row['pid']}, heartbeat {now - float(row['heartbeat']):.0f} s ago); give each "
                                 f"node its own name (--node-name).")
            db.execute("DELETE FROM nodes WHERE name=?", (self.node,))
            db.execute("INSERT INTO nodes (name, host, pid, started, heartbeat, lease_s, gpus) "
                       "VALUES (?,?,?,?,?,?,?)", (self.node, host, pid, now, now, self.lease_s, gpus))

    def unregister(self) -> None:
        """A clean stop: the node's row says stopped (its history stays for ``--status``)."""
        with self._tx() as db:
            db.execute("UPDATE nodes SET stopped=? WHERE name=?", (time.time(), self.node))

    def nodes(self) -> list:
        """Every node that served from this queue, with its running jobs (``running``)."""
        return self._query("SELECT n.*, (SELECT COUNT(*) FROM jobs j WHERE j.state='running' AND "
                           "j.claimed_by=n.name) AS running FROM nodes n ORDER BY n.started")

    # ---------------------------------------------------------------- deliveries

    def delivered(self, study_uid: str) -> set[str]:
        """The destinations holding the study's current RTSTRUCT (not an earlier one a rerun replaced)."""
        rows = self._query("SELECT d.destination FROM deliveries d JOIN jobs j ON j.study_uid=d.study_uid WHERE "
                           "d.study_uid=? AND d.state='sent' AND d.rtstruct_uid IS j.rtstruct_uid", (study_uid,))
        return {r["destination"] for r in rows}

    def to_delivery(self, study_uid: str) -> None:
        """running (or queued with its RTSTRUCT) -> delivering: the couriers take it from here."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state='delivering', worker_pid=NULL WHERE study_uid=? AND state IN "
                       "('running', 'queued')", (study_uid,))

    def next_delivery(self, destination: str, now: float | None = None):
        """Claim the oldest delivering study that ``destination`` does not hold, has not given up on, may try now
        and no live courier holds; None when there is none. The claim is a lease on the (study, destination) row."""
        now = time.time() if now is None else now
        for job in self._query(
                "SELECT j.* FROM jobs j LEFT JOIN deliveries d ON d.study_uid=j.study_uid AND d.destination=? "
                "WHERE j.state='delivering' AND (d.study_uid IS NULL OR d.rtstruct_uid IS NOT j.rtstruct_uid OR "
                "(d.state='pending' AND COALESCE(d.retry_at, 0)<=?)) AND (d.lease_until IS NULL OR d.lease_until<?) "
                "ORDER BY j.first_received LIMIT 5", (destination, now, now)):
            with self._tx() as db:
                claimed = db.execute(
                    "INSERT INTO deliveries (study_uid, destination, state, rtstruct_uid, claimed_by, lease_until) "
                    "VALUES (?,?,'pending',?,?,?) ON CONFLICT (study_uid, destination) DO UPDATE SET "
                    "claimed_by=excluded.claimed_by, lease_until=excluded.lease_until WHERE "
                    "(deliveries.lease_until IS NULL OR deliveries.lease_until<?) AND (deliveries.rtstruct_uid IS NOT "
                    "excluded.rtstruct_uid OR (deliveries.state='pending' AND COALESCE(deliveries.retry_at, 0)<=?))",
                    (job["study_uid"], destination, job["rtstruct_uid"], self.node, now + self.lease_s, now,
                     now)).rowcount
            if claimed == 1:
                return job
        return None

    def conclude_delivery(self, study_uid: str, destinations: list[str]) -> tuple[str, str | None] | None:
        """delivering -> sent (every destination holds the RTSTRUCT) or failed (the rest gave up); None: not yet."""
        with self._tx() as db:
            job = db.execute("SELECT rtstruct_uid FROM jobs WHERE study_uid=? AND state='delivering'"
                             + self.SKIP_LOCKED, (study_uid,)).fetchone()
            if job is None:
                return None
            rows = {r["destination"]: r for r in db.execute(
                "SELECT * FROM deliveries WHERE study_uid=? AND rtstruct_uid IS ?", (study_uid, job["rtstruct_uid"]))}
            states = {d: rows[d]["state"] if d in rows else "pending" for d in destinations}
            if "pending" in states.values():
                return None
            failed = [d for d, state in states.items() if state == "failed"]
            if not failed:
                db.execute("UPDATE jobs SET state='sent', finished_at=?, reason=NULL WHERE study_uid=?",
                           (time.time(), study_uid))
                return "sent", None
            reason = "; ".join(f"not delivered to {d} ({rows[d]['last_error']})" for d in failed)
            db.execute("UPDATE jobs SET state='failed', finished_at=?, reason=? WHERE study_uid=?",
                       (time.time(), reason, study_uid))
            return "failed", reason

    def delivery_attempt(self, study_uid: str, destination: str, error: str | None, give_up: bool = False,
                         rtstruct_uid: str | None = None, retry_at: float | None = None) -> int:
        """Record one attempt (``error`` None: it was stored; ``give_up``: failed for good) and release the claim;
        returns the attempts. ``rtstruct_uid``: the RTSTRUCT sent (default the job's current one); an attempt
        with another RTSTRUCT than the row's (a rerun's) starts the row afresh.
        """
        with self._tx() as db:
            if rtstruct_uid is None:
                job = db.execute("SELECT rtstruct_uid FROM jobs WHERE study_uid=?", (study_uid,)).fetchone()
                rtstruct_uid = job["rtstruct_uid"] if job else None
            db.execute("INSERT INTO deliveries (study_uid, destination, state, rtstruct_uid) VALUES (?,?,'pending',?) "
                       "ON CONFLICT (study_uid, destination) DO NOTHING", (study_uid, destination, rtstruct_uid))
            db.execute("UPDATE deliveries SET state='pending', attempts=0, last_error=NULL, rtstruct_uid=? WHERE "
                       "study_uid=? AND destination=? AND rtstruct_uid IS NOT ?",
                       (rtstruct_uid, study_uid, destination, rtstruct_uid))
            if error is None:
                db.execute("UPDATE deliveries SET state='sent', attempts=attempts+1, sent_at=?, last_error=NULL, "
                           "lease_until=NULL WHERE study_uid=? AND destination=?", (time.time(), study_uid, destination))
            else:
                db.execute("UPDATE deliveries SET attempts=attempts+1, last_error=?, state=?, retry_at=?, "
                           "lease_until=NULL WHERE study_uid=? AND destination=?",
                           (error, "failed" if give_up else "pending", retry_at, study_uid, destination))
            row = db.execute("SELECT attempts FROM deliveries WHERE study_uid=? AND destination=?",
                             (study_uid, destination)).fetchone()
            return int(row["attempts"])

    def delivery_attempts(self, study_uid: str, destination: str, rtstruct_uid: str | None = None) -> int:
        """Attempts so far to send ``rtstruct_uid`` (default: any RTSTRUCT) to ``destination``."""
        if rtstruct_uid is None:
            rows = self._query("SELECT attempts FROM deliveries WHERE study_uid=? AND destination=?",
                               (study_uid, destination))
        else:
            rows = self._query("SELECT attempts FROM deliveries WHERE study_uid=? AND destination=? AND "
                               "rtstruct_uid=?", (study_uid, destination, rtstruct_uid))
        return int(rows[0]["attempts"]) if rows else 0

    def deliveries(self, study_uid: str | None = None) -> list:
        if study_uid is None:
            return self._query("SELECT * FROM deliveries ORDER BY study_uid, destination")
        return self._query("SELECT * FROM deliveries WHERE study_uid=? ORDER BY destination", (study_uid,))
