"""``segrap serve``: the SCP, the completion rule, the queue, the workers and the couriers, run until SIGTERM.

A study is complete when none of its instances arrived for ``settle`` seconds; it is then queued
with the series the selection rule picked (or failed, when it has no usable CT). One worker slot per
GPU takes queued jobs one at a time; one courier thread per destination sends the RTSTRUCTs. At
start-up, jobs a killed node left running go back to the queue (their orphaned worker processes are
stopped first, the interrupted run is not counted), so every study is finished after a crash.

With a PostgreSQL queue (``--queue``) several nodes share the queue and the spool folder: each claims
jobs with a lease that its heartbeat thread renews every third of ``lease_s``, and takes over only the
running jobs whose lease expired (a killed node's), at start-up and every cycle (docs/cluster.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import psutil

from ..errors import EXIT_ERROR, InputError
from .audit import AuditLog, last_event, tail_events
from .config import NodeConfig
from .delivery import Courier
from .jobs import MAX_RUNS, JobRunner
from .scp import StorageScp
from .selection import select
from .spool import Spool

log = logging.getLogger(__name__)

SHARED_MARKER = "shared-queue.txt"  # in a spool that nodes on a PostgreSQL queue share: the queue's URL, redacted
PURGE_EVERY_S = 3600.0  # how often finished studies older than keep_days are deleted (and at start)


def visible_gpus() -> list[str]:
    """The CUDA devices a worker may be pinned to (CUDA_VISIBLE_DEVICES, else nvidia-smi's list)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def worker_slots(config: NodeConfig) -> list[dict[str, str] | None]:
    """One environment per worker slot: each pinned to its own GPU when there are GPUs to share out."""
    gpus = visible_gpus() if config.device in ("auto", "cuda") else []
    count = config.workers or max(1, len(gpus))
    if not gpus:
        return [None] * count
    return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} for i in range(count)]


def _stop_orphan(pid: int | None) -> bool:
    """Kill a worker a killed node left behind, with its children (only if it is our worker)."""
    if not pid:
        return False
    try:
        proc = psutil.Process(int(pid))
        if "SegRapSegmenterLib.worker" not in " ".join(proc.cmdline()) or proc.ppid() == os.getpid():
            return False  # not a worker, or one of this node's own (a pid the dead node's worker had, reused)
        procs = [proc, *proc.children(recursive=True)]
        for p in procs:
            p.kill()
        psutil.wait_procs(procs, timeout=10)
        return True
    except psutil.Error:
        return False


def _killed_here(row) -> bool:
    """A node of this machine whose process no longer serves (killed): its name may be taken again at once."""
    if row["host"] != socket.gethostname():
        return False
    try:
        proc = psutil.Process(int(row["pid"]))
        return proc.status() == psutil.STATUS_ZOMBIE or "serve" not in proc.cmdline()
    except (psutil.Error, TypeError, ValueError):
        return True


