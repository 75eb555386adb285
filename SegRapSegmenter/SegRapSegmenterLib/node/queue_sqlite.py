"""The default queue: SQLite in the spool (``node.sqlite``), for one node on one machine.

WAL journal, one connection shared by the node's threads under a lock, ``BEGIN IMMEDIATE``
transactions. The schema is migrated in order (``MIGRATIONS``); the version is in ``schema_version``.
A spool from before the versions (no such table) is version 0 and goes through every migration.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError
from .queue import DEFAULT_LEASE_S, JobQueue

_BASE = """
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
  sent_at REAL, last_error TEXT, rtstruct_uid TEXT, retry_at REAL, PRIMARY KEY (study_uid, destination))
"""
# columns the releases before the schema versions added, with the statement that fills them in an older database
_ADDED = (("jobs", "previous_rtstruct_uid", "TEXT", None),
          ("deliveries", "rtstruct_uid", "TEXT",
           "UPDATE deliveries SET rtstruct_uid=(SELECT j.rtstruct_uid FROM jobs j "
           "WHERE j.study_uid=deliveries.study_uid)"),
          ("deliveries", "retry_at", "REAL", None))


def _v1_base(db: sqlite3.Connection) -> None:
    """The tables of the node's first releases, with every column they added over time."""
    for statement in _BASE.split(";"):
        db.execute(statement)
    for table, column, kind, fill in _ADDED:
        if column not in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            if fill:
                db.execute(fill)


def _v2_leases_and_nodes(db: sqlite3.Connection) -> None:
    """Who holds a job or a delivery, and until when (the lease); the nodes that serve from this queue."""
    for table in ("jobs", "deliveries"):
        db.execute(f"ALTER TABLE {table} ADD COLUMN claimed_by TEXT")
        db.execute(f"ALTER TABLE {table} ADD COLUMN lease_until REAL")
    db.execute("CREATE TABLE nodes (name TEXT PRIMARY KEY, host TEXT, pid INTEGER, started REAL, heartbeat REAL, "
               "lease_s REAL, gpus TEXT, stopped REAL)")


MIGRATIONS = (_v1_base, _v2_leases_and_nodes)  # version N is MIGRATIONS[N-1]; append, never edit


class SqliteQueue(JobQueue):
    """The queue in ``<spool>/node.sqlite``; safe to use from several threads of one process."""

    def __init__(self, spool_root: str | Path, node: str | None = None, lease_s: float = DEFAULT_LEASE_S):
        super().__init__(node, lease_s)
        self.db_path = Path(spool_root) / "node.sqlite"
        os.close(os.open(self.db_path, os.O_WRONLY | os.O_CREAT, 0o600))  # SQLite gives its WAL the same mode
        os.chmod(self.db_path, 0o600)
        self._db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a killed process loses no commit
        self.migrate()

    @property
    def where(self) -> str:
        return str(self.db_path)

    def schema_version(self) -> int:
        with self._lock:
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied REAL)")
            return int(self._db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])

    def migrate(self) -> None:
        """Apply the migrations this database has not had, each in its own transaction (the data stays)."""
        have = self.schema_version()
        if have > len(MIGRATIONS):
            raise OutputError(f"{self.db_path}: the spool's database has schema version {have}, newer than this "
                              f"segrap's {len(MIGRATIONS)}; update segrap, or give another spool.")
        for version in range(have + 1, len(MIGRATIONS) + 1):
            with self._tx() as db:
                MIGRATIONS[version - 1](db)
                db.execute("INSERT INTO schema_version VALUES (?, ?)", (version, time.time()))

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
