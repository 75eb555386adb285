"""The node's audit log: one JSON object per line (time, event, UIDs, AE titles, timings), never patient data.

The log is rotated by size: before a line would take ``audit.jsonl`` over ``max_bytes``, the file is
renamed to ``audit.jsonl.<UTC time>-<pid>`` (names that sort in time order) and the oldest rotated
files beyond ``keep`` are deleted. Each line is one ``write`` to the file opened for appending, so a
line is never split between files or mixed with another process's line (a process that opened the
file just before another rotated it adds its line to the rotated file, whose size may then pass the
limit by that line); readers (``read_events``, ``last_event``) take the rotated files too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

MAX_MB = 64.0  # audit.jsonl is rotated before it grows past this
KEEP = 10  # rotated files kept (the oldest are deleted)
_ROTATED = re.compile(r"\d{8}T\d{12}Z-\d+")  # the suffix of a rotated file: its UTC time and the rotating pid


def rotated_files(path: str | Path) -> list[Path]:
    """The rotated files of an audit log, oldest first."""
    path = Path(path)
    try:
        names = [p for p in path.parent.iterdir() if p.name.startswith(path.name + ".")
                 and _ROTATED.fullmatch(p.name[len(path.name) + 1:]) and p.is_file() and not p.is_symlink()]
    except FileNotFoundError:
        return []
    return sorted(names, key=lambda p: p.name)


class AuditLog:
    """Appends events to ``path``; every line is flushed to disk before ``write`` returns.

    Nodes sharing a spool each write their own file (``audit-<node>.jsonl``, see ``spool``): O_APPEND
    is atomic between processes of one machine, but not between machines on NFS.
    """

    def __init__(self, path: str | Path, echo=None, max_mb: float = MAX_MB, keep: int = KEEP):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._echo = echo  # optional callable(str) for the terminal
        self.max_bytes = int(max_mb * 1e6)  # 0: never rotated here (journald, or logrotate renaming the file)
        self.keep = keep

    def _rotate_for(self, size: int) -> None:
        """Rename the log aside when ``size`` more bytes would take it over the limit; delete beyond ``keep``.

        Another process may rotate at the same moment: the file is locked first (POSIX flock) and renamed
        only while the path still names it, so a file is rotated once and the rotated names sort in order.
        A rotation that fails is a warning on stderr: the line is still written, to the unrotated file.
        """
        if not self.max_bytes:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # no log yet (or unreadable: the write says so)
        windows = os.name == "nt"  # no flock, and an open file cannot be renamed there: renamed after closing
        try:
            if not windows:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX)
            current = os.fstat(fd)
            if current.st_size == 0 or current.st_size + size <= self.max_bytes:
                return
            if os.stat(self.path).st_ino != current.st_ino:
                return  # another process rotated it while we waited
            if not windows:
                os.rename(self.path, self._rotated_name())
        except OSError as exc:
            log.warning("audit log %s not rotated: %s", self.path, exc)
            return
        finally:
            os.close(fd)  # releases the lock
        try:
            if windows:
                os.rename(self.path, self._rotated_name())
            for old in rotated_files(self.path)[:-self.keep or None]:
                old.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("audit log %s not rotated: %s", self.path, exc)

    def _rotated_name(self) -> Path:
        """``audit.jsonl.<UTC time to the microsecond>Z-<pid>``: names that sort in time order and do not collide."""
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now * 1e6) % 1000000:06d}Z"
        return self.path.with_name(f"{self.path.name}.{stamp}-{os.getpid()}")

    def write(self, event: str, **fields) -> dict:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z",
                  "event": event, **{k: v for k, v in fields.items() if v is not None}}
        line = json.dumps(record, default=str)
        data = (line + "\n").encode("utf-8")
        with self._lock:
            try:
                self._rotate_for(len(data))
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    written = os.write(fd, data)  # one write: the line lands whole, at the end of the file
                    if written != len(data):
                        raise OSError(28, f"only {written} of {len(data)} bytes written")
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:  # a full disk must not turn an audit line into a crash: say it on stderr
                log.error("audit log %s not written (%s): %s", self.path, exc.strerror or exc, line)
        if self._echo:
            self._echo(line)
        return record


def _parse(text: str) -> list[dict]:
    events = []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # e.g. a line cut by a crash
            continue
    return events


def read_events(path: str | Path) -> list[dict]:
    """Every event of an audit log, its rotated files first (lines that are not JSON, e.g. cut by a crash, skipped)."""
    events = []
    for file in [*rotated_files(path), Path(path)]:
        try:
            events += _parse(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue
    return events


def tail_events(path: str | Path, tail_bytes: int = 65536) -> list[dict]:
    """The events in the last ``tail_bytes`` of the newest file of an audit log that has any (not the whole log,
    which grows for months); the first line of the tail may be cut and is skipped."""
    for file in [Path(path), *reversed(rotated_files(path))]:
        try:
            with open(file, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
                events = _parse(f.read().decode("utf-8", errors="replace"))
        except FileNotFoundError:
            continue
        if events:
            return events
    return []


def last_event(path: str | Path) -> dict | None:
    """The latest event of an audit log (reads the end of the newest file that has one, not the whole log)."""
    events = tail_events(path)
    return events[-1] if events else None
