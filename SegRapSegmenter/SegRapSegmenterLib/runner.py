"""Starting, following and stopping the worker process: the one client the CLI and the Slicer module share.

Inference always runs in its own process so that a crash, an out-of-memory kill or a cancel never
takes the caller down. The same code runs on Windows, macOS and Linux:

- the worker gets a process group of its own (a new session on POSIX; a new process group and no
  console window on Windows), so a Ctrl-C or a closed terminal reaches the caller, which decides;
- cancel stops the worker's whole process tree, found with psutil: the Python it was started with
  (Slicer's ``PythonSlicer`` is a launcher that runs the real interpreter as its child), the worker
  and whatever they started. It asks first (the worker's stdin is closed, and on POSIX SIGTERM is
  sent: the worker stops at its next Python instruction and removes its staging folder), then
  kills what is still alive after a grace period. No POSIX-only name is used;
- a worker that ends without a final event is reported with the end of its log, on every OS;
- the worker starts in a private temp folder with the current folder off its import path
  (``PYTHONSAFEPATH`` on 3.11+, a one-line bootstrap on 3.10), so a ``SimpleITK.py`` where the
  caller stands is never imported; request paths are made absolute first;
- another interpreter than this one starts in the caller's startup environment (Slicer's, from
  ``slicer.util.startupEnvironment()``, which the Slicer bridge passes in) without the variables
  that tie a Python to its own installation (PYTHONHOME, PYTHONPATH, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .errors import Cancelled, InputError, WorkerError

# psutil is imported where used: the probe in Slicer (slicer_bridge.dependencies) uses the process
# helpers below before it may be installed. Nothing here imports numpy, SimpleITK or torch: the
# CLI's process, which only starts and follows the worker, stays small.

# --------------------------------------------------------------------------------------------
# The request: what a worker runs, as plain values that travel as JSON, and the checks of its names
# --------------------------------------------------------------------------------------------

TASKS = ("oar", "gtv")


@dataclass
class SegmentRequest:
    """Everything a run needs; plain values so it travels to the worker as JSON."""

    ct: str | None
    out_dir: str
    contrast_ct: str | None = None
    case_id: str | None = None
    bundle: str | None = None
    tasks: tuple[str, ...] = TASKS
    structures: tuple[str, ...] | None = None
    device: str = "auto"
    folds: tuple[str, ...] | None = None
    mirror: bool | None = None
    tile_step_size: float = 0.5
    threads: int | None = None
    low_memory: bool = False
    register: bool = False
    ct_series: str | None = None
    contrast_series: str | None = None
    nifti: bool = False
    rtstruct: bool = False
    roi_names: str = "tg263"
    contour_holes: str = "keyhole"  # RTSTRUCT hole encoding: keyhole or xor (PS3.3 C.8.8.6.3)
    keep_largest_component: bool = True
    fill_holes: bool = False
    staging_dir: str | None = None  # chosen by the caller, so it can clean up after a killed worker
    identity: dict | None = None  # the inputs' identity as the caller checked it, for image files it wrote itself
    # the DICOM files behind image inputs the caller wrote (Slicer: what its DICOM database names for each volume):
    # {"ct"/"contrast_ct": {"label": "volume 'CT'", "files": [...]} or None}; the worker reads their headers
    identity_files: dict | None = None
    patient_values_in_errors: bool = True  # False: an error naming two patients does not quote their values (node)

    @classmethod
    def from_json(cls, data: dict) -> SegmentRequest:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("tasks", "structures", "folds"):
            if known.get(key) is not None:
                known[key] = tuple(str(v) for v in known[key])
        return cls(**known)


def default_case_id(path: str | Path) -> str:
    """A case id from an input path: the file name without image suffixes, or the folder name."""
    p = Path(path)
    name = p.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name in ("image", "image_contrast", "ct", "CT") and p.parent.name:
        name = p.parent.name
    return name or "case"


STAGING_PREFIX = ".segrap-partial-"


def check_case_id(case_id: str, where: str = "case id") -> str:
    """A case id as a plain name (it names files inside the output folder), or an InputError naming it.

    Refused: path separators, '.' and '..', a leading dot (hidden files and the staging folders),
    drive or stream colons, control characters, surrounding spaces and names over 200 characters.
    Every caller (CLI, batch mode, worker, Slicer logic, DICOM node) checks ids here.
    """
    text = str(case_id)
    if (not text or text.startswith(".") or text != text.strip() or len(text) > 200
            or any(c in text for c in "/\\:") or any(ord(c) < 32 for c in text)):
        raise InputError(f"{where} {text!r} is not a plain name: a case id names files inside the output folder, so "
                         f"it may not hold '/', '\\', ':' or control characters, start with '.', or be '..'.")
    return text


def staging_path(out_dir: str | Path, case_id: str) -> Path:
    """A staging folder of its own for one run of ``case_id``, which writes there before moving its outputs into place.

    The name is unique per run (process id and a random part), so two runs never share one.
    """
    return Path(out_dir) / f"{STAGING_PREFIX}{check_case_id(case_id)}.{os.getpid()}-{secrets.token_hex(4)}"


def is_staging_of(name: str, case_id: str) -> bool:
    """Whether a folder name is a staging folder of ``case_id`` (and not of a case whose id starts the same)."""
    return re.fullmatch(re.escape(f"{STAGING_PREFIX}{case_id}") + r"(\.\d+-[0-9a-f]{8})?", name) is not None


# --------------------------------------------------------------------------------------------
# The case lock: one run at a time writes a case into an output folder
# --------------------------------------------------------------------------------------------

LOCK_PREFIX = ".segrap-lock-"
_WINDOWS_LOCK_OFFSET = 1 << 20  # the byte locked on Windows, past the holder's note, which stays readable


@dataclass
class CaseLock:
    """A held case lock: its file, the open descriptor that holds it, and the folders the run created for it."""

    path: Path
    fd: int
    created: list[str]  # folders made for the output folder, innermost first (removed again when left empty)


def case_lock_path(out_dir: str | Path, case_id: str) -> Path:
    """The lock file of a case in an output folder (a hidden name no case id can take)."""
    return Path(out_dir) / f"{LOCK_PREFIX}{check_case_id(case_id)}"


def _try_lock(fd: int) -> bool:
    """Take the operating system's exclusive lock on an open file without waiting; False when another holds it.

    The system drops the lock when the holder's process ends however it ends, so a killed run
    leaves no lock that blocks the next one (POSIX flock; on Windows a byte-range lock).
    """
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 65536).decode("utf-8") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _make_out_dir(out_dir: Path) -> list[str]:
    """Create the output folder; the folders made, innermost first."""
    missing = []
    folder = out_dir
    while not folder.exists() and folder != folder.parent:
        missing.append(str(folder))
        folder = folder.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_if_empty(folders: list[str]) -> None:
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return


def acquire_case_lock(out_dir: str | Path, case_id: str, staging: str | Path) -> CaseLock:
    """Lock ``case_id`` in ``out_dir`` for this run, or a CaseBusyError naming the run that holds it.

    The output folder is created here (the lock lives in it); ``release_case_lock`` removes it
    again when the run failed and left it empty.
    """
    from .errors import CaseBusyError, OutputError

    out_dir = Path(out_dir)
    try:
        created = _make_out_dir(out_dir)
    except OSError as exc:
        raise OutputError(f"Output folder {out_dir}: cannot be created ({exc.strerror}); choose another --out.") from exc
    path = case_lock_path(out_dir, case_id)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            _remove_if_empty(created)
            raise OutputError(f"Output folder {out_dir}: cannot write its lock file ({exc.strerror}).") from exc
        if not _try_lock(fd):
            holder = _holder(fd)
            os.close(fd)
            _remove_if_empty(created)
            who = (f"process {holder.get('pid')} on {holder.get('host')}, started {holder.get('started_utc')}"
                   if holder else "another process")
            raise CaseBusyError(f"Output folder {out_dir}: case {case_id} is being written by another run ({who}; "
                                f"lock {path.name}). Nothing was changed. Wait for that run to end, or choose "
                                f"another --out or --case-id.")
        try:  # a holder that removed the file as we opened it: lock the file that is there now
            same = os.name == "nt" or os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    note = {"pid": os.getpid(), "host": platform.node(), "case_id": case_id, "staging": str(staging),
            "created": created, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(note).encode("utf-8"))
    return CaseLock(path, fd, created)


def release_case_lock(lock: CaseLock, succeeded: bool) -> None:
    """Remove the lock file and let the lock go; after a failure, also the output folders the run made, if empty."""
    if os.name == "nt":
        import msvcrt

        with contextlib.suppress(OSError):  # the C runtime asks for an unlock before the close
            os.lseek(lock.fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(lock.fd, msvcrt.LK_UNLCK, 1)
        os.close(lock.fd)  # Windows cannot remove an open file
        with contextlib.suppress(OSError):
            lock.path.unlink()
    else:
        with contextlib.suppress(OSError):
            lock.path.unlink()  # while still locked: a waiting run then locks a file of its own
        os.close(lock.fd)
    if not succeeded:
        _remove_if_empty(lock.created)


def clear_abandoned_lock(out_dir: str | Path, staging: str | Path) -> None:
    """After a worker was killed: remove the lock file it left (and the output folder it made, if empty).

    Only a lock nobody holds and whose note names this run's staging folder is touched (the worker
    may have named the case after its DICOM study, which the caller does not know).
    """
    try:
        paths = [p for p in Path(out_dir).iterdir() if p.name.startswith(LOCK_PREFIX)]
    except OSError:
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        if not _try_lock(fd):
            os.close(fd)
            continue
        holder = _holder(fd)
        if holder.get("staging") == str(staging):
            release_case_lock(CaseLock(path, fd, [str(f) for f in holder.get("created", [])]), succeeded=False)
            return
        os.close(fd)


def request_paths(req: SegmentRequest) -> tuple[str, Path]:
    """The request's case id and staging folder, checked: the id is a plain name, the staging folder a
    ``.segrap-partial-*`` folder directly inside ``out_dir`` (it is deleted after the run, so it may be nothing else).
    """
    case_id = check_case_id(req.case_id) if req.case_id else check_case_id(
        default_case_id(req.ct or req.contrast_ct or "case"), "the case id taken from the input's name")
    if not req.staging_dir:
        return case_id, staging_path(req.out_dir, case_id)
    staging = Path(req.staging_dir)
    out = Path(req.out_dir)
    inside = os.path.normcase(os.path.abspath(staging.parent)) == os.path.normcase(os.path.abspath(out))
    if not inside or not staging.name.startswith(STAGING_PREFIX) or staging.is_symlink():
        raise InputError(f"staging_dir {req.staging_dir!r} is not a {STAGING_PREFIX}* folder directly inside the "
                         f"output folder {req.out_dir!r}; refused (the staging folder is deleted after the run).")
    return case_id, staging


# --------------------------------------------------------------------------------------------
# The worker process
# --------------------------------------------------------------------------------------------

PACKAGE_PARENT = Path(__file__).resolve().parent.parent
WORKER_MODULE = "SegRapSegmenterLib.worker"
WINDOWS = os.name == "nt"
# Win32 process creation flags (winbase.h); subprocess names them only on Windows
CREATE_NEW_PROCESS_GROUP = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200)
CREATE_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)
# What points an interpreter at one particular installation: Slicer's launcher sets PYTHONHOME,
# PYTHONPATH and PYTHONNOUSERSITE for its own Python (docs/slicer-compatibility.md); another
# interpreter started with them fails before its first line, or imports Slicer's packages.
PYTHON_INSTALLATION_VARIABLES = ("PYTHONHOME", "PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONSTARTUP", "PYTHONEXECUTABLE",
                                 "PYTHONUSERBASE", "PYTHONPLATLIBDIR", "__PYVENV_LAUNCHER__")
# Runs a module as __main__ with no current-folder entry on sys.path: on 3.11+ PYTHONSAFEPATH
# keeps it off, on 3.10 ``-c`` puts '' first and this removes it before anything is imported.
_SAFE_RUN = ("import sys\nif sys.path and sys.path[0] in ('', '.'): del sys.path[0]\n"
             "import runpy\nrunpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")


# -- processes: the same start and stop on every OS -------------------------------------------

def popen_options(windows: bool = WINDOWS) -> dict[str, object]:
    """Popen keywords for a child of its own: a new process group without a console window on Windows, a new session on POSIX."""
    if windows:
        return {"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW}
    return {"start_new_session": True}


def same_python(python: str) -> bool:
    """True when ``python`` is this interpreter (inside Slicer, ``sys.executable`` is PythonSlicer)."""
    def norm(path: str) -> str:
        return os.path.normcase(os.path.abspath(path))

    return norm(python) == norm(sys.executable)


def python_environment(python: str, startup_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child ``python``: ours for this interpreter; for another one, the startup
    environment (Slicer's before its launcher added its own Python; ours headless) without the
    variables of PYTHON_INSTALLATION_VARIABLES. The current folder stays off its import path."""
    if same_python(python):
        env = dict(os.environ)
    else:
        env = {str(k): str(v) for k, v in (os.environ if startup_env is None else startup_env).items()}
        for key in [k for k in env if k.upper() in PYTHON_INSTALLATION_VARIABLES]:
            del env[key]
    env["PYTHONSAFEPATH"] = "1"
    return env


