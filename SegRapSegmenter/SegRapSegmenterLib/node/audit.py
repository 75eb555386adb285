"""The node's audit log: one JSON object per line (time, event, UIDs, AE titles, timings), never patient data."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


class AuditLog:
    """Appends events to ``path``; every line is flushed to disk before ``write`` returns.

    Nodes sharing a spool each write their own file (``audit-<node>.jsonl``, see ``spool``): O_APPEND
    is atomic between processes of one machine, but not between machines on NFS.
    """

    def __init__(self, path: str | Path, echo=None):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._echo = echo  # optional callable(str) for the terminal

    def write(self, event: str, **fields) -> dict:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z",
                  "event": event, **{k: v for k, v in fields.items() if v is not None}}
        line = json.dumps(record, default=str)
        data = (line + "\n").encode("utf-8")
        with self._lock:
            try:  # one write() of the whole line with O_APPEND: lines of this process's threads never interleave
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    written = os.write(fd, data)
                    while written < len(data):  # a regular file writes all of it unless the disk is full
                        written += os.write(fd, data[written:])
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:  # a full disk must not turn an audit line into a crash: say it on stderr
                log.error("audit log %s not written (%s): %s", self.path, exc.strerror or exc, line)
        if self._echo:
            self._echo(line)
        return record


def read_events(path: str | Path) -> list[dict]:
    """Every event of an audit log (lines that are not JSON, e.g. cut by a crash, are skipped)."""
    events = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return events
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
