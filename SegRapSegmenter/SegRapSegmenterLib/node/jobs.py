"""One study's job: contour it in the CLI's worker process, then hand its RTSTRUCT to the couriers (``delivery``).

The RTSTRUCT is made once per run and kept in the spool; every delivery (and every redelivery
after a restart) sends that same file, so a destination never receives two structure sets for one
run. Deliveries are recorded per destination the moment a destination confirms the store.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import fields
from pathlib import Path

import pydicom

from ..errors import SegRapError, WorkerError
from ..runner import SegmentRequest, WorkerRun, describe_exit
from .audit import AuditLog
from .config import NodeConfig
from .spool import Spool


MAX_RUNS = 3  # a study whose worker died this many times is failed, not retried forever


class Requeued(Exception):
    """The job was stopped by a node shutdown and goes back to the queue."""


class LeaseLost(Exception):
    """This node's lease on the job expired and another node took it over: the run's result is dropped."""


class WorkerDied(Exception):
    """The worker ended without a final event (killed by the OS, e.g. out of memory): worth another run."""


def build_request(config: NodeConfig, job, out_dir: Path, spool: Spool) -> SegmentRequest:
    """The pipeline request of a queued job: the chosen series, the configured model, an RTSTRUCT out."""
    study = job["study_uid"]
    tasks = tuple(t for t in (job["tasks"] or "").split(",") if t)
    contrast = spool.series_folder(study, job["contrast_series"]) if job["contrast_series"] and "gtv" in tasks \
        else None
    request = SegmentRequest(ct=str(spool.series_folder(study, job["plain_series"])),
                             contrast_ct=str(contrast) if contrast else None, out_dir=str(out_dir),
                             case_id=job["case_id"], bundle=config.bundle, tasks=tasks, device=config.device,
                             threads=config.threads, rtstruct=True,
                             patient_values_in_errors=False)  # its errors reach the audit log: no patient values
    if config.contour_holes and "contour_holes" in {f.name for f in fields(SegmentRequest)}:
        request.contour_holes = config.contour_holes  # type: ignore[attr-defined]
    return request


class JobRunner:
    """Runs claimed jobs for one worker slot (one GPU); ``cancel`` stops the running one for a requeue."""

    def __init__(self, config: NodeConfig, spool: Spool, audit: AuditLog, stop: threading.Event,
                 env: dict[str, str] | None = None, slot: int = 0, on_contoured=lambda: None):
        self.config, self.spool, self.audit, self.stop = config, spool, audit, stop
        self.on_contoured = on_contoured  # wakes the couriers
        self.env, self.slot = env, slot
        self._run: WorkerRun | None = None
        self._lock = threading.Lock()

    def cancel(self) -> None:
        """Stop the worker of the running job (its job is requeued by ``process``)."""
        with self._lock:
            run = self._run
        if run is not None:
            run.cancel()

    def process(self, job) -> None:
        """Contour (unless this study's RTSTRUCT exists) and hand it to the couriers; leaves it delivering, failed
        or queued."""
        study = job["study_uid"]
        try:
            rtstruct = job["rtstruct"]
            if not rtstruct or not Path(rtstruct).is_file():
                rtstruct = self._segment(job)
                if self.spool.reopen_if_changed(study):  # images came in while it ran: contour them all again
                    self.audit.write("study_reopened", study_uid=study, reason="new images arrived during the run")
                    return
            self.spool.to_delivery(study)  # the couriers send it; this slot takes the next study
            if not self.config.destinations:
                self.spool.conclude_delivery(study, [])
                self.audit.write("finished", study_uid=study, state="sent", destinations=0,
                                 received_to_sent_s=round(time.time() - float(job["first_received"]), 1))
            self.on_contoured()
        except Requeued:
            self.spool.requeue(study)
            self.audit.write("job_requeued", study_uid=study, reason="node stopping")
        except LeaseLost:
            self.audit.write("job_lost", study_uid=study, reason="this node's lease expired; another node took the "
                             "study over, this run's RTSTRUCT is not used")
        except WorkerDied as exc:
            runs = int(job["attempts"])
            if runs < MAX_RUNS:
                self.spool.retry(study)
                self.audit.write("job_retry", study_uid=study, attempt=runs, reason=str(exc))
            else:
                reason = f"the worker died in {runs} runs (last: {exc})"
                self._fail_run(study, "WorkerError", reason)
        except SegRapError as exc:
            self._fail_run(study, type(exc).__name__, str(exc))

    def _fail_run(self, study: str, kind: str, reason: str) -> None:
        """Fail the study this slot ran, unless another node took it over meanwhile (then that is audited)."""
        if self.spool.fail(study, reason, running_here=True):
            self.audit.write("failed", study_uid=study, kind=kind, reason=reason)
        else:
            self.audit.write("job_lost", study_uid=study, kind=kind, reason=f"this node's lease expired; another "
                             f"node took the study over, so this run's failure ({reason}) does not fail it")

    def _segment(self, job) -> str:
        study = job["study_uid"]
        job_dir = self.spool.root / "jobs" / job["case_id"]
        out_dir = job_dir / f"attempt-{int(job['attempts'])}"
        if out_dir.exists():
            shutil.rmtree(out_dir)
        request = build_request(self.config, job, out_dir, self.spool)
        started = time.time()
        self.audit.write("job_started", study_uid=study, case_id=job["case_id"], attempt=int(job["attempts"]),
                         tasks=list(request.tasks), ct_series=job["plain_series"],
                         contrast_series=job["contrast_series"] if request.contrast_ct else None, slot=self.slot)
        run = WorkerRun(request, python=self.config.python, env=self.env)
        with self._lock:
            if self.stop.is_set():
                raise Requeued()
            self._run = run.start()
        self.spool.set_worker_pid(study, run.process.pid)
        try:
            outcome = run.wait()
        except WorkerError as exc:  # no final event: the worker was killed or crashed
            if self.stop.is_set():
                raise Requeued() from exc
            code = run.process.returncode if run.process is not None else None
            # the reason names how it ended, never the log tail (it may hold header values)
            raise WorkerDied(f"the worker {describe_exit(code) if code is not None else 'died'} "
                             f"before finishing") from exc
        finally:
            with self._lock:
                self._run = None
        final = outcome.final
        if final.get("event") == "cancelled" or self.stop.is_set() and not outcome.ok:
            raise Requeued()
        if not outcome.ok:
            raise WorkerError(f"{final.get('kind', 'error')}: {final.get('message', 'the worker failed')}")
        path = final["outputs"]["rtstruct"]
        uid = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        if not self.spool.set_rtstruct(study, path, uid):
            raise LeaseLost()
        self.audit.write("job_finished", study_uid=study, rtstruct_uid=uid, seconds=round(time.time() - started, 1),
                         warnings=len(outcome.warnings))
        return path
