"""Delivery: one courier thread per destination sends the contoured studies' RTSTRUCTs, apart from contouring.

A worker slot hands a contoured study over (state ``delivering``) and takes the next study at once,
so a destination that is down delays only its own deliveries: contouring goes on, and the other
destinations get their RTSTRUCTs. Each courier takes the oldest study that its destination does not
hold yet and whose backoff has passed; outages are retried with exponential backoff up to
``delivery.attempts``, refusals for good (DicomRefusedError) fail that destination at once. A study
is ``sent`` when every destination holds its RTSTRUCT, ``failed`` when every destination has either
taken it or given up.
"""

from __future__ import annotations

import logging
import threading
import time

from ..errors import DicomNetworkError, DicomRefusedError
from .address import Destination
from .audit import AuditLog
from .config import NodeConfig
from .scu import echo, send_files
from .spool import Spool

log = logging.getLogger(__name__)


class Courier:
    """Delivers to one destination until ``stop`` is set; ``wake`` makes it look at the queue at once."""

    def __init__(self, config: NodeConfig, spool: Spool, audit: AuditLog, dest: Destination,
                 stop: threading.Event):
        self.config, self.spool, self.audit, self.dest, self.stop = config, spool, audit, dest, stop
        self.wake = threading.Event()

    def check_reachable(self) -> None:
        """At start-up: a C-ECHO to the destination; one that does not answer is a warning in the audit, not a stop."""
        try:
            echo(self.dest, self.config.ae_title, timeout=min(10.0, self.config.delivery.timeout_s), tls=self.dest.tls)
        except (DicomNetworkError, OSError) as exc:
            self.audit.write("destination_unreachable", destination=str(self.dest), error=str(exc),
                             note="RTSTRUCTs for it wait and are retried")

    def run(self) -> None:
        """The courier's loop (a thread of the node)."""
        self.check_reachable()
        while not self.stop.is_set():
            job = self.spool.next_delivery(str(self.dest))
            if job is None:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            try:
                self.deliver(job)
            except Exception as exc:  # noqa: BLE001 - one odd study must not stop this destination's deliveries
                log.exception("delivery to %s", self.dest)
                self.spool.delivery_attempt(job["study_uid"], str(self.dest), f"internal error: {exc}",
                                            give_up=True, rtstruct_uid=job["rtstruct_uid"])
                self.audit.write("internal_error", study_uid=job["study_uid"], destination=str(self.dest),
                                 kind=type(exc).__name__, error=str(exc))
                self._conclude(job)
                self.stop.wait(1.0)  # a fault that repeats (e.g. the database) does not spin

    def deliver(self, job) -> None:
        """One attempt to send the study's RTSTRUCT to this destination, recorded and audited."""
        study, dest, uid, delivery = job["study_uid"], str(self.dest), job["rtstruct_uid"], self.config.delivery
        try:
            send_files([job["rtstruct"]], self.dest, self.config.ae_title, timeout=delivery.timeout_s,
                       tls=self.dest.tls)  # the destination's own TLS files, the node's, or None
        except DicomRefusedError as exc:  # retrying cannot help: this destination fails at once
            attempts = self.spool.delivery_attempt(study, dest, str(exc), give_up=True, rtstruct_uid=uid)
            self.audit.write("delivery_failed", study_uid=study, destination=dest, attempt=attempts, permanent=True,
                             error=str(exc))
        except (DicomNetworkError, OSError) as exc:
            last = self.spool.delivery_attempts(study, dest, uid) + 1 >= delivery.attempts
            attempts = self.spool.delivery_attempt(study, dest, str(exc), give_up=last, rtstruct_uid=uid,
                                                   retry_at=time.time() + delivery.delay(
                                                       self.spool.delivery_attempts(study, dest, uid) + 1))
            self.audit.write("delivery_failed" if last else "delivery_retry", study_uid=study, destination=dest,
                             attempt=attempts, error=str(exc))
        else:
            attempts = self.spool.delivery_attempt(study, dest, None, rtstruct_uid=uid)
            self.audit.write("sent", study_uid=study, destination=dest, rtstruct_uid=uid, attempt=attempts,
                             replaces=job["previous_rtstruct_uid"],
                             received_to_sent_s=round(time.time() - float(job["first_received"]), 1))
        self._conclude(job)

    def _conclude(self, job) -> None:
        """Finish the study when no destination is left to try."""
        study = job["study_uid"]
        outcome = self.spool.conclude_delivery(study, [str(d) for d in self.config.destinations])
        if outcome is None:
            return
        state, reason = outcome
        if state == "sent":
            self.audit.write("finished", study_uid=study, state="sent",
                             received_to_sent_s=round(time.time() - float(job["first_received"]), 1))
        else:
            self.audit.write("failed", study_uid=study, kind="delivery", reason=reason)
