"""The Slicer module's logic: segment volume nodes with the worker, cancel, export RTSTRUCT, manage model bundles.

Imports ``slicer`` (MRML) but never qt at import time, so it runs headless with slicer-core too.
A run writes the volume nodes to a temp folder, starts the same worker process as the CLI
(``runner.WorkerRun``), reads its JSON-lines events on a thread and hands them to the caller's
thread through ``SegmentationRun.poll``, which is the only place that touches the scene. Who calls
``poll`` is the scheduler's business: a qt timer in Slicer (``qt_scheduler``), a loop for
``wait=True`` (``blocking_scheduler``), or a test. Nothing is added to the scene until the result
is loaded, except the output segmentation node, which is removed again if the run fails or is
cancelled, so a cancelled run leaves the scene as it was.
"""

from __future__ import annotations

import logging
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .. import errors
from ..errors import Cancelled, InputError, SegRapError, WorkerError

if TYPE_CHECKING:
    from ..inference.bundles import Bundle
    from ..node.scu import SendReport
    from ..runner import WorkerOutcome, WorkerRun

# Slicer imports the module file, and so this module, at every start: everything that needs numpy,
# SimpleITK or scipy (the scene glue, the catalogue, the model store, the pipeline and the runner) is
# imported where it is used, so discovery stays light and the module loads (and can offer to install
# what is missing) in a fresh Slicer. Testing/Python/test_startup_imports.py checks it.

log = logging.getLogger(__name__)

Poll = Callable[[], bool]  # True while the run goes on
Scheduler = Callable[[Poll], object]  # arranges for poll() to be called until it returns False; returns a handle
Progress = Callable[[dict], None]  # every worker event: start, progress{stage,fraction,message}, warning, log, ...
RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"


def in_slicer() -> bool:
    """True inside the Slicer application (not with slicer-core alone)."""
    import slicer

    return hasattr(slicer, "app")


def default_python() -> str:
    """The Python the worker runs in: Slicer's ``PythonSlicer`` inside Slicer, else this interpreter."""
    if in_slicer():
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def blocking_scheduler(poll: Poll, interval_s: float = 0.1) -> None:
    """Call ``poll`` until the run ends, on this thread (``wait=True``, scripts and tests)."""
    while poll():
        time.sleep(interval_s)


def qt_scheduler(poll: Poll, interval_ms: int = 200):
    """Call ``poll`` from a qt timer on Slicer's main thread until the run ends; returns the timer."""
    import qt

    timer = qt.QTimer()
    timer.setInterval(interval_ms)

    def tick() -> None:
        if not poll():
            timer.stop()

    timer.connect("timeout()", tick)
    timer.start()
    return timer


def safe_case_id(name: str) -> str:
    """A case id for file names from a node name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name or "").strip("._") or "case"


def _error_from_event(event: dict, log_tail: str) -> SegRapError:
    """The exception a worker's error event stands for (the core's class of the same name where there is one)."""
    kind, message = str(event.get("kind", "")), str(event.get("message", "The worker reported an error."))
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, SegRapError) and cls not in (errors.DecompositionConflictError,):
        return cls(message)
    if kind == "InternalError" and log_tail:
        message = f"{message}\nLast log lines of the worker:\n{log_tail}"
    return WorkerError(f"{kind or 'Error'}: {message}")


# the module's terminology file: Resources/ sits next to SegRapSegmenterLib in the source tree and in the
# installed module folder (SegRapSegmenter/CMakeLists.txt lists both)
TERMINOLOGY_FILE = Path(__file__).resolve().parents[2] / "Resources" / "SegRapSegmenter.term.json"


def register_terminology(path: str | Path = TERMINOLOGY_FILE) -> str:
    """Load the SegRap terminology into Slicer's Terminologies module; returns its context name (Slicer only)."""
    import slicer

    name = slicer.modules.terminologies.logic().LoadTerminologyFromFile(str(path))
    if not name:
        raise RuntimeError(f"Slicer could not load the terminology file {path}.")
    return name


def structure_groups() -> dict[str, list[tuple[str, str]]]:
    """Catalogue structures by region group: {group: [(SegRap name, display name), ...]} (the panel's tree)."""
    from ..anatomy import structures

    groups: dict[str, list[tuple[str, str]]] = {}
    for s in structures.STRUCTURES:
        groups.setdefault(s.group, []).append((s.name, s.display_name))
    return groups