class Node:
    """The running node; ``run`` blocks until ``stop`` (the CLI calls it from SIGTERM / SIGINT)."""

    def __init__(self, config: NodeConfig, echo=None):
        self.config = config
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # one line per C-STORE otherwise
        os.umask(0o077)  # what the node and its workers write (images, RTSTRUCTs, logs) is the node user's only
        self.name = config.node_name or (f"{socket.gethostname()}-{config.port}" if config.port
                                         else f"{socket.gethostname()}-pid{os.getpid()}")
        self.spool = Spool(config.spool, config.queue, self.name, config.lease_s)
        self.shared = config.queue is not None  # several nodes may serve from this queue and spool
        self.audit = AuditLog(self.spool.audit_path, echo=echo, max_mb=config.audit_max_mb, keep=config.audit_keep)
        self.stop_event = threading.Event()
        self._wake = threading.Event()
        self.scp = StorageScp(config.ae_title, config.host, config.port, self.spool, self.audit,
                              config.allow_ae, on_study=self._on_study, min_free_mb=config.min_free_mb,
                              max_instance_mb=config.max_instance_mb, tls=config.tls,
                              negotiation_s=config.negotiation_s, idle_s=config.idle_s,
                              association_s=config.association_s, max_pdu_kb=config.max_pdu_kb)
        self.couriers = [Courier(config, self.spool, self.audit, dest, self.stop_event) for dest in config.destinations]
        self.runners = [JobRunner(config, self.spool, self.audit, self.stop_event, env, slot, self._wake_couriers)
                        for slot, env in enumerate(worker_slots(config))]
        self.port = config.port
        self._fatal: str | None = None

    def _on_study(self, study_uid: str, state: str) -> None:
        if state == "reopened":  # images sent again ("late") are counted in association_closed instead
            self.audit.write("study_reopened", study_uid=study_uid, reason="new images after its run")

    def _wake_couriers(self) -> None:
        for courier in self.couriers:
            courier.wake.set()

    def stop(self, *_args) -> None:
        """Stop accepting, stop the running jobs (requeued) and let ``run`` return."""
        self.stop_event.set()
        self._wake.set()
        self._wake_couriers()

    # ------------------------------------------------------------------ the loops

    def _recover(self) -> None:
        last = _unclean_end(self.spool.audit_path)
        if last is not None:  # killed (SIGKILL, the OOM killer, a power cut) or crashed
            self.audit.write("unclean_stop", last_event=last.get("event"), last_event_time=last.get("time"),
                             note="the previous node process ended without stopping; what it was doing is "
                             "recovered below")
        removed = self.spool.clear_incoming() + self.spool.clear_temp()
        restarted = self.spool.restart_settle_clocks()
        if restarted:  # a study cut by the downtime gets a full settle time for its sender to resend
            self.audit.write("settle_restarted", studies=restarted, settle_s=self.config.settle_s)
        for job in (self.spool.take_over(restart=True) if self.shared else self.spool.recover()):
            self._recovered(job)
        if removed:
            self.audit.write("spool_cleaned", partial_files=removed)

    def _recovered(self, job) -> None:
        """Audit a job taken back into the queue; its worker is stopped when it ran on this machine."""
        here = not self.shared or job["claimed_by"] in {n["name"] for n in self.spool.nodes()
                                                        if n["host"] == socket.gethostname()}
        killed = _stop_orphan(job["worker_pid"]) if here else False
        self.audit.write("job_recovered", study_uid=job["study_uid"], attempt=int(job["attempts"]),
                         orphan_worker_stopped=killed or None, rtstruct_kept=bool(job["rtstruct"]) or None,
                         from_node=job["claimed_by"] if self.shared else None)

    def _heartbeat_loop(self) -> None:
        """Renew this node's leases every third of ``lease_s``; a node that cannot for a whole lease stops (its
        jobs are the other nodes' by then)."""
        renewed = time.time()
        while not self.stop_event.wait(self.config.lease_s / 3):
            try:
                self.spool.heartbeat()
                renewed = time.time()
            except Exception as exc:  # noqa: BLE001 - the database away for a moment: retried, said in the audit
                self.audit.write("heartbeat_failed", error=f"{type(exc).__name__}: {exc}",
                                 seconds_since_renewal=round(time.time() - renewed, 1))
                if time.time() - renewed > self.config.lease_s:
                    raise RuntimeError(f"no heartbeat for {self.config.lease_s:g} s (the lease); other nodes take "
                                       f"over this node's jobs") from exc

    def _complete_settled(self) -> None:
        """Queue (or fail) each settled study; only the node whose change took effect audits it (shared queue)."""
        for study in self.spool.settled(self.config.settle_s):
            job = self.spool.job(study)
            series = self.spool.series_of(study)
            choice = select(series, self.config.selection, self.config.tasks)
            notes = "; ".join(choice.notes)
            received = dict(study_uid=study, calling_ae=job["calling_ae"], series=len(series),
                            instances=sum(s.instances for s in series),
                            receive_s=round(float(job["last_received"]) - float(job["first_received"]), 1))
            if not choice.usable:
                reason = "no usable CT: " + notes
                if self.spool.fail(study, reason, notes, received_only=True):
                    self.audit.write("study_received", **received)
                    self.audit.write("failed", study_uid=study, reason=reason)
                continue
            if self.spool.queue(study, choice.plain, choice.contrast, choice.tasks, notes):
                self.audit.write("study_received", **received)
                self.audit.write("job_queued", study_uid=study, case_id=job["case_id"], tasks=list(choice.tasks),
                                 ct_series=choice.plain, contrast_series=choice.contrast, selection=notes)
                self._wake.set()

    def _worker_loop(self, runner: JobRunner) -> None:
        """Take queued jobs until stopped; a job that raises anything unexpected is failed, and the loop goes on."""
        while not self.stop_event.is_set():
            job = None
            try:
                job = self.spool.claim()
                if job is None:
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                if int(job["attempts"]) > MAX_RUNS and not job["rtstruct"]:
                    reason = f"the worker did not finish in {MAX_RUNS} runs"
                    self.spool.fail(job["study_uid"], reason)
                    self.audit.write("failed", study_uid=job["study_uid"], reason=reason)
                    continue
                runner.process(job)
            except Exception as exc:  # noqa: BLE001 - one broken job must not stop the contouring of the others
                self._job_crashed(job, exc)

    def _job_crashed(self, job, exc: Exception) -> None:
        """Log and audit an unexpected error of the loop; the job it was running (if any) is failed with it."""
        reason = f"internal error: {type(exc).__name__}: {exc}"
        log.exception("worker slot: %s", reason)
        study = job["study_uid"] if job is not None else None
        self.audit.write("internal_error", study_uid=study, kind=type(exc).__name__, error=str(exc))
        if study is not None:
            try:
                self.spool.fail(study, reason)
                self.audit.write("failed", study_uid=study, kind=type(exc).__name__, reason=reason)
            except Exception:  # noqa: BLE001 - the database itself failing: the next claim finds the job again
                log.exception("cannot mark %s failed", study)
        self.stop_event.wait(1.0)  # a fault that repeats (e.g. the database) does not spin

    def _guarded(self, name: str, loop, *args) -> None:
        """Run a loop of the node; if it ends other than by ``stop``, the node stops and exits non-zero."""
        try:
            loop(*args)
        except BaseException as exc:  # noqa: BLE001 - reported, then the whole node stops
            self._fatal = f"{name} died: {type(exc).__name__}: {exc}"
            log.exception(self._fatal)
        else:
            if not self.stop_event.is_set():
                self._fatal = f"{name} ended while the node was running"
        if self._fatal:
            self.stop()

    def _refuse_shared_spool(self) -> None:
        """A node on the SQLite queue refuses a spool that nodes of a shared queue serve from
        (``shared-queue.txt``): they keep their own folders there, which this node would clear."""
        shared = self.spool.root / SHARED_MARKER
        if not self.shared and shared.is_file():
            raise InputError(f"--spool {self.spool.root}: nodes on the queue {shared.read_text().strip()} serve "
                             f"from this folder; give that --queue too, or another spool.")

    def _claim_spool(self) -> None:
        """Refuse to share the spool with another running node (its pid is in ``node.pid``)."""
        other = serving_pid(self.spool.root)
        if other is not None and other != os.getpid():
            raise InputError(f"--spool {self.spool.root}: node process {other} is already serving from it; "
                             f"stop it first or give another spool.")
        (self.spool.root / "node.pid").write_text(str(os.getpid()))

    def run(self) -> int:
        """Serve until stopped; returns 0, or 1 when a loop of the node died (the node never runs half-alive)."""
        from ..inference.bundles import resolve_bundle

        self._refuse_shared_spool()
        # ModelError before listening, not at the first study; the plans' network is checked by each worker (and
        # was at install): checking it here imported torch into the node, 700 MiB resident instead of ~100
        bundle = resolve_bundle(self.config.bundle, check_network=False)
        if not self.shared:  # one node per SQLite queue; a shared queue has its nodes table instead
            self._claim_spool()
        else:
            (self.spool.root / SHARED_MARKER).write_text(self.spool.where + "\n")
        gpus = ",".join(visible_gpus() if self.config.device in ("auto", "cuda") else [])
        self.spool.register(socket.gethostname(), os.getpid(), gpus, gone=_killed_here)
        self._recover()
        # the workers' run folders and pynetdicom's received data sets go under the spool, which the next start
        # clears: a killed node leaks no temporary folder with images in /tmp
        saved_tempdir, tempfile.tempdir = tempfile.tempdir, str(self.spool.temp_dir)
        try:
            return self._serve(bundle)
        finally:
            tempfile.tempdir = saved_tempdir

    def _serve(self, bundle) -> int:
        try:
            self.port = self.scp.start()
        except OSError as exc:
            raise InputError(f"--port {self.config.port}: cannot listen on {self.config.host} ({exc.strerror}); "
                             f"is another program using the port?") from exc
        self.audit.write("started", ae_title=self.config.ae_title, host=self.config.host, port=self.port,
                         tls="mutual" if self.config.tls else None, bundle=f"{bundle.name} {bundle.version}",
                         destinations=[str(d) for d in self.config.destinations],
                         destinations_tls=[str(d) for d in self.config.destinations if d.tls] or None,
                         allow_ae=list(self.config.allow_ae) or None, settle_s=self.config.settle_s,
                         workers=len(self.runners), pid=os.getpid(), node=self.name,
                         queue=self.spool.where if self.shared else None,
                         lease_s=self.config.lease_s if self.shared else None)
        threads = [threading.Thread(target=self._guarded, args=(f"worker slot {r.slot}", self._worker_loop, r),
                                    name=f"segrap-worker-{r.slot}", daemon=True) for r in self.runners]
        threads.append(threading.Thread(target=self._guarded, args=("heartbeat", self._heartbeat_loop),
                                        name="segrap-heartbeat", daemon=True))
        threads += [threading.Thread(target=self._guarded, args=(f"courier to {c.dest}", c.run),
                                     name=f"segrap-courier-{c.dest}", daemon=True) for c in self.couriers]
        for t in threads:
            t.start()
        try:
            purged_at = 0.0
            while not self.stop_event.is_set():
                try:
                    if self.shared:  # a killed node's jobs, once its lease expired
                        for job in self.spool.take_over():
                            self._recovered(job)
                            self._wake.set()
                    self._complete_settled()
                    if self.config.keep_days is not None and time.time() - purged_at > PURGE_EVERY_S:
                        purged_at = time.time()
                        purged = self.spool.purge(self.config.keep_days)
                        if purged:
                            self.audit.write("spool_purged", studies=purged, keep_days=self.config.keep_days)
                except Exception as exc:  # noqa: BLE001 - e.g. a full disk: audited, retried at the next cycle
                    self._job_crashed(None, exc)
                self.stop_event.wait(min(1.0, max(0.2, self.config.settle_s / 4)))
        finally:
            self.scp.stop()
            self.audit.write("stopping", reason=self._fatal or "signal")
            for r in self.runners:
                r.cancel()
            for t in threads:
                t.join(timeout=60)
            self.audit.write("stopped", exit_code=EXIT_ERROR if self._fatal else None)
            try:
                self.spool.unregister()
            except Exception:  # noqa: BLE001 - the queue is away: the node shows as gone once its heartbeat ages
                log.exception("cannot mark node %s stopped in the queue", self.name)
            finally:
                self.spool.close()
        if self._fatal:
            print(f"segrap serve: {self._fatal}; the node stopped (see the audit log and the lines above).",
                  file=sys.stderr)
            return EXIT_ERROR
        return 0


