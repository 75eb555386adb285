"""The panel's long operations as background tasks: one at a time, with progress and Cancel, one message per failure.

Qt-free: the panel (``widget``) hands in a scheduler (a qt timer that polls the task on the GUI
thread) and a ``TaskView`` of callbacks into its widgets; scripts and tests hand in their own.
The calls built here read what only the GUI thread may read (Slicer's startup environment, the
process environment) when they are built, and do the slow part later on the task's thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Cancelled
from .background import BackgroundTask

log = logging.getLogger(__name__)

Scheduler = Callable[[Callable[[], bool]], object]  # arranges for poll() to be called until it returns False


@dataclass
class TaskView:
    """What a running task shows in the panel."""

    status: Callable[[str], None]  # the status line
    progress: Callable[["float | None"], None]  # the progress bar: a fraction, or None for busy
    busy: Callable[[bool], None]  # True while a task runs: Apply reads Cancel, the other actions are disabled
    error: Callable[[str], None]  # one error dialog


class PanelTasks:
    """Runs one ``BackgroundTask`` at a time for the panel and finishes it on the polling (GUI) thread."""

    def __init__(self, view: TaskView, scheduler: Scheduler, other_work: Callable[[], "str | None"] = lambda: None):
        """``other_work()`` names work that owns the progress bar and Cancel besides these tasks (the segmentation)."""
        self.view = view
        self.scheduler = scheduler
        self.other_work = other_work
        self.current: BackgroundTask | None = None

    @property
    def busy(self) -> bool:
        return self.current is not None

    def start(self, name: str, call: Callable[..., Any], message: str,
              done: Callable[[Any], None] | None = None, *, controllable: bool = False) -> BackgroundTask | None:
        """Run ``call`` off the GUI thread; ``done(result)`` on the GUI thread when it succeeded.

        A failure (the call's or ``done``'s) is shown once through ``view.error``; a cancelled task
        only says so in the status line. ``controllable``: the call takes ``report`` and ``should_stop``.
        Refused (None, with a message) while another task runs.
        """
        running = f"task ({self.current.name})" if self.current is not None else self.other_work()
        if running:  # one thing at a time owns the progress bar and Cancel
            self.view.error(f"Wait for the running {running} or cancel it first.")
            return None
        task = BackgroundTask(name, call, done=self._finisher(message, done), progress=self._progress,
                              passes_control=controllable)
        self.current = task
        self.view.status(message)
        self.view.progress(None)
        self.view.busy(True)
        task.start()
        task.scheduler_handle = self.scheduler(task.poll)
        return task

    def cancel(self) -> None:
        """Stop the running task (a call that cannot stop early runs out on its thread, its result dropped)."""
        if self.current is not None:
            self.current.cancel()
            self.current.poll()  # finishes it at once for the panel

    def _progress(self, message: str, fraction: float | None) -> None:
        self.view.status(message)
        self.view.progress(fraction)

    def _finisher(self, message: str, done: Callable[[Any], None] | None) -> Callable[[BackgroundTask], None]:
        def finished(task: BackgroundTask) -> None:
            self.current = None
            self.view.progress(0.0)
            self.view.busy(False)
            if task.cancelled or isinstance(task.error, Cancelled):
                self.view.status(f"Cancelled: {message}")
                return
            if task.error is not None:
                log.error("SegRapSegmenter: %s failed: %s", task.name, task.error)
                self.view.status(f"Failed: {message}")
                self.view.error(str(task.error))
                return
            self.view.status("")
            if done is None:
                return
            try:
                done(task.result)
            except Exception as exc:  # noqa: BLE001 - shown once, never lost in a timer callback
                log.exception("SegRapSegmenter")
                self.view.error(str(exc))

        return finished


def probe_call(python: str) -> Callable[[], Any]:
    """The probe of ``python`` for a background task; Slicer's startup environment is read now, on this (GUI) thread."""
    from .dependencies import probe_python, startup_environment

    env = startup_environment()
    env = dict(env) if env is not None else dict(os.environ)
    return lambda: probe_python(python, startup_env=env)


def install_call(plan, python: str, work_dir: str | Path) -> Callable[..., list[str]]:
    """The install of ``plan`` into Slicer's Python (``python``: PythonSlicer) for a controllable background task.

    The environment is copied now: PythonSlicer is started from Slicer's current one, as
    ``slicer.util.pip_install`` does (``launchConsoleProcess(..., useStartupEnvironment=False)``).
    The call returns the import names still missing afterwards.
    """
    from .dependencies import run_install

    env = dict(os.environ)

    def install(report=None, should_stop=None) -> list[str]:
        return run_install(plan, python, work_dir, env, report=report, should_stop=should_stop)

    return install
