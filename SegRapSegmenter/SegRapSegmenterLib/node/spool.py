"""The spool: received instances on disk (written atomically) and the SQLite database beside them.

Layout: ``DIR/studies/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm`` (UIDs are checked to be UIDs,
so they are safe names), ``DIR/incoming/`` for files being written, ``DIR/jobs/<case id>/`` for the
runs' outputs, ``DIR/node.sqlite`` and ``DIR/audit.jsonl``. The database has one row per received
instance, one job per study (the queue: received -> queued -> running -> sent | failed) and one
delivery row per study and destination, so a restart knows what was sent where.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputError
from .selection import SeriesSummary

STATES = ("received", "queued", "running", "sent", "failed")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
  sop_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, series_uid TEXT NOT NULL, sop_class TEXT NOT NULL,
  modality TEXT, series_description TEXT, contrast_tags TEXT, calling_ae TEXT, received_at REAL, path TEXT);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_uid);
CREATE TABLE IF NOT EXISTS jobs (
  study_uid TEXT PRIMARY KEY, case_id TEXT NOT NULL, state TEXT NOT NULL, calling_ae TEXT,
  first_received REAL, last_received REAL, queued_at REAL, started_at REAL, finished_at REAL,
  plain_series TEXT, contrast_series TEXT, tasks TEXT, notes TEXT, attempts INTEGER DEFAULT 0,
  worker_pid INTEGER, rtstruct TEXT, rtstruct_uid TEXT, reason TEXT, late_instances INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS deliveries (
  study_uid TEXT NOT NULL, destination TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER DEFAULT 0,
  sent_at REAL, last_error TEXT, PRIMARY KEY (study_uid, destination));
"""


def is_uid(text: str) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters (so it is also a safe file name)."""
    return bool(text) and len(text) <= 64 and bool(_UID.match(text))


def case_id_for(study_uid: str) -> str:
    """The case id of a study: a name derived from its UID (never a path)."""
    case_id = "study-" + hashlib.sha256(study_uid.encode()).hexdigest()[:16]
    try:  # the pipeline's validator (kept with the request in the runner), where the package has one
        from ..runner import check_case_id  # type: ignore[attr-defined]
    except ImportError:
        return case_id
    return check_case_id(case_id) or case_id


@dataclass(frozen=True)
class Instance:
    """One received instance, as the SCP hands it to the spool."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    modality: str
    series_description: str
    contrast_tags: tuple[str, ...]
    calling_ae: str