def _unclean_end(path, tail_bytes: int = 1 << 20) -> dict | None:
    """The last event of a node run that ended without ``stopped`` (killed or crashed); None after a clean stop.

    Only the log's tail is read (it grows for months); the run's ``started`` may lie before it.
    """
    events = tail_events(path, tail_bytes)
    for event in reversed(events):
        if event.get("event") == "stopped":
            return None
        if event.get("event") == "started":
            break
    return events[-1] if events else None


def serving_pid(spool_root) -> int | None:
    """The pid of the ``segrap serve`` process serving from this spool (``node.pid``), None when none runs."""
    from pathlib import Path

    try:
        pid = int((Path(spool_root) / "node.pid").read_text().strip())
        proc = psutil.Process(pid)
        if proc.status() != psutil.STATUS_ZOMBIE and "serve" in proc.cmdline():
            return pid
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def _liveness(spool: Spool) -> str:
    """One line: is a node serving from this spool, and its last audit event."""
    pid = serving_pid(spool.root)
    event = last_event(spool.audit_path)  # the end of the newest file, however long the log (it is rotated)
    last = f"; last event {event['event']!r} at {event['time']}" if event else ""
    if pid is not None:
        return f"node: running (pid {pid}{last})"
    return f"node: NOT RUNNING{last}; studies shown running were interrupted and are queued again at its next start"


