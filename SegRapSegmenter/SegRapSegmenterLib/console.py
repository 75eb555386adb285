"""What the terminal shows while a worker runs: a one-line progress bar, or stage lines when not a terminal.

Shared by the ``segrap`` command and ``segrap demo``; it knows the worker's JSON-lines events and nothing else.
"""

from __future__ import annotations

import sys


class ProgressPrinter:
    """A one-line progress bar on a terminal, stage lines elsewhere; warnings always on their own line."""

    def __init__(self, label: str):
        self.label = label
        self.tty = sys.stderr.isatty()
        self.last_stage = None

    def __call__(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "progress":
            fraction = float(event.get("fraction", 0.0))
            if self.tty:
                bar = "#" * int(30 * fraction)
                sys.stderr.write(f"\r{self.label} [{bar:<30}] {fraction:4.0%} {event.get('message', '')[:60]:<60}")
                sys.stderr.flush()
            elif event.get("stage") != self.last_stage:
                print(f"{self.label}: {event.get('message', '')}", file=sys.stderr)
            self.last_stage = event.get("stage")
        elif kind == "warning":
            print(("\n" if self.tty else "") + f"{self.label}: warning: {event.get('message')}", file=sys.stderr)
        elif kind in ("done", "error", "cancelled") and self.tty:
            sys.stderr.write("\n")
