"""Starting, following and stopping the worker process: the one client the CLI and the Slicer module share.

Inference always runs in its own process so that a crash, an out-of-memory kill or a cancel never
takes the caller down. The worker runs in its own process group; cancel stops the group (the
worker and anything it started) and removes the staging folder, so a killed run leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import WorkerError
from .pipeline import SegmentRequest, request_paths

PACKAGE_PARENT = Path(__file__).resolve().parent.parent


@dataclass
class WorkerOutcome:
    """How a worker run ended: its final event and exit code."""

    returncode: int
    final: dict  # the done / error / cancelled event
    warnings: list[str] = field(default_factory=list)
    log_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.final.get("event") == "done" and self.returncode == 0


class WorkerRun:
    """One worker process for one request."""

    def __init__(self, request: SegmentRequest, python: str | None = None, env: dict[str, str] | None = None):
        self.request = request
        self.python = python or sys.executable
        self.env = dict(env or {})  # extra environment of the worker (e.g. the node pins one GPU per worker)
        request.staging_dir = str(request_paths(request)[1])  # checked: cancel deletes it
        self._tmp = Path(tempfile.mkdtemp(prefix="segrap-run-"))
        self.log_path = self._tmp / "worker.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "WorkerRun":
        """Start the worker (non-blocking)."""
        request_path = self._tmp / "request.json"
        request_path.write_text(json.dumps(asdict(self.request)))
        env = dict(os.environ) | self.env
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [self.python, "-m", "SegRapSegmenterLib.worker", "--request", str(request_path)],
            stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL, text=True, env=env,
            start_new_session=True)
        return self

    def events(self) -> Iterator[dict]:
        """The worker's events as they arrive; non-JSON lines become ``{"event": "log"}``."""
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield {"event": "log", "message": line}

    def cancel(self, grace_s: float = 10.0) -> None:
        """Stop the worker and its children (SIGTERM, then SIGKILL after ``grace_s``) and clean up."""
        if self.process is None or self.process.poll() is not None:
            self._cleanup_staging()
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass
        self._cleanup_staging()

    def _cleanup_staging(self) -> None:
        if self.request.staging_dir:
            shutil.rmtree(self.request.staging_dir, ignore_errors=True)

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait(self, on_event: Callable[[dict], None] | None = None) -> WorkerOutcome:
        """Follow the run to its end, passing every event to ``on_event``; a dead worker is a WorkerError."""
        if self.process is None:
            self.start()
        final: dict | None = None
        warnings: list[str] = []
        try:
            for event in self.events():
                if on_event:
                    on_event(event)
                if event.get("event") == "warning":
                    warnings.append(event.get("message", ""))
                if event.get("event") in ("done", "error", "cancelled"):
                    final = event
            returncode = self.process.wait()
        except BaseException:
            self.cancel()
            raise
        finally:
            self._log.close()
        tail = self.log_tail()
        if final is None:
            self._cleanup_staging()
            shutil.rmtree(self._tmp, ignore_errors=True)
            how = f"killed by signal {signal.Signals(-returncode).name}" if returncode < 0 else f"exit code {returncode}"
            hint = " (out of memory?)" if returncode == -signal.SIGKILL else ""
            raise WorkerError(f"The segmentation worker died ({how}){hint} before finishing; no output was written. "
                              f"Last log lines:\n{tail}")
        shutil.rmtree(self._tmp, ignore_errors=True)
        return WorkerOutcome(returncode, final, warnings, tail)