def requeue_study(spool_dir, study_uid: str, redeliver: bool, queue: str | None = None) -> str:
    """``--rerun`` / ``--redeliver``: change one finished study in the spool's queue; a running node picks it up."""
    from pathlib import Path

    if queue is None and not (Path(spool_dir) / "node.sqlite").is_file():
        raise InputError(f"--spool {spool_dir}: no node database there (node.sqlite); give the spool of a node.")
    spool = Spool(spool_dir, queue, node=f"{socket.gethostname()}-cli")  # its audit: audit-HOST-cli.jsonl
    try:
        audit = AuditLog(spool.audit_path)
        if redeliver:
            uid = spool.redeliver(study_uid)
            audit.write("redeliver_requested", study_uid=study_uid, rtstruct_uid=uid)
            return f"{study_uid}: queued to send its RTSTRUCT {uid} (the same file) to every destination again"
        spool.rerun(study_uid)
        audit.write("rerun_requested", study_uid=study_uid)
        return (f"{study_uid}: will be contoured again after the settle time; the new RTSTRUCT (a new SOP instance "
                f"UID) goes to every destination")
    finally:
        spool.close()


def _node_lines(queue, now: float) -> tuple[list[str], set[str]]:
    """One line per node of a shared queue (alive, gone: heartbeat older than its lease, or stopped); the live."""
    lines, alive = [], set()
    for n in queue.nodes():
        age = now - float(n["heartbeat"])
        state = "stopped" if n["stopped"] is not None else "GONE" if age > float(n["lease_s"]) else "alive"
        if state == "alive":
            alive.add(n["name"])
        lines.append(f"node {n['name']}: {state}  host {n['host']}  pid {n['pid']}  heartbeat {age:.0f} s ago  "
                     f"lease {float(n['lease_s']):g} s  GPUs {n['gpus'] or 'none'}  running jobs {n['running']}")
    return lines, alive