def safe_module_command(python: str, module: str, *args: str) -> list[str]:
    """The command line that runs ``module`` as a script with ``python``, the current folder off its import path."""
    return [python, "-c", _SAFE_RUN.format(module=module), *args]


def _alive(process) -> bool:
    """True while a psutil process runs (a zombie has ended: only its exit status is left)."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def process_tree(pid: int) -> list:
    """psutil processes of ``pid`` and all its descendants (empty when it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _wait_until_gone(process: subprocess.Popen, others: list, deadline: float) -> list:
    """Wait until ``process`` (ours: reaped here) and ``others`` have ended or ``deadline`` passed; returns those alive."""
    while True:
        process.poll()
        alive = [p for p in others if _alive(p)]
        if (process.returncode is not None and not alive) or time.monotonic() >= deadline:
            return alive + ([] if process.returncode is not None else process_tree(process.pid)[:1])
        time.sleep(0.05)


def stop_process_tree(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop ``process`` and every descendant: ask (stdin closed; SIGTERM on POSIX), kill what is alive after ``grace_s``.

    The tree is listed before anything is asked to stop: once a launcher ends, its children are
    no longer found through it. On Windows psutil's terminate is already a kill, so the polite
    request there is the closed stdin alone (the worker watches it).
    """
    if process.stdin is not None:
        with contextlib.suppress(OSError, ValueError):
            process.stdin.close()
    try:
        import psutil
    except ImportError:  # not yet installed in Slicer: the closed stdin still reaches the worker behind a launcher
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return
    tree = process_tree(process.pid) if process.poll() is None else []  # once reaped, its pid may be another's
    if not WINDOWS:
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.terminate()
    others = [p for p in tree if p.pid != process.pid]
    alive = _wait_until_gone(process, others, time.monotonic() + grace_s)
    if alive:
        found = {p.pid: p for p in alive}
        for p in alive:  # and whatever they started meanwhile
            with contextlib.suppress(psutil.Error):
                found.update({c.pid: c for c in p.children(recursive=True)})
        for p in found.values():
            with contextlib.suppress(psutil.Error):
                p.kill()
        _wait_until_gone(process, [p for p in found.values() if p.pid != process.pid], time.monotonic() + 10.0)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10.0)


def describe_exit(returncode: int) -> str:
    """How a process that sent no final event ended, in words, with a hint where the code says more."""
    if returncode < 0:  # POSIX: killed by a signal
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    if returncode >= 0xC0000000:  # Windows: an NTSTATUS code
        hints = {0xC0000017: " (out of memory)", 0xC000012D: " (out of memory)", 0xC0000005: " (a crash)",
                 0xC00000FD: " (stack overflow)", 0xC000013A: " (interrupted)"}
        return f"exit code {returncode:#010x}" + hints.get(returncode, "")
    return f"exit code {returncode}"


@contextlib.contextmanager
def cancel_on_termination():
    """Within the block, SIGTERM and SIGHUP (where they exist) raise Cancelled in the main thread, so a ``wait``
    in progress stops the worker's tree and removes its temp folders before the caller exits; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    fired: list[int] = []

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        if not fired:  # a second signal must not break off the clean-up the first one started
            fired.append(signum)
            raise Cancelled(f"stopped by {signal.Signals(signum).name}")

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None:
            previous[number] = signal.signal(number, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


# -- the worker run ----------------------------------------------------------------------------

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


def absolute_request(request: SegmentRequest) -> SegmentRequest:
    """``request`` with its paths absolute: the worker runs in a folder of its own."""
    from .inference.bundles import DEMO_BUNDLE_NAME, store_root

    def absolute(path: str | None) -> str | None:
        return os.path.abspath(os.path.expanduser(path)) if path else path

    paths = {key: absolute(getattr(request, key))
             for key in ("ct", "contrast_ct", "out_dir", "ct_series", "contrast_series", "staging_dir")}
    bundle = request.bundle
    if bundle and bundle != DEMO_BUNDLE_NAME and not (store_root() / bundle).is_dir() \
            and Path(bundle).expanduser().is_dir():
        bundle = absolute(bundle)  # a folder the caller named relative to where it stands
    return replace(request, bundle=bundle, **paths)


class WorkerRun:
    """One worker process for one request.

    ``python``: the worker's interpreter (default: this one). ``startup_env``: the environment
    another interpreter starts from (Slicer's startup environment; default: ours). ``grace_s``: how
    long a cancelled worker may take to stop before it is killed. ``env``: extra variables for the worker.
    """

    def __init__(self, request: SegmentRequest, python: str | None = None,
                 startup_env: Mapping[str, str] | None = None, grace_s: float = 10.0,
                 env: Mapping[str, str] | None = None):
        request = absolute_request(request)
        request = replace(request, staging_dir=str(request_paths(request)[1]))  # checked: cancel deletes it
        self.request = request
        self.python = python or sys.executable
        self.startup_env = startup_env
        self.grace_s = grace_s
        self.env = dict(env or {})  # extra environment of the worker (e.g. the node pins one GPU per worker)
        self._tmp = Path(tempfile.mkdtemp(prefix="segrap-run-"))
        self.log_path = self._tmp / "worker.log"
        self.process: subprocess.Popen | None = None
        self._log = None
        self._waiting = False

    def command(self, request_path: Path) -> list[str]:
        """The worker's command line (``python -m SegRapSegmenterLib.worker``, the current folder off sys.path)."""
        return safe_module_command(self.python, WORKER_MODULE, "--request", str(request_path), "--stop-on-stdin-eof")

    def environment(self) -> dict[str, str]:
        """The worker's environment: python_environment, with this package first on its import path."""
        env = python_environment(self.python, self.startup_env) | self.env
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def start(self) -> "WorkerRun":
        """Start the worker (non-blocking), in its temp folder, with its own process group."""
        request_path = self._tmp / "request.json"
        request_path.write_text(json.dumps(asdict(self.request)))
        self._log = open(self.log_path, "w")
        try:
            self.process = subprocess.Popen(
                self.command(request_path), stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.PIPE,
                text=True, env=self.environment(), cwd=self._tmp, **popen_options())
        except BaseException:
            self._log.close()
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
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

    def cancel(self, grace_s: float | None = None) -> None:
        """Stop the worker and everything it started (stop_process_tree) and remove its staging folder."""
        if self.process is not None:
            stop_process_tree(self.process, self.grace_s if grace_s is None else grace_s)
        self._cleanup_staging()
        if not self._waiting:  # else wait() removes the temp folder once it has read the log
            self._remove_tmp()

    def _cleanup_staging(self) -> None:
        if self.request.staging_dir:
            shutil.rmtree(self.request.staging_dir, ignore_errors=True)
            clear_abandoned_lock(self.request.out_dir, self.request.staging_dir)

    def _remove_tmp(self) -> None:
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

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
        self._waiting = True
        try:
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
            if self._log is not None:
                self._log.close()
            tail = self.log_tail()
        finally:
            self._waiting = False
            self._remove_tmp()
        if final is None:
            self._cleanup_staging()
            raise WorkerError(f"The segmentation worker died ({describe_exit(returncode)}) before finishing; no output "
                              f"was written. Last log lines:\n{tail}")
        return WorkerOutcome(returncode, final, warnings, tail)