class Spool:
    """The spool folder and its database; safe to use from several threads of one process."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        try:
            for sub in ("incoming", "studies", "jobs"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"Spool folder {self.root}: cannot be created ({exc.strerror}).") from exc
        self.db_path = self.root / "node.sqlite"
        self.audit_path = self.root / "audit.jsonl"
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a killed process loses no commit
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ---------------------------------------------------------------- receiving

    def clear_incoming(self) -> int:
        """Remove files a killed node left half-written; returns how many."""
        count = 0
        for path in (self.root / "incoming").iterdir():
            path.unlink(missing_ok=True)
            count += 1
        return count

    def instance_path(self, inst: Instance) -> Path:
        return self.root / "studies" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"

    def store(self, inst: Instance, data: bytes, now: float | None = None) -> str:
        """Write the file atomically, record it; returns the study's job state after it ("late" after a run)."""
        for uid in (inst.study_uid, inst.series_uid, inst.sop_uid):
            if not is_uid(uid):
                raise ValueError(f"not a valid UID: {uid!r}")
        target = self.instance_path(inst)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".recv-", suffix=".dcm", dir=self.root / "incoming")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO instances VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (inst.sop_uid, inst.study_uid, inst.series_uid, inst.sop_class, inst.modality,
                        inst.series_description, ",".join(inst.contrast_tags), inst.calling_ae, now, str(target)))
            row = db.execute("SELECT state FROM jobs WHERE study_uid=?", (inst.study_uid,)).fetchone()
            if row is None:
                db.execute("INSERT INTO jobs (study_uid, case_id, state, calling_ae, first_received, last_received) "
                           "VALUES (?,?,?,?,?,?)", (inst.study_uid, case_id_for(inst.study_uid), "received",
                                                    inst.calling_ae, now, now))
                return "received"
            if row["state"] in ("received", "queued"):
                db.execute("UPDATE jobs SET state='received', last_received=? WHERE study_uid=?",
                           (now, inst.study_uid))
                return "received"
            if row["state"] == "failed":  # a study sent again after a failure gets a fresh start
                # the stored RTSTRUCT is kept when a destination already holds it: one structure set per study
                db.execute("UPDATE jobs SET state='received', last_received=?, attempts=0, reason=NULL, "
                           "rtstruct=CASE WHEN EXISTS (SELECT 1 FROM deliveries d WHERE d.study_uid=jobs.study_uid "
                           "AND d.state='sent') THEN rtstruct END, rtstruct_uid=CASE WHEN EXISTS (SELECT 1 FROM "
                           "deliveries d WHERE d.study_uid=jobs.study_uid AND d.state='sent') THEN rtstruct_uid END "
                           "WHERE study_uid=?", (now, inst.study_uid))
                db.execute("DELETE FROM deliveries WHERE study_uid=? AND state!='sent'", (inst.study_uid,))
                return "reopened"
            db.execute("UPDATE jobs SET late_instances=late_instances+1 WHERE study_uid=?", (inst.study_uid,))
            return "late"

    def settled(self, settle_s: float, now: float | None = None) -> list[str]:
        """Studies in ``received`` with no instance for ``settle_s`` seconds."""
        now = time.time() if now is None else now
        rows = self._query("SELECT study_uid FROM jobs WHERE state='received' AND last_received<=? "
                           "ORDER BY first_received", (now - settle_s,))
        return [r["study_uid"] for r in rows]

    def series_of(self, study_uid: str) -> list[SeriesSummary]:
        """One summary per series of the study (for ``selection.select``)."""
        rows = self._query("SELECT series_uid, modality, series_description, contrast_tags, COUNT(*) AS n "
                           "FROM instances WHERE study_uid=? GROUP BY series_uid", (study_uid,))
        return [SeriesSummary(r["series_uid"], r["modality"] or "", r["series_description"] or "", int(r["n"]),
                              tuple(t for t in (r["contrast_tags"] or "").split(",") if t)) for r in rows]

    def series_folder(self, study_uid: str, series_uid: str) -> Path:
        return self.root / "studies" / study_uid / series_uid

    # ---------------------------------------------------------------- the queue

    def job(self, study_uid: str) -> sqlite3.Row | None:
        rows = self._query("SELECT * FROM jobs WHERE study_uid=?", (study_uid,))
        return rows[0] if rows else None

    def jobs(self) -> list[sqlite3.Row]:
        return self._query("SELECT * FROM jobs ORDER BY first_received")

    def queue(self, study_uid: str, plain: str, contrast: str | None, tasks: tuple[str, ...], notes: str) -> bool:
        """received -> queued with the chosen series; False when an instance arrived meanwhile."""
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET state='queued', queued_at=?, plain_series=?, contrast_series=?, "
                             "tasks=?, notes=? WHERE study_uid=? AND state='received'",
                             (time.time(), plain, contrast, ",".join(tasks), notes, study_uid))
            return cur.rowcount == 1

    def fail(self, study_uid: str, reason: str, notes: str | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET state='failed', finished_at=?, reason=?, notes=COALESCE(?, notes), "
                       "worker_pid=NULL WHERE study_uid=?", (time.time(), reason, notes, study_uid))

    def claim(self) -> sqlite3.Row | None:
        """The oldest queued job, now running (attempts + 1); None when the queue is empty."""
        with self._tx() as db:
            row = db.execute("SELECT study_uid FROM jobs WHERE state='queued' ORDER BY queued_at LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state='running', started_at=?, attempts=attempts+1 WHERE study_uid=?",
                       (time.time(), row["study_uid"]))
            return db.execute("SELECT * FROM jobs WHERE study_uid=?", (row["study_uid"],)).fetchone()

    def set_worker_pid(self, study_uid: str, pid: int | None) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET worker_pid=? WHERE study_uid=?", (pid, study_uid))

    def set_rtstruct(self, study_uid: str, path: str, sop_uid: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET rtstruct=?, rtstruct_uid=?, worker_pid=NULL WHERE study_uid=?",
                       (path, sop_uid, study_uid))

    def requeue(self, study_uid: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET state='queued', worker_pid=NULL, attempts=MAX(attempts-1, 0) "
                       "WHERE study_uid=? AND state='running'",
                       (study_uid,))

    def retry(self, study_uid: str) -> None:
        """running -> queued after a run that died; the run counts (``attempts`` is kept)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state='queued', queued_at=?, worker_pid=NULL WHERE study_uid=? "
                       "AND state='running'", (time.time(), study_uid))

    def finish(self, study_uid: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET state='sent', finished_at=?, worker_pid=NULL, reason=NULL WHERE study_uid=?",
                       (time.time(), study_uid))

    def recover(self) -> list[sqlite3.Row]:
        """Jobs a stopped or killed node left running, back in the queue (returned as they were).

        The interrupted run is not counted: a node restart must not use up a healthy job's runs.
        """
        with self._tx() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state='running'").fetchall()
            db.execute("UPDATE jobs SET state='queued', attempts=MAX(attempts-1, 0) WHERE state='running'")
            return rows

    # ---------------------------------------------------------------- deliveries

    def delivered(self, study_uid: str) -> set[str]:
        rows = self._query("SELECT destination FROM deliveries WHERE study_uid=? AND state='sent'", (study_uid,))
        return {r["destination"] for r in rows}

    def delivery_attempt(self, study_uid: str, destination: str, error: str | None, give_up: bool = False) -> int:
        """Record one attempt (``error`` None: it was stored; ``give_up``: failed for good); returns the attempts."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO deliveries (study_uid, destination, state) VALUES (?,?,'pending')",
                       (study_uid, destination))
            if error is None:
                db.execute("UPDATE deliveries SET state='sent', attempts=attempts+1, sent_at=?, last_error=NULL "
                           "WHERE study_uid=? AND destination=?", (time.time(), study_uid, destination))
            else:
                db.execute("UPDATE deliveries SET attempts=attempts+1, last_error=?, state=? WHERE study_uid=? AND "
                           "destination=?", (error, "failed" if give_up else "pending", study_uid, destination))
            row = db.execute("SELECT attempts FROM deliveries WHERE study_uid=? AND destination=?",
                             (study_uid, destination)).fetchone()
            return int(row["attempts"])

    def delivery_attempts(self, study_uid: str, destination: str) -> int:
        rows = self._query("SELECT attempts FROM deliveries WHERE study_uid=? AND destination=?",
                           (study_uid, destination))
        return int(rows[0]["attempts"]) if rows else 0

    def deliveries(self, study_uid: str | None = None) -> list[sqlite3.Row]:
        if study_uid is None:
            return self._query("SELECT * FROM deliveries ORDER BY study_uid, destination")
        return self._query("SELECT * FROM deliveries WHERE study_uid=? ORDER BY destination", (study_uid,))
