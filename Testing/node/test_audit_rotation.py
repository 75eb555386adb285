"""The audit log is rotated by size, no line lost or split, and its readers (``--status``) see the rotated files."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

from SegRapSegmenterLib.node.audit import AuditLog, last_event, read_events, rotated_files

WRITER = """
import sys, threading
from SegRapSegmenterLib.node.audit import AuditLog
log = AuditLog(sys.argv[1], max_mb=0.004, keep=1000)
def write(thread):
    for i in range(60):
        log.write("tick", writer=f"{sys.argv[2]}-{thread}", seq=i, padding="x" * (i % 7) * 40)
threads = [threading.Thread(target=write, args=(t,)) for t in range(3)]
for t in threads: t.start()
for t in threads: t.join()
"""


def test_two_processes_writing_and_rotating_at_once_lose_and_split_no_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name]) for name in ("a", "b")]
    assert [w.wait(120) for w in writers] == [0, 0]
    files = [*rotated_files(path), path]
    assert len(files) > 10  # 360 lines of 100-360 bytes, at most 4000 bytes a file
    lines = [line for f in files for line in f.read_text().splitlines()]
    assert all(f.stat().st_size <= 4000 + 2 * 400 for f in files)  # a line another writer had begun may pass it
    events = [json.loads(line) for line in lines]  # every line whole JSON: none split across files
    assert events == read_events(path)
    for writer in (f"{p}-{t}" for p in "ab" for t in range(3)):  # each writer's lines all there, in order
        assert [e["seq"] for e in events if e["writer"] == writer] == list(range(60))


def test_rotation_keeps_audit_keep_files_and_status_reads_the_last_event_across_them(tmp_path):
    from SegRapSegmenterLib.node.service import status_text
    from SegRapSegmenterLib.node.spool import Spool

    Spool(tmp_path / "spool").close()
    audit = tmp_path / "spool" / "audit.jsonl"
    log = AuditLog(audit, max_mb=0.001, keep=3)
    for i in range(100):
        log.write("tick", seq=i)
    assert len(rotated_files(audit)) == 3 and audit.stat().st_size <= 1000
    assert [e["seq"] for e in read_events(audit)][-1] == 99 and last_event(audit)["seq"] == 99
    assert all(oct(f.stat().st_mode & 0o777) == "0o600" for f in [audit, *rotated_files(audit)])
    audit.rename(audit.with_name("moved-by-an-operator"))  # the current file gone: the newest rotated one
    last = read_events(rotated_files(audit)[-1])[-1]
    assert last_event(audit) == last
    assert f"last event 'tick' at {last['time']}" in status_text(tmp_path / "spool")
    unrotated = AuditLog(audit, max_mb=0)  # journald or logrotate instead
    threads = [threading.Thread(target=lambda: [unrotated.write("tick") for _ in range(50)]) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(rotated_files(audit)) == 3 and len(audit.read_text().splitlines()) == 100
