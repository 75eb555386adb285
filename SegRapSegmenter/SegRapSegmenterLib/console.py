"""What the terminal shows while a worker runs: one progress line with the elapsed time, or stage lines when not a
terminal; and the estimate of a stage's remaining time from its measured progress.

Shared by the ``segrap`` command and ``segrap demo``; it knows the worker's JSON-lines events and nothing else.
The pipeline's stages are not equally long (Task 1's sliding window is most of a run), so no overall
percentage is shown: the elapsed time, the stage, and for the sliding windows the time left of that task.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

QUIET_LINE_S = 15.0  # off a terminal, a progress line at least this often while a stage runs


def duration(seconds: float) -> str:
    """Seconds as m:ss (h:mm:ss from an hour)."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class StageEstimate:
    """Time left of a stage from its measured rate: elapsed since its first report x (1 - f) / (f - f_first).

    Nothing is estimated before the stage has moved by 5 % (its first tiles include warm-up).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.start: tuple[float, float] | None = None

    def left_s(self, fraction: float) -> float | None:
        now = self.clock()
        if self.start is None:
            self.start = (now, fraction)
            return None
        t0, f0 = self.start
        if fraction - f0 < 0.05 or fraction >= 1.0:
            return None
        return (now - t0) * (1.0 - fraction) / (fraction - f0)

    def text(self, fraction: float) -> str:
        """``, about 1:05 left of this task`` (empty while there is no estimate yet)."""
        left = self.left_s(fraction)
        return "" if left is None else f", about {duration(left)} left of this task"


class ProgressPrinter:
    """A one-line progress display on a terminal, stage lines elsewhere (with the elapsed time); warnings on lines of
    their own.

    On a terminal the line is redrawn every ``tick_s`` seconds, so the elapsed time runs on through
    stages that report nothing for a while (writing the outputs); ``close`` stops that.
    """

    def __init__(self, label: str, clock: Callable[[], float] = time.monotonic, tty: bool | None = None,
                 tick_s: float = 1.0):
        self.label = label
        self.clock = clock
        self.started = clock()
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.last_stage = None
        self.last_line = self.started
        self.message: str | None = None  # the terminal line's message, redrawn while it is current
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if self.tty and tick_s > 0:
            threading.Thread(target=self._tick, args=(tick_s,), name="segrap-progress", daemon=True).start()

    def _tick(self, tick_s: float) -> None:
        while not self._stop.wait(tick_s):
            self.redraw()

    def redraw(self) -> None:
        """Write the terminal line again with the elapsed time now."""
        with self._lock:
            if self.message is not None and not self._stop.is_set():
                sys.stderr.write(f"\r{self.label} [{duration(self.clock() - self.started)}] {self.message[:90]:<90}")
                sys.stderr.flush()

    def close(self) -> None:
        """Stop redrawing (the run ended, however it ended)."""
        with self._lock:
            self._stop.set()

    def __call__(self, event: dict) -> None:
        kind = event.get("event")
        elapsed = duration(self.clock() - self.started)
        if kind == "progress":
            message = str(event.get("message", ""))
            if self.tty:
                self.message = message
                self.redraw()
            elif event.get("stage") != self.last_stage or self.clock() - self.last_line >= QUIET_LINE_S:
                print(f"{self.label} [{elapsed}]: {message}", file=sys.stderr)
                self.last_line = self.clock()
            self.last_stage = event.get("stage")
        elif kind == "warning":
            with self._lock:
                print(("\n" if self.tty else "") + f"{self.label}: warning: {event.get('message')}", file=sys.stderr)
        elif kind in ("done", "error", "cancelled"):
            self.close()
            if self.tty:
                sys.stderr.write("\n")
            if kind == "done":
                print(f"{self.label}: finished in {elapsed}", file=sys.stderr)
