"""The worker process: runs one pipeline request and speaks JSON lines on stdout.

    python -m SegRapSegmenterLib.worker --request REQUEST.json

Events, one JSON object per line: ``{"event": "start", ...}``, ``{"event": "progress", "stage": ...,
"fraction": ..., "message": ...}``, ``{"event": "warning", "message": ...}``, then exactly one of
``{"event": "done", "outputs": {...}, "warnings": [...]}``, ``{"event": "error", "kind": ...,
"message": ...}`` or ``{"event": "cancelled"}``. Logs go to stderr. SIGTERM and SIGINT stop the run
at the next Python instruction, remove the staging folder and exit with 130; nothing is left in the
output folder. With ``--stop-on-stdin-eof`` (how ``runner.WorkerRun`` starts it) the end of stdin does
the same, on every OS: the runner closes it to cancel (Windows has no SIGTERM to send), and it ends
by itself when the caller dies, so a crashed Slicer or a killed CLI leaves no worker on the GPU.
The CLI and the Slicer module both start this same worker.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from .errors import EXIT_ERROR, EXIT_INTERRUPTED, exit_code_of_kind


class _Emitter:
    """Writes one JSON object per line to the real stdout, whatever libraries do to sys.stdout."""

    def __init__(self) -> None:
        self._out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        self._lock = threading.Lock()

    def __call__(self, event: str, **fields) -> None:
        with self._lock:
            self._out.write(json.dumps({"event": event, **fields}) + "\n")
            self._out.flush()


_STDIN_CLOSED = threading.Event()  # set by the stdin watcher just before it interrupts the main thread
_FINISHING = threading.Event()  # set once the run is over: a late end of stdin no longer interrupts


_CANCELLING = threading.Event()  # set by the first stop request: a second one must not break off its clean-up


def _raise_cancelled(signum, frame):  # noqa: ARG001 - signal handler signature
    from .errors import Cancelled

    if _CANCELLING.is_set():  # the runner closes stdin and sends SIGTERM: both arrive, one stops the run
        return
    _CANCELLING.set()
    if _STDIN_CLOSED.is_set():
        raise Cancelled("stopped: the caller closed the worker's input (cancelled, or the caller ended)")
    raise Cancelled(f"stopped by signal {signal.Signals(signum).name}")


def _stop_on_stdin_eof() -> None:
    """Watch stdin on a thread; at its end, stop the main thread as SIGTERM would (works on every OS)."""
    import _thread

    fd = sys.stdin.fileno()

    def watch() -> None:
        try:  # the file descriptor, not sys.stdin: a thread blocked in a buffered read aborts the interpreter's exit
            while os.read(fd, 4096):
                pass
        except OSError:
            pass
        if not _FINISHING.is_set():
            _STDIN_CLOSED.set()
            _thread.interrupt_main(signal.SIGTERM)

    threading.Thread(target=watch, name="segrap-stdin-watch", daemon=True).start()


def run_request(request_path: Path, stop_on_stdin_eof: bool = False) -> int:
    """Run the request in ``request_path``; returns the exit code (errors.exit_code_of_kind of the error it reports)."""
    emit = _Emitter()
    # stdout belongs to the protocol: everything else printed (nnU-Net, tqdm) goes to stderr
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    signal.signal(signal.SIGTERM, _raise_cancelled)
    signal.signal(signal.SIGINT, _raise_cancelled)
    if stop_on_stdin_eof:
        _stop_on_stdin_eof()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    from .errors import Cancelled, SegRapError
    from .pipeline import SegmentRequest, request_case_id, request_paths, reuse_freed_memory, run

    if os.environ.get("SEGRAP_REUSE_FREED_MEMORY", "1") != "0":  # 0: glibc's defaults, for comparisons
        reuse_freed_memory()

    staging = None
    try:
        try:
            data = json.loads(Path(request_path).read_text())
            req = SegmentRequest.from_json(data)
        except (OSError, ValueError, TypeError) as exc:
            emit("error", kind="InputError", message=f"{request_path}: not a valid request ({exc}).")
            return 3
        # a plain case id and a staging folder inside the output folder, or an InputError: the
        # staging folder is deleted at the end, so it must be ours before it is remembered
        case_id, staging = request_paths(req)
        emit("start", pid=os.getpid(), case_id=request_case_id(req, case_id), request=data)
        result = run(req,
                     progress=lambda stage, fraction, message: emit("progress", stage=stage,
                                                                    fraction=round(float(fraction), 4),
                                                                    message=message),
                     warn=lambda message: emit("warning", message=message))
        _FINISHING.set()
        emit("done", case_id=result.case_id, outputs=result.outputs, warnings=result.warnings, review=result.review,
             flagged=result.flagged)
        return 0
    except Cancelled as exc:
        emit("cancelled", message=str(exc))
        return EXIT_INTERRUPTED
    except SegRapError as exc:
        kind = type(exc).__name__
        emit("error", kind=kind, message=str(exc))
        return exit_code_of_kind(kind)
    except MemoryError:
        emit("error", kind="MemoryError", message="Out of memory. Try --device cpu with fewer --threads, "
                                                  "or a machine with more memory.")
        return EXIT_ERROR
    except Exception as exc:  # an internal bug: report it fully rather than die silently
        emit("error", kind="InternalError", message=f"{type(exc).__name__}: {exc}",
             traceback=traceback.format_exc())
        return EXIT_ERROR
    finally:
        _FINISHING.set()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if staging is not None and staging.exists():
            import shutil

            shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m SegRapSegmenterLib.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--request", required=True, type=Path, help="JSON file of a pipeline.SegmentRequest")
    parser.add_argument("--stop-on-stdin-eof", action="store_true",
                        help="stop the run (as SIGTERM does) when stdin ends: the caller cancelled or went away")
    args = parser.parse_args(argv)
    return run_request(args.request, stop_on_stdin_eof=args.stop_on_stdin_eof)


if __name__ == "__main__":
    sys.exit(main())
