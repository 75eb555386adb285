"""The spool: received instances on disk (written atomically) and the SQLite database beside them.

Layout: ``DIR/studies/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm`` (UIDs are checked to be UIDs,
so they are safe names), ``DIR/incoming/`` for files being written, ``DIR/tmp/`` for the node's
temporary files, ``DIR/jobs/<case id>/`` for the runs' outputs, ``DIR/node.sqlite`` and
``DIR/audit.jsonl``. The database has one row per received instance, one job per study (the queue:
received -> queued -> running -> delivering -> sent | failed) and one delivery row per study and
destination, so a restart knows what was sent where.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, OutputError
from .selection import SeriesSummary

STATES = ("received", "queued", "running", "delivering", "sent", "failed")
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
  worker_pid INTEGER, rtstruct TEXT, rtstruct_uid TEXT, reason TEXT, late_instances INTEGER DEFAULT 0,
  previous_rtstruct_uid TEXT);
CREATE TABLE IF NOT EXISTS deliveries (
  study_uid TEXT NOT NULL, destination TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER DEFAULT 0,
  sent_at REAL, last_error TEXT, rtstruct_uid TEXT, retry_at REAL, PRIMARY KEY (study_uid, destination));
"""
# columns added since the first release, with the statement that fills them in an older spool's database
_ADDED = (("jobs", "previous_rtstruct_uid", "TEXT", None),
          ("deliveries", "rtstruct_uid", "TEXT",
           "UPDATE deliveries SET rtstruct_uid=(SELECT j.rtstruct_uid FROM jobs j "
           "WHERE j.study_uid=deliveries.study_uid)"),
          ("deliveries", "retry_at", "REAL", None))


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
        for sub in ("incoming", "studies", "jobs", "tmp", "node.sqlite", "audit.jsonl", "node.pid"):
            if (self.root / sub).is_symlink():  # the node would write patient data wherever it points
                raise OutputError(f"Spool folder {self.root}: {sub} is a symbolic link; the spool must hold its own "
                                  f"folders and files. Remove the link or give another spool.")
        try:
            for sub in ("incoming", "studies", "jobs", "tmp"):
                (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            for folder in (self.root, *(self.root / sub for sub in ("incoming", "studies", "jobs", "tmp"))):
                os.chmod(folder, 0o700)  # patient images: the node's user only
        except OSError as exc:
            raise OutputError(f"Spool folder {self.root}: cannot be created ({exc.strerror}).") from exc
        self.db_path = self.root / "node.sqlite"
        self.audit_path = self.root / "audit.jsonl"
        os.close(os.open(self.db_path, os.O_WRONLY | os.O_CREAT, 0o600))  # SQLite gives its WAL the same mode
        os.chmod(self.db_path, 0o600)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a killed process loses no commit
        self._db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Add the columns an older node's database lacks (the data it holds stays as it is)."""
        for table, column, kind, fill in _ADDED:
            have = {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                with self._tx() as db:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                    if fill:
                        db.execute(fill)

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
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:  # SQLite may have rolled back itself (e.g. disk full): keep the first error
                    pass
                raise

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ---------------------------------------------------------------- receiving

    def free_mb(self) -> float:
        """Free space on the spool's disk, in MB (for the watermark below which C-STOREs are refused)."""
        return shutil.disk_usage(self.root).free / 1e6

    @property
    def temp_dir(self) -> Path:
        """The node's temporary folder (worker run folders, data sets being received), emptied at start."""
        return self.root / "tmp"

    def clear_temp(self) -> int:
        """Remove what a killed node left in its temporary folder; returns how many entries."""
        entries = list(self.temp_dir.iterdir())
        for path in entries:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return len(entries)

    def clear_incoming(self) -> int:
        """Remove files a killed node left half-written; returns how many."""
        count = 0
        for path in (self.root / "incoming").iterdir():
            path.unlink(missing_ok=True)
            count += 1
        return count

    def instance_path(self, inst: Instance) -> Path:
        return self.root / "studies" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"

    def store(self, inst: Instance, data: bytes | Path, now: float | None = None) -> str:
        """Write the file (bytes, or copied from a file) atomically, record it; returns the study's job state."""
        for uid in (inst.study_uid, inst.series_uid, inst.sop_uid):
            if not is_uid(uid):
                raise ValueError(f"not a valid UID: {uid!r}")
        target = self.instance_path(inst)
        for folder in (target.parent.parent, target.parent):  # the study's and the series' folders, 0700
            folder.mkdir(mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".recv-", suffix=".dcm", dir=self.root / "incoming")
        try:
            with os.fdopen(fd, "wb") as f:
                if isinstance(data, Path):
                    with open(data, "rb") as source:
                        shutil.copyfileobj(source, f, 1 << 20)
                else:
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        now = time.time() if now is None else now
        with self._tx() as db:
            known = db.execute("SELECT 1 FROM instances WHERE sop_uid=? AND study_uid=?",
                               (inst.sop_uid, inst.study_uid)).fetchone() is not None
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
    def _reopen(db: sqlite3.Connection, study_uid: str, now: float) -> None:
        """Back to ``received`` for a new run: the next RTSTRUCT (a new SOP instance UID) replaces the earlier one."""
        db.execute("UPDATE jobs SET state='received', last_received=?, attempts=0, reason=NULL, worker_pid=NULL, "
                   "previous_rtstruct_uid=COALESCE((SELECT d.rtstruct_uid FROM deliveries d WHERE "
                   "d.study_uid=jobs.study_uid AND d.state='sent' ORDER BY d.sent_at DESC LIMIT 1), "
                   "previous_rtstruct_uid), rtstruct=NULL, rtstruct_uid=NULL WHERE study_uid=?", (now, study_uid))
        db.execute("DELETE FROM deliveries WHERE study_uid=? AND state!='sent'", (study_uid,))

    def purge(self, keep_days: float, now: float | None = None) -> list[str]:
        """Delete the images and outputs of studies sent or failed more than ``keep_days`` ago; returns their UIDs.

        The job row and its deliveries stay (the queue's history, no pixel data); images of a purged
        study that arrive again are new to the spool and reopen it.
        """
        limit = (time.time() if now is None else now) - keep_days * 86400
        rows = self._query("SELECT j.study_uid, j.case_id FROM jobs j WHERE j.state IN ('sent', 'failed') AND "
                           "j.finished_at<? AND EXISTS (SELECT 1 FROM instances i WHERE i.study_uid=j.study_uid)",
                           (limit,))
        for row in rows:
            with self._tx() as db:  # the rows first: a crash in between leaves files, never rows without files
                db.execute("DELETE FROM instances WHERE study_uid=?", (row["study_uid"],))
                db.execute("UPDATE jobs SET rtstruct=NULL WHERE study_uid=?", (row["study_uid"],))
            shutil.rmtree(self.root / "studies" / row["study_uid"], ignore_errors=True)
            shutil.rmtree(self.root / "jobs" / row["case_id"], ignore_errors=True)
        return [r["study_uid"] for r in rows]

    def reopen_if_changed(self, study_uid: str) -> bool:
        """After a run: when new images arrived while it ran, the study goes back to ``received`` (True)."""
        with self._tx() as db:
            row = db.execute("SELECT MAX(i.received_at) AS last, j.started_at FROM instances i JOIN jobs j "
                             "USING (study_uid) WHERE study_uid=?", (study_uid,)).fetchone()
            if row is None or row["last"] is None or row["started_at"] is None or row["last"] <= row["started_at"]:
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
        with self._tx() as db:
            row = self._require_finished(db, study_uid, "--redeliver")
            if not row["rtstruct"] or not Path(row["rtstruct"]).is_file():
                raise InputError(f"--redeliver {study_uid}: this study has no RTSTRUCT in the spool; use --rerun.")
            db.execute("DELETE FROM deliveries WHERE study_uid=?", (study_uid,))
            db.execute("UPDATE jobs SET state='delivering', reason=NULL WHERE study_uid=?", (study_uid,))
            return str(row["rtstruct_uid"])

    @staticmethod
    def _require_finished(db: sqlite3.Connection, study_uid: str, flag: str) -> sqlite3.Row:
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
        """The destinations holding the study's current RTSTRUCT (not an earlier one a rerun replaced)."""
        rows = self._query("SELECT d.destination FROM deliveries d JOIN jobs j USING (study_uid) WHERE "
                           "d.study_uid=? AND d.state='sent' AND d.rtstruct_uid IS j.rtstruct_uid", (study_uid,))
        return {r["destination"] for r in rows}

    def to_delivery(self, study_uid: str) -> None:
        """running (or queued with its RTSTRUCT) -> delivering: the couriers take it from here."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state='delivering', worker_pid=NULL WHERE study_uid=? AND state IN "
                       "('running', 'queued')", (study_uid,))

    def next_delivery(self, destination: str, now: float | None = None) -> sqlite3.Row | None:
        """The oldest delivering study that ``destination`` does not hold, has not given up on, and may try now."""
        rows = self._query(
            "SELECT j.* FROM jobs j LEFT JOIN deliveries d ON d.study_uid=j.study_uid AND d.destination=? "
            "WHERE j.state='delivering' AND (d.study_uid IS NULL OR d.rtstruct_uid IS NOT j.rtstruct_uid OR "
            "(d.state='pending' AND COALESCE(d.retry_at, 0)<=?)) ORDER BY j.first_received LIMIT 1",
            (destination, time.time() if now is None else now))
        return rows[0] if rows else None

    def conclude_delivery(self, study_uid: str, destinations: list[str]) -> tuple[str, str | None] | None:
        """delivering -> sent (every destination holds the RTSTRUCT) or failed (the rest gave up); None: not yet."""
        with self._tx() as db:
            job = db.execute("SELECT rtstruct_uid FROM jobs WHERE study_uid=? AND state='delivering'",
                             (study_uid,)).fetchone()
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
        """Record one attempt (``error`` None: it was stored; ``give_up``: failed for good); returns the attempts.

        ``rtstruct_uid``: the RTSTRUCT sent (default the job's current one); an attempt with another
        RTSTRUCT than the row's (a rerun's) starts the row afresh.
        """
        with self._tx() as db:
            if rtstruct_uid is None:
                job = db.execute("SELECT rtstruct_uid FROM jobs WHERE study_uid=?", (study_uid,)).fetchone()
                rtstruct_uid = job["rtstruct_uid"] if job else None
            db.execute("INSERT OR IGNORE INTO deliveries (study_uid, destination, state, rtstruct_uid) "
                       "VALUES (?,?,'pending',?)", (study_uid, destination, rtstruct_uid))
            db.execute("UPDATE deliveries SET state='pending', attempts=0, last_error=NULL, rtstruct_uid=? WHERE "
                       "study_uid=? AND destination=? AND rtstruct_uid IS NOT ?",
                       (rtstruct_uid, study_uid, destination, rtstruct_uid))
            if error is None:
                db.execute("UPDATE deliveries SET state='sent', attempts=attempts+1, sent_at=?, last_error=NULL "
                           "WHERE study_uid=? AND destination=?", (time.time(), study_uid, destination))
            else:
                db.execute("UPDATE deliveries SET attempts=attempts+1, last_error=?, state=?, retry_at=? WHERE "
                           "study_uid=? AND destination=?",
                           (error, "failed" if give_up else "pending", retry_at, study_uid, destination))
            row = db.execute("SELECT attempts FROM deliveries WHERE study_uid=? AND destination=?",
                             (study_uid, destination)).fetchone()
            return int(row["attempts"])

    def delivery_attempts(self, study_uid: str, destination: str, rtstruct_uid: str | None = None) -> int:
        """Attempts so far to send ``rtstruct_uid`` (default: any RTSTRUCT) to ``destination``."""
        rows = self._query("SELECT attempts FROM deliveries WHERE study_uid=? AND destination=? AND "
                           "(? IS NULL OR rtstruct_uid IS ?)", (study_uid, destination, rtstruct_uid, rtstruct_uid))
        return int(rows[0]["attempts"]) if rows else 0

    def deliveries(self, study_uid: str | None = None) -> list[sqlite3.Row]:
        if study_uid is None:
            return self._query("SELECT * FROM deliveries ORDER BY study_uid, destination")
        return self._query("SELECT * FROM deliveries WHERE study_uid=? ORDER BY destination", (study_uid,))
