"""Run one slow call (probing a Python, downloading a model) off Slicer's GUI thread.

The call runs on a daemon thread; the GUI thread polls ``BackgroundTask.poll`` from a qt timer
(``logic.qt_scheduler``), which hands the latest progress to the caller and, once, the result or
the exception. ``cancel()`` sets the event the call gets as ``should_stop`` and drops the result:
a call that cannot stop early (the probe) runs out on its own thread and is then ignored.
Standard library only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

Progress = Callable[[str, "float | None"], None]  # message, fraction done (None: unknown)


class BackgroundTask:
    """One call on a worker thread: ``start``, then ``poll`` until it returns False."""

    def __init__(self, name: str, call: Callable[..., Any], *, done: Callable[["BackgroundTask"], None] | None = None,
                 progress: Progress | None = None, passes_control: bool = False):
        """``call`` gets ``report(message, fraction)`` and ``should_stop()`` keywords when ``passes_control``."""
        self.name = name
        self._call = call
        self._done = done
        self._progress = progress
        self._passes_control = passes_control
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._latest: tuple[str, float | None] | None = None
        self._thread = threading.Thread(target=self._run, name=f"segrap-{name}", daemon=True)
        self.result: Any = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.finished = False
        self.started = 0.0
        self.scheduler_handle: object = None  # the qt timer polling this task, kept alive with it

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started if self.started else 0.0

    @property
    def running(self) -> bool:
        return self.started > 0 and not self.finished

    def start(self) -> "BackgroundTask":
        self.started = time.monotonic()
        self._thread.start()
        return self

    def _report(self, message: str, fraction: float | None = None) -> None:
        with self._lock:
            self._latest = (message, fraction)

    def _run(self) -> None:
        result, error = None, None
        try:
            if self._passes_control:
                result = self._call(report=self._report, should_stop=self._stop.is_set)
            else:
                result = self._call()
        except BaseException as exc:  # noqa: BLE001 - handed to the GUI thread by poll()
            error = exc
        if not self._stop.is_set():  # a cancelled task's late result is dropped
            self.result, self.error = result, error

    def cancel(self) -> None:
        """Ask the call to stop and forget its result; ``poll`` then finishes the task as cancelled."""
        if not self.finished:
            self.cancelled = True
            self._stop.set()

    def poll(self) -> bool:
        """Pass on the latest progress; finish (call ``done`` once) when the call ended or was cancelled."""
        if self.finished:
            return False
        with self._lock:
            latest, self._latest = self._latest, None
        if latest is not None and self._progress is not None and not self.cancelled:
            self._progress(*latest)
        if self._thread.is_alive() and not self.cancelled:
            return True
        self.finished = True
        if self.cancelled:
            self.result, self.error = None, None
        if self._done is not None:
            self._done(self)
        return False

    def wait(self, timeout_s: float = 60.0, interval_s: float = 0.02) -> None:
        """Poll until finished (scripts and tests)."""
        end = time.monotonic() + timeout_s
        while self.poll():
            if time.monotonic() > end:
                raise TimeoutError(f"{self.name} did not finish within {timeout_s} s")
            time.sleep(interval_s)