class SegmentationRun:
    """One segmentation in progress: the worker, its event thread, and what to do with the result."""

    def __init__(self, worker: "WorkerRun", workdir: Path, reference_volume, segmentation_node, created_node: bool,
                 progress: Progress | None, finished: Callable[["SegmentationRun"], None] | None, show_3d: bool):
        self.worker = worker
        self.workdir = workdir
        self.reference_volume = reference_volume
        self.segmentation_node = segmentation_node
        self.created_node = created_node
        self.progress = progress
        self.finished = finished
        self.show_3d = show_3d
        self.state = RUNNING
        self.error: BaseException | None = None
        self.warnings: list[str] = []
        self.outputs: dict[str, str] = {}
        self.started = time.monotonic()
        self.ended: float | None = None
        self.scheduler_handle: object = None  # e.g. the qt timer, kept alive with the run
        self._events: queue.Queue = queue.Queue()
        self._outcome: "WorkerOutcome | None" = None
        self._thread_error: BaseException | None = None
        self._cancel_requested = False
        self._thread = threading.Thread(target=self._follow, name="segrap-worker-events", daemon=True)

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def laterality_warnings(self) -> list[str]:
        """Warnings that a left/right pair may be swapped: a planning error if true, so shown in a dialog."""
        from ..anatomy.qa import laterality_warnings

        return laterality_warnings(self.warnings)

    @property
    def elapsed_s(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def start(self) -> "SegmentationRun":
        try:
            self.worker.start()
        except OSError as exc:
            self._cleanup()
            raise InputError(f"The worker could not be started with Python {self.worker.python} ({exc}). Choose "
                             f"another Python executable.") from exc
        self._thread.start()
        return self

    def _follow(self) -> None:
        """Event thread: pass every worker event on; keep the outcome (never touches the scene)."""
        try:
            self._outcome = self.worker.wait(on_event=self._events.put)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread by poll()
            self._thread_error = exc

    def cancel(self) -> None:
        """Ask the worker and its children to stop (non-blocking); ``poll`` then finishes the run as cancelled."""
        if self.state != RUNNING or self._cancel_requested:
            return
        self._cancel_requested = True
        threading.Thread(target=self.worker.cancel, name="segrap-cancel", daemon=True).start()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the worker on this thread and finish the run as cancelled, without calling back.

        For module reload and Slicer exit (``cleanup()``): there is no later timer tick to finish
        the run, and the panel's widgets may be gone, so neither callback is called.
        """
        if self.state != RUNNING:
            return
        self._cancel_requested = True
        self.progress = self.finished = None
        try:
            self.worker.cancel()
        except Exception:  # noqa: BLE001 - still finish the run and remove its temp files
            log.exception("SegRap: stopping the worker failed")
        self._thread.join(timeout_s)
        if self.state == RUNNING:
            self._finish()

    def poll(self) -> bool:
        """Hand queued events to ``progress``; finish the run when the worker is done. True while running."""
        if self.state != RUNNING:
            return False
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if event.get("event") == "warning":
                self.warnings.append(str(event.get("message", "")))
            if self.progress is not None:
                try:
                    self.progress(event)
                except Exception:  # noqa: BLE001 - a broken callback must not leave the worker orphaned
                    log.exception("SegRap progress callback failed")
            if self.state != RUNNING:  # the callback cancelled and the run already finished
                return False
        if self._thread.is_alive():
            return True
        self._finish()
        return False

    def _finish(self) -> None:
        outcome, failure = self._outcome, self._thread_error
        try:
            if self._cancel_requested:
                self.state, self.error = CANCELLED, Cancelled("The segmentation was cancelled; the scene is unchanged.")
            elif failure is not None:
                self.state, self.error = FAILED, failure
            elif outcome is not None and outcome.ok:
                from . import scene as SC

                self.outputs = dict(outcome.final.get("outputs", {}))
                SC.load_segmentation(self.outputs["segmentation"], self.reference_volume, self.segmentation_node,
                                     show_3d=self.show_3d)
                self.state = DONE
            elif outcome is not None and outcome.final.get("event") == "cancelled":
                self.state, self.error = CANCELLED, Cancelled("The segmentation worker was stopped.")
            else:
                final = outcome.final if outcome is not None else {}
                self.state, self.error = FAILED, _error_from_event(final, outcome.log_tail if outcome else "")
        except Exception as exc:  # noqa: BLE001 - loading the result failed
            self.state, self.error = FAILED, exc
        finally:
            if self.state != DONE and self.created_node and self.segmentation_node is not None:
                scene = self.segmentation_node.GetScene()
                if scene is not None:
                    scene.RemoveNode(self.segmentation_node)
                self.segmentation_node = None
            self.ended = time.monotonic()
            self._cleanup()
        if self.finished is not None:
            try:
                self.finished(self)
            except Exception:  # noqa: BLE001
                log.exception("SegRap finished callback failed")

    def _cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def result(self):
        """The segmentation node of a finished run; the run's exception when it failed or was cancelled."""
        if self.state == RUNNING:
            raise SegRapError("The segmentation is still running.")
        if self.error is not None:
            raise self.error
        return self.segmentation_node


class SegmentationLogic:
    """What ``SegRapSegmenterLogic`` does, usable from the Python console and headless tests.

    ``python``: the worker's Python (default: Slicer's own). ``scheduler``: how ``wait=False`` runs
    are polled (default: a qt timer in Slicer; headless, the caller polls ``logic.run.poll()``).
    ``dicomDatabase``: where the volumes' DICOM files are found (None: Slicer's open database).
    """

    def __init__(self, python: str | None = None, scheduler: Scheduler | None = None):
        self.python = python
        self.scheduler = scheduler
        self.run: SegmentationRun | None = None
        self.dicomDatabase = None

    # -- segmentation ------------------------------------------------------------------------

    def segment(self, ctNode, contrastCtNode=None, segmentationNode=None, tasks: Sequence[str] = ("oar", "gtv"),
                structures: Sequence[str] | None = None, device: str = "auto", folds: Sequence[str] | str | None = None,
                mirror: bool | None = None, bundle: str | None = None, lowMemory: bool = False, wait: bool = True,
                progress: Progress | None = None, finished: Callable[[SegmentationRun], None] | None = None,
                tile_step_size: float = 0.5, threads: int | None = None, register: bool = False,
                show3D: bool = True):
        """Segment the CT (organs at risk) and contrast CT (GTVs) into a segmentation node; returns the node.

        ``segmentationNode`` None: a new node is made. ``tasks``: "oar", "gtv" or both; ``structures``:
        a subset by name (any spelling), None for all. ``folds``: e.g. ("0", "1") or "0,1"; None for the
        bundle's folds. ``mirror``: test-time mirroring (None: the bundle's default). ``lowMemory``: scores
        kept in CPU memory (for small GPUs; out-of-memory switches to it anyway). ``bundle``: an
        installed name, a folder, or "demo"; None for the only installed one. ``progress(event)`` gets
        every worker event. ``wait=False`` returns at once (the node fills when the run is done,
        ``finished(run)`` is called then; errors are in ``run.error``); ``wait=True`` blocks and raises
        the run's error (``Cancelled`` after ``cancel()``).
        """
        if self.run is not None and self.run.running:
            raise SegRapError("A segmentation is already running: wait for it or cancel it first.")
        tasks = tuple(dict.fromkeys(t.strip().lower() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)))
        from ..anatomy import structures as S
        from ..runner import SegmentRequest, check_case_id
        from ..runner import WorkerRun
        from . import scene as SC

        if structures is not None:
            needed = {s.task for s in S.select(list(structures))}
            tasks = tuple(t for t in tasks if t in needed)
            if not tasks:
                raise InputError("None of the selected structures belongs to the selected tasks (OARs, GTVs).")
        if "oar" in tasks and ctNode is None:
            raise InputError("The organs at risk are contoured on the plain CT: select a CT volume.")
        if "gtv" in tasks and contrastCtNode is None:
            raise InputError("The tumour volumes (GTVp, GTVnd) are contoured on the contrast CT: select a contrast "
                             "CT volume, or untick GTVs.")
        reference = ctNode if ctNode is not None else contrastCtNode
        if reference is None:
            raise InputError("Select a CT volume.")
        # the files only (database lookups): the worker reads their headers and refuses two patients before the model
        identity_files = self.identityFiles(ctNode, contrastCtNode if "gtv" in tasks else None)
        if isinstance(folds, str):
            folds = tuple(f.strip() for f in folds.split(",") if f.strip()) or None
        workdir = Path(tempfile.mkdtemp(prefix="segrap-slicer-"))
        try:
            case_id = check_case_id(safe_case_id(reference.GetName()))
            ct_path = str(SC.write_volume(ctNode, workdir / "ct.nrrd", "CT")) if ctNode is not None else None
            contrast_path = (str(SC.write_volume(contrastCtNode, workdir / "contrast_ct.nrrd", "Contrast CT"))
                             if contrastCtNode is not None and "gtv" in tasks else None)
            request = SegmentRequest(
                ct=ct_path, contrast_ct=contrast_path, out_dir=str(workdir / "out"), case_id=case_id, bundle=bundle,
                tasks=tasks, structures=tuple(structures) if structures is not None else None, device=device,
                folds=tuple(str(f) for f in folds) if folds else None, mirror=mirror, tile_step_size=tile_step_size,
                threads=threads, low_memory=lowMemory, register=register,
                identity_files=identity_files)  # staging: inside out_dir
            from .dependencies import startup_environment

            worker = WorkerRun(request, python=self.python or default_python(), startup_env=startup_environment())
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        created = segmentationNode is None
        if created:
            segmentationNode = reference.GetScene().AddNewNodeByClass(
                "vtkMRMLSegmentationNode", f"{reference.GetName()} SegRap")
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        run = SegmentationRun(worker, workdir, reference, segmentationNode, created, progress, finished, show3D)
        try:
            run.start()
        except BaseException:
            if created:
                reference.GetScene().RemoveNode(segmentationNode)
            raise
        self.run = run
        if wait:
            blocking_scheduler(run.poll)
            return run.result()
        scheduler = self.scheduler or (qt_scheduler if in_slicer() else None)
        if scheduler is not None:
            run.scheduler_handle = scheduler(run.poll)
        return segmentationNode

    def identityFiles(self, ctNode, contrastCtNode) -> dict:
        """The DICOM files behind each volume (``self.dicomDatabase``, or Slicer's), for the worker's identity check.

        Only database lookups: the headers are read in the worker, so the GUI thread reads no file. A volume not
        loaded from DICOM has no files; the worker records its patient as not checked.
        """
        from . import scene as SC

        database = self.dicomDatabase if self.dicomDatabase is not None else SC.slicer_dicom_database()

        def source(node):
            if node is None:
                return None
            return {"label": f"volume {node.GetName()!r}", "files": SC.volume_dicom_files(node, database)}

        return {"ct": source(ctNode), "contrast_ct": source(contrastCtNode)}

    def checkIdentity(self, ctNode, contrastCtNode, register: bool = False) -> dict:
        """The two volumes' identity record (``formats.identity``) as the worker makes it; InputError when they are
        of two patients. Reads the files' headers: for scripts (``segment`` leaves that to the worker)."""
        from ..formats.identity import check_identity_of_files

        record, warnings = check_identity_of_files(self.identityFiles(ctNode, contrastCtNode),
                                                    contrastCtNode is not None, register, True)
        record["warnings"] = warnings
        return record

    def cancel(self) -> None:
        """Stop the running segmentation (the worker and its children); the scene is left as it was."""
        if self.run is not None:
            self.run.cancel()

    def stop(self) -> None:
        """Stop the running segmentation now and wait for its worker (module reload, Slicer exit)."""
        if self.run is not None:
            self.run.stop()

    @property
    def running(self) -> bool:
        return self.run is not None and self.run.running

    # -- RTSTRUCT ----------------------------------------------------------------------------

    def exportRtStruct(self, segmentationNode, ctNode, path, roiNames: str = "tg263", dicomFolder=None) -> Path:
        """Write the segmentation node (as edited now) as an RTSTRUCT on the CT's original DICOM files.

        The files are found through Slicer's DICOM database by the CT's instance UIDs, or in
        ``dicomFolder`` when given. ``path`` is a ``.dcm`` file, or a folder (made if needed) to write
        ``<CT name>_RTSTRUCT.dcm`` in. Blocks until written (the panel uses ``exportRtStructCall``).
        """
        return self.exportRtStructCall(segmentationNode, ctNode, path, roiNames, dicomFolder)()

    @staticmethod
    def exportRtStructCall(segmentationNode, ctNode, path, roiNames: str = "tg263", dicomFolder=None):
        """Copy what the export needs from the scene now (GUI thread); returns the call that writes it, on any thread.

        The call takes optional ``report`` and ``should_stop`` keywords (``background.BackgroundTask``)
        and returns the RTSTRUCT's path; making 47 masks, reading the DICOM series and contouring take
        seconds, so the panel runs it off the GUI thread.
        """
        if segmentationNode is None or ctNode is None:
            raise InputError("Select the segmentation and the CT it was made on.")
        target = Path(path)
        if target.suffix.lower() != ".dcm":
            target = target / f"{safe_case_id(ctNode.GetName())}_RTSTRUCT.dcm"
        from . import scene as SC

        database = SC.FolderDicomIndex(dicomFolder) if dicomFolder else SC.slicer_dicom_database()
        inputs = SC.rtstruct_inputs(segmentationNode, ctNode, database)

        def write(report=None, should_stop=None) -> Path:
            if report is not None:
                report(f"Writing the RTSTRUCT {target.name} ...", None)
            return SC.write_rtstruct_from(inputs, target, roi_names=roiNames, should_stop=should_stop)

        return write

    @staticmethod
    def sendRtStruct(path, destination: str, calling_ae: str = "SEGRAP") -> "SendReport":
        """C-ECHO, then C-STORE an exported RTSTRUCT (file or folder) to ``AE@HOST:PORT``, as ``segrap send`` does.

        Raises DicomNetworkError (unreachable peer, rejected association, refused store) or InputError
        (bad destination, not a DICOM file) with a message for the user.
        """
        from ..node.address import parse_destination
        from ..node.scu import send_files

        return send_files([path], parse_destination(destination), calling_ae)

    # -- model bundles ------------------------------------------------------------------------

    @staticmethod
    def bundleChoices() -> "dict[str, Bundle]":
        """What the bundle selector offers: installed bundles by name, then the packaged demo bundle as "demo"."""
        from ..inference import bundles as M

        # listed without the plans check, which needs torch; the worker checks them before building a network
        found = {b.name: b for b in M.list_bundles(check_network=False)}
        if M.DEMO_BUNDLE_NAME not in found and (M.DEMO_BUNDLE_PATH / M.MANIFEST_NAME).is_file():
            try:
                found[M.DEMO_BUNDLE_NAME] = M.load_bundle(M.DEMO_BUNDLE_PATH, check_network=False)
            except errors.ModelError as exc:
                log.warning("Demo bundle: %s", exc)
        return found

    @staticmethod
    def describeBundle(bundle: "Bundle") -> str:
        """Name, version, license and tasks of a bundle, for the panel."""
        tasks = ", ".join(f"{t} (folds {', '.join(m.folds)})" for t, m in bundle.tasks.items())
        return f"{bundle.name} {bundle.version} - license: {bundle.license} - tasks: {tasks}\n{bundle.description}"

    @staticmethod
    def installModel(source: str, force: bool = False, report=None, should_stop=None,
                     allow_http: bool = False) -> "Bundle":
        """Install a bundle from a folder, zip or URL into the model store (checksums verified first).

        ``report(message, fraction)`` and ``should_stop()`` are for running it as a
        ``background.BackgroundTask`` (the panel does: a URL download must not block Slicer). Plain
        http is refused unless ``allow_http`` (the checksums travel in the same download).
        """
        from ..inference import bundles as M

        return M.install_bundle(source, force=force, allow_http=allow_http, report=report, should_stop=should_stop)

    @staticmethod
    def verifyModel(name: str | None) -> "Bundle":
        """Check every file of a bundle against its manifest; a ModelError names what is wrong."""
        from ..inference import bundles as M

        bundle = M.resolve_bundle(name or None)
        M.verify_bundle(bundle)
        return bundle
