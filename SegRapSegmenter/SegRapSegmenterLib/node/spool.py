"""The spool: received instances on disk (written atomically), and the node's queue (``queue``) beside them.

Layout: ``DIR/studies/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm`` (UIDs are checked to be UIDs,
so they are safe names), ``DIR/incoming/`` for files being written, ``DIR/tmp/`` for the node's
temporary files, ``DIR/jobs/<case id>/`` for the runs' outputs, ``DIR/node.sqlite`` (the queue,
unless it is in PostgreSQL) and ``DIR/audit.jsonl``. The queue has one row per received instance, one
job per study (received -> queued -> running -> delivering -> sent | failed) and one delivery row per
study and destination, so a restart knows what was sent where. Nodes sharing a spool (a PostgreSQL
queue) each have their own ``incoming/<node>/``, ``tmp/<node>/`` and ``audit-<node>.jsonl``, so no node
clears another's half-received files or interleaves lines with another's audit.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import InputError, OutputError
from .queue import DEFAULT_LEASE_S, JobQueue, default_node_name, redact

STATES = ("received", "queued", "running", "delivering", "sent", "failed")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


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


def open_queue(url: str | None, spool_root, node: str | None = None, lease_s: float = DEFAULT_LEASE_S) -> JobQueue:
    """The queue a node uses: SQLite in the spool (``url`` None), or the PostgreSQL database ``url`` names."""
    if url is None:
        from .queue_sqlite import SqliteQueue

        return SqliteQueue(spool_root, node, lease_s)
    if urlsplit(url).scheme in ("postgresql", "postgres"):
        from .queue_postgres import PostgresQueue

        return PostgresQueue(url, node, lease_s)
    raise InputError(f"--queue {redact(url)}: give a postgresql://USER@HOST/DATABASE URL (or no --queue: SQLite "
                     f"in the spool).")


def safe_name(node: str) -> str:
    """A node's name as a file name (its own folders and audit file in a shared spool)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", node)[:100] or "node"


class Spool:
    """The spool folder and its queue; safe to use from several threads of one process.

    The queue's operations (``claim``, ``job``, ``next_delivery`` ...) are the spool's too, so a caller
    holding the spool reaches them as before the queue had backends.
    """

    def __init__(self, root: str | Path, queue: str | None = None, node: str | None = None,
                 lease_s: float = DEFAULT_LEASE_S):
        self.root = Path(root)
        node = node or default_node_name()
        own = safe_name(node) if queue is not None else None  # PostgreSQL: other nodes may serve from this folder
        for sub in ("incoming", "studies", "jobs", "tmp", "node.sqlite", "audit.jsonl", "node.pid"):
            if (self.root / sub).is_symlink():  # the node would write patient data wherever it points
                raise OutputError(f"Spool folder {self.root}: {sub} is a symbolic link; the spool must hold its own "
                                  f"folders and files. Remove the link or give another spool.")
        self.incoming_dir = self.root / "incoming" / own if own else self.root / "incoming"
        self._temp_dir = self.root / "tmp" / own if own else self.root / "tmp"
        try:
            for sub in ("incoming", "studies", "jobs", "tmp"):
                (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            for folder in (self.incoming_dir, self._temp_dir):
                folder.mkdir(mode=0o700, exist_ok=True)
            for folder in (self.root, *(self.root / sub for sub in ("incoming", "studies", "jobs", "tmp"))):
                os.chmod(folder, 0o700)  # patient images: the node's user only
        except OSError as exc:
            raise OutputError(f"Spool folder {self.root}: cannot be created ({exc.strerror}).") from exc
        self.queue_backend: JobQueue = open_queue(queue, self.root, node, lease_s)
        self.db_path = self.root / "node.sqlite"
        self.audit_path = self.root / (f"audit-{own}.jsonl" if own else "audit.jsonl")

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "queue_backend":
            raise AttributeError(name)
        return getattr(self.queue_backend, name)

    def queue(self, study_uid: str, plain: str, contrast: str | None, tasks: tuple[str, ...], notes: str) -> bool:
        """received -> queued with the chosen series; False when an instance arrived meanwhile."""
        return self.queue_backend.queue(study_uid, plain, contrast, tasks, notes)

    def close(self) -> None:
        self.queue_backend.close()

    # ---------------------------------------------------------------- receiving

    def free_mb(self) -> float:
        """Free space on the spool's disk, in MB (for the watermark below which C-STOREs are refused)."""
        return shutil.disk_usage(self.root).free / 1e6

    @property
    def temp_dir(self) -> Path:
        """The node's temporary folder (worker run folders, data sets being received), emptied at start."""
        return self._temp_dir

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
        for path in self.incoming_dir.iterdir():
            if path.is_file() or path.is_symlink():  # another node's folder (a shared spool) is not this node's
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
        fd, tmp = tempfile.mkstemp(prefix=".recv-", suffix=".dcm", dir=self.incoming_dir)
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
        return self.queue_backend.record_instance(inst, str(target), case_id_for(inst.study_uid),
                                                  time.time() if now is None else now)

    def purge(self, keep_days: float, now: float | None = None) -> list[str]:
        """Delete the images and outputs of studies sent or failed more than ``keep_days`` ago; returns their UIDs.

        The job row and its deliveries stay (the queue's history, no pixel data); images of a purged
        study that arrive again are new to the spool and reopen it.
        """
        limit = (time.time() if now is None else now) - keep_days * 86400
        rows = self.queue_backend.purgeable(limit)
        for row in rows:  # the rows first: a crash in between leaves files, never rows without files
            self.queue_backend.forget_images(row["study_uid"])
            shutil.rmtree(self.root / "studies" / row["study_uid"], ignore_errors=True)
            shutil.rmtree(self.root / "jobs" / row["case_id"], ignore_errors=True)
        return [r["study_uid"] for r in rows]

    def series_folder(self, study_uid: str, series_uid: str) -> Path:
        return self.root / "studies" / study_uid / series_uid