def status_text(spool_dir, queue: str | None = None) -> str:
    """The queue as a table: its nodes (a shared queue), then one line per study, its deliveries under it."""
    import tempfile
    from pathlib import Path

    from .queue import redact
    from .spool import open_queue

    marker = Path(spool_dir or ".") / SHARED_MARKER
    if queue is None and marker.is_file():
        raise InputError(f"--spool {spool_dir}: nodes on a shared queue serve from it; give --status --queue "
                         f"{marker.read_text().strip()} (with the password, if it has one).")
    if queue is None and not (Path(spool_dir) / "node.sqlite").is_file():
        raise InputError(f"--spool {spool_dir}: no node database there (node.sqlite); give the spool of a node.")
    alive_nodes: set[str] = set()
    if queue is not None:  # the queue holds everything --status shows; the spool folder is not needed
        spool = open_queue(queue, tempfile.gettempdir())
    else:
        spool = Spool(spool_dir)
    try:
        jobs = spool.jobs()
        if queue is not None:
            node_lines, alive_nodes = _node_lines(spool, time.time())
            lines = [f"queue {redact(queue)}: {len(jobs)} studies, {len(node_lines)} nodes", *node_lines]
            alive = True
        else:
            alive = serving_pid(spool.root) is not None
            lines = [f"spool {spool.root}: {len(jobs)} studies", _liveness(spool)]
        counts: dict[str, int] = {}
        for job in jobs:
            counts[job["state"]] = counts.get(job["state"], 0) + 1
        if counts:
            lines.append("  " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
        for job in jobs:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(job["first_received"] or 0)))
            lines.append(f"{job['state']:8} {job['study_uid']}  case {job['case_id']}  received {when}  "
                         f"tasks {job['tasks'] or '-'}  runs {job['attempts']}"
                         + (f"  late instances {job['late_instances']}" if job["late_instances"] else "")
                         + ("  (interrupted: the node is not running)" if job["state"] == "running" and not alive
                            else "")
                         + (f"  on {job['claimed_by']}" + ("" if job["claimed_by"] in alive_nodes else
                                                             " (gone: another node takes it over)")
                            if queue is not None and job["state"] == "running" else ""))
            if job["reason"]:
                lines.append(f"         reason: {job['reason']}")
            for d in spool.deliveries(job["study_uid"]):
                lines.append(f"         -> {d['destination']}: {d['state']} after {d['attempts']} attempt(s)"
                             + (f" ({d['last_error']})" if d["state"] != "sent" and d["last_error"] else ""))
        return "\n".join(lines)
    finally:
        spool.close()
