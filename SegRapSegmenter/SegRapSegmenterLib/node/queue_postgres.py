"""The queue in PostgreSQL (``--queue postgresql://USER@HOST/DB``): one queue for nodes on many machines.

psycopg is imported here only, so a node on SQLite (and Slicer) never needs it. One connection per
node process in autocommit mode, shared by its threads under a lock; every change is one short
transaction. Jobs are claimed with ``SELECT ... FOR UPDATE SKIP LOCKED``, so two nodes never take
the same job and neither waits for the other. The queue's statements are written in SQLite's
dialect (``queue``) and translated here: placeholders, and ``IS`` / ``IS NOT`` between values.
Migrations run in one transaction under an advisory lock, so nodes starting together migrate once.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from ..errors import InputError
from .queue import DEFAULT_LEASE_S, JobQueue, redact

MIGRATION_LOCK = 29029  # pg_advisory_xact_lock key: one migrating node at a time

_V1 = (
    "CREATE TABLE instances (sop_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, series_uid TEXT NOT NULL, "
    "sop_class TEXT NOT NULL, modality TEXT, series_description TEXT, contrast_tags TEXT, calling_ae TEXT, "
    "received_at DOUBLE PRECISION, path TEXT)",
    "CREATE INDEX instances_study ON instances (study_uid)",
    "CREATE TABLE jobs (study_uid TEXT PRIMARY KEY, case_id TEXT NOT NULL, state TEXT NOT NULL, calling_ae TEXT, "
    "first_received DOUBLE PRECISION, last_received DOUBLE PRECISION, queued_at DOUBLE PRECISION, "
    "started_at DOUBLE PRECISION, finished_at DOUBLE PRECISION, plain_series TEXT, contrast_series TEXT, "
    "tasks TEXT, notes TEXT, attempts INTEGER DEFAULT 0, worker_pid INTEGER, rtstruct TEXT, rtstruct_uid TEXT, "
    "reason TEXT, late_instances INTEGER DEFAULT 0, previous_rtstruct_uid TEXT)",
    "CREATE TABLE deliveries (study_uid TEXT NOT NULL, destination TEXT NOT NULL, state TEXT NOT NULL, "
    "attempts INTEGER DEFAULT 0, sent_at DOUBLE PRECISION, last_error TEXT, rtstruct_uid TEXT, "
    "retry_at DOUBLE PRECISION, PRIMARY KEY (study_uid, destination))",
)
_V2 = (
    "ALTER TABLE jobs ADD COLUMN claimed_by TEXT, ADD COLUMN lease_until DOUBLE PRECISION",
    "ALTER TABLE deliveries ADD COLUMN claimed_by TEXT, ADD COLUMN lease_until DOUBLE PRECISION",
    "CREATE INDEX jobs_state ON jobs (state)",
    "CREATE TABLE nodes (name TEXT PRIMARY KEY, host TEXT, pid INTEGER, started DOUBLE PRECISION, "
    "heartbeat DOUBLE PRECISION, lease_s DOUBLE PRECISION, gpus TEXT, stopped DOUBLE PRECISION)",
)
MIGRATIONS = (_V1, _V2)  # version N is MIGRATIONS[N-1], the same versions as the SQLite queue's; append, never edit


@functools.lru_cache(maxsize=None)
def translate(sql: str) -> str:
    """SQLite's spelling -> PostgreSQL's: ``?`` placeholders, ``IS`` / ``IS NOT`` comparing two values."""
    sql = re.sub(r"\bIS NOT (?!NULL\b)", "IS DISTINCT FROM ", sql)
    sql = re.sub(r"\bIS (?!NOT\b|NULL\b|DISTINCT\b)", "IS NOT DISTINCT FROM ", sql)
    return sql.replace("?", "%s")


class _Translating:
    """A psycopg connection that takes the queue's SQLite-dialect statements."""

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql: str, args: tuple = ()):
        return self.conn.execute(translate(sql), args)


class PostgresQueue(JobQueue):
    """The queue in a PostgreSQL database; safe to use from several threads of one process."""

    SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, node: str | None = None, lease_s: float = DEFAULT_LEASE_S):
        super().__init__(node, lease_s)
        self.url = url
        self._conn = None
        self._connect()
        self.migrate()

    @property
    def where(self) -> str:
        return redact(self.url)

    def _connect(self) -> None:
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError:
            raise InputError(f"--queue {redact(self.url)}: the PostgreSQL queue needs the psycopg package; install "
                             f"it with: pip install 'psycopg[binary]'.") from None
        try:
            self._conn = psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=10)
        except psycopg.Error as exc:
            message = str(exc).strip()
            password = urlsplit(self.url).password
            if password:
                message = message.replace(password, "***")
            raise InputError(f"--queue {redact(self.url)}: cannot connect to the database ({message}).") from None
        self._db = _Translating(self._conn)

    def _connection(self):
        """The connection, made again when the last one broke (a database restart)."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._connect()
        return self._conn

    def schema_version(self) -> int:
        with self._tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied "
                       "DOUBLE PRECISION)")
            return int(db.execute("SELECT COALESCE(MAX(version), 0) AS v FROM schema_version").fetchone()["v"])

    def migrate(self) -> None:
        """Apply the migrations this database has not had, all in one transaction under the advisory lock."""
        with self._tx() as db:
            db.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied "
                       "DOUBLE PRECISION)")
            have = int(db.execute("SELECT COALESCE(MAX(version), 0) AS v FROM schema_version").fetchone()["v"])
            if have > len(MIGRATIONS):
                raise InputError(f"--queue {redact(self.url)}: the database has schema version {have}, newer than "
                                 f"this segrap's {len(MIGRATIONS)}; update segrap on this machine.")
            for version in range(have + 1, len(MIGRATIONS) + 1):
                for statement in MIGRATIONS[version - 1]:
                    db.execute(statement)
                db.execute("INSERT INTO schema_version VALUES (?, ?)", (version, time.time()))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[_Translating]:
        with self._lock:
            conn = self._connection()
            with conn.transaction():
                yield self._db

    def _query(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            return self._connection().execute(translate(sql), args).fetchall()
