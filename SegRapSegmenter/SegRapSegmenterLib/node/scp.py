"""The Storage SCP: accepts CT images (and C-ECHO) from allowed AE titles and hands them to the spool.

Only CT Image Storage is stored. Every other storage SOP class is negotiated, so the sender gets a
C-STORE status rather than a failed association, and refused with 0x0122 (SOP class not supported).
A CT instance that cannot be decoded is refused with 0xC210 (cannot understand); one that lacks the
UIDs, geometry or pixel data of a CT image with 0xA900 (data set does not match SOP class); one the spool
cannot take (free space below the watermark, a full disk or database) with 0xA700 (out of resources).
Calling AE titles not on the allow-list are rejected at association (reason: calling AE title not recognised).

Every connection is bounded, each drop audited with the peer's address: the association request must be
complete within ``negotiation_s`` (and a new connection closes the oldest connection still negotiating
when more than half of the association slots are held by such connections, or when every slot is
taken), an established association
that completes no PDU for ``idle_s`` (silent, or trickling a PDU a byte at a time) or stays open over
``association_s`` is closed, and a P-DATA-TF PDU whose length field exceeds ``max_pdu_kb`` (the maximum the node announces; 1 MiB for the other PDUs) is
refused before any of it is read.
"""

from __future__ import annotations

import logging
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from ..errors import DicomNetworkError
from .audit import AuditLog
from .selection import CONTRAST_TAGS
from .spool import Instance, Spool, is_uid
from .tls import TlsFiles, server_context

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
NEGOTIATION_S = 10.0  # a connection must complete its association request within this (slow senders hold slots)
IDLE_S = 60.0  # an established association that completes no PDU for this long is closed
ASSOCIATION_S = 3600.0  # no association stays open longer (a study of thousands of images takes minutes)
MAX_PDU_KB = 256.0  # the largest P-DATA-TF PDU received, announced as the maximum length; a longer one ends it
MAX_ASSOCIATIONS = 16  # open at once; pynetdicom refuses more with "local limit exceeded"
MAX_NEGOTIATING = MAX_ASSOCIATIONS // 2  # of them still negotiating: a new connection closes the oldest beyond
MIN_NEGOTIATING_S = 0.5  # a connection negotiating longer than this may be closed to make room (a request takes ms)
ROOM_WAIT_S = 1.0  # a new connection waits at most this for the threads of the connections closed to make room
OTHER_PDU_BYTES = 1 << 20  # the largest other PDU (an A-ASSOCIATE-RQ of 128 contexts is tens of KB)
_PDU_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF",
              0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}
SOP_CLASS_NOT_SUPPORTED, OUT_OF_RESOURCES, DOES_NOT_MATCH, CANNOT_UNDERSTAND = 0x0122, 0xA700, 0xA900, 0xC210
RLE_LOSSLESS = "1.2.840.10008.1.2.5"  # decoded by pydicom itself, as the pipeline reads it
# implicit and explicit VR little endian, RLE; not deflate, whose few MB can inflate to GBs in memory
ACCEPTED_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", RLE_LOSSLESS)
# JPEG lossless (process 14, and its first-order prediction), JPEG-LS lossless and near-lossless, JPEG 2000
# lossless and lossy: the pipeline decodes them through pydicom's plugins (python-gdcm), so they are accepted
# where this Python has a plugin for them (a node without one refuses them at negotiation, not after a run)
COMPRESSED_SYNTAXES = ("1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.80",
                       "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")
_UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99")


def accepted_syntaxes() -> list[str]:
    """The transfer syntaxes the SCP accepts for storage: the uncompressed ones, RLE, and the decodable compressed."""
    from ..formats.pydicom_compat import decoder_problem

    return [*ACCEPTED_SYNTAXES, *(uid for uid in COMPRESSED_SYNTAXES if decoder_problem(uid) is None)]


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment.replace("\\", "/")[:64]
    return ds


def check_ct(ds: Dataset, affected_uid: str, transfer_syntax: str) -> str | None:
    """Why a received CT Image Storage data set cannot be used (None when it can)."""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not is_uid(str(ds.get(keyword, "") or "")):
            return f"{keyword} missing or not a UID"
    if str(ds.SOPInstanceUID) != affected_uid:
        return "SOPInstanceUID differs from the C-STORE request"
    for keyword in ("Rows", "Columns", "BitsAllocated", "ImagePositionPatient", "ImageOrientationPatient",
                    "PixelSpacing"):
        if ds.get(keyword) in (None, ""):
            return f"{keyword} missing"
    if "PixelData" not in ds:
        return "no pixel data"
    if transfer_syntax in _UNCOMPRESSED:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        want = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8 * int(ds.get("SamplesPerPixel", 1) or 1)
        have = _value_length(ds, 0x7FE00010)
        if have < want * frames:
            return f"pixel data of {have} bytes, {want * frames} expected (truncated)"
    return None


def _value_length(ds: Dataset, tag: int) -> int:
    """The length of an element's value without reading a deferred value into memory (pydicom 3; 2.4 reads it)."""
    try:
        elem = ds.get_item(tag, keep_deferred=True)
    except TypeError:  # pydicom 2.4 has no keep_deferred
        elem = ds.get_item(tag)
    value = getattr(elem, "value", None)
    return int(elem.length) if value is None else len(value)


CHECKED_PYNETDICOM = (3, 0)  # the release line whose internals the connection bounds were read against (3.0.4)


def pynetdicom_fit() -> tuple[str | None, str | None]:
    """(why the node's connection bounds cannot work with the installed pynetdicom, a warning that they were not
    checked against it): the bounds replace the association socket's ``recv``/``send`` and rely on the DUL reading
    a PDU's 6-byte header and then its announced length, and on its ``to_user_queue`` (pynetdicom 3.0.4
    ``dul.py`` ``_read_pdu_data``, ``transport.py`` ``AssociationSocket``). Without them a trickling or oversized
    peer would hold slots and memory unbounded, so the node refuses to start rather than run unguarded."""
    import inspect

    import pynetdicom
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.transport import AssociationSocket

    version = str(getattr(pynetdicom, "__version__", "unknown"))
    hint = (f"pynetdicom {version}: the node's connection bounds were written against pynetdicom "
            f"{CHECKED_PYNETDICOM[0]}.{CHECKED_PYNETDICOM[1]}")
    missing = [f"AssociationSocket.{name}" for name in ("recv", "send") if not callable(getattr(AssociationSocket,
                                                                                                name, None))]
    try:
        reads = inspect.getsource(DULServiceProvider._read_pdu_data)
        init = inspect.getsource(DULServiceProvider.__init__)
    except (AttributeError, OSError, TypeError):
        reads = init = None
    if reads is not None:
        missing += [what for what, text, where in (
            ("the DUL's 6-byte header read", "recv(6)", reads), ("the DUL's read of the announced length",
                                                                 "recv(pdu_length)", reads),
            ("DULServiceProvider.to_user_queue", "self.to_user_queue", init)) if text not in where]
    if missing:
        return (f"{hint}; this one lacks {', '.join(missing)}. Install a 3.0 release "
                f"(pip install 'pynetdicom>=3.0.4,<3.1').", None)
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if reads is None:
        return None, f"{hint}; this one's source cannot be read to find the hooks they use."
    if parts != CHECKED_PYNETDICOM:
        return None, f"{hint}; this one has the hooks they use, but run Testing/node before relying on it."
    return None, None


def _cut(sock: socket.socket) -> None:
    """End a connection the node drops: shut it down (the association's blocked read ends at once) with an abortive
    close to follow (SO_LINGER 0: pynetdicom's close then sends a reset).

    A plain close is not enough for a peer stuck sending: the node had stopped reading, its receive window was
    0, and the closed socket lingered in FIN-WAIT-2 answering the sender's window probes with window 0 until
    tcp_fin_timeout (60 s), so the sender learnt nothing for a minute (seen with ss under load: the sender in
    CLOSE-WAIT with 4 MB unsent, 107 s to its error)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.shutdown(socket.SHUT_RDWR)


def _await_threads(assocs, limit_s: float) -> None:
    """Wait, at most ``limit_s`` in all, for the threads of closed associations to end.

    pynetdicom counts an association's thread against ``maximum_associations`` until the thread ends, and counts
    as soon as a new connection's request arrives (acse.py ``_negotiate_as_acceptor``). Called from the new
    connection's EVT_CONN_OPEN, which runs before its association thread starts (transport.py
    ``RequestHandler.handle``), so the newcomer negotiates once the room is really free: without the wait DCMTK's
    echoscu was refused "local limit exceeded" in about one run in ten of the slot tests."""
    deadline = time.monotonic() + limit_s
    for assoc in assocs:
        if getattr(assoc, "ident", None) is not None:  # started (a thread not yet started cannot be joined)
            assoc.join(max(0.0, deadline - time.monotonic()))


def _wake_acceptor(assoc) -> None:
    """End the wait of an acceptor thread for an association request that will not come (nothing once established).

    pynetdicom's acceptor thread waits up to acse_timeout for the request, holding its association slot, though
    its connection is closed; an empty item ends that wait (pynetdicom 3.0 ``Association.run_reactor``: no
    primitive -> kill)."""
    if assoc.is_established:
        return
    waiting = getattr(getattr(assoc, "dul", None), "to_user_queue", None)
    if waiting is not None:
        waiting.put(None)


@dataclass
class _Connection:
    """What the watchdog knows of one connection: since when it is open and when it last completed a PDU."""

    assoc: object
    sock: socket.socket
    address: str
    opened: float
    progress: float  # monotonic time of the last complete PDU (or header) read, or PDU sent
    reading: bool = False  # a read is under way: the peer owes us bytes
    busy: int = 0  # our handlers are working on its request: the peer waits for us
    dropped: bool = False

    @property
    def ended(self) -> bool:
        """Its association was rejected, aborted or released (the connection closes or has closed)."""
        return self.assoc.is_rejected or self.assoc.is_aborted or self.assoc.is_released


class StorageScp:
    """The listening side of the node: ``start`` (non-blocking) and ``stop``."""

    def __init__(self, ae_title: str, host: str, port: int, spool: Spool, audit: AuditLog,
                 allow_ae: tuple[str, ...] = (), on_study: Callable[[str, str], None] | None = None,
                 min_free_mb: float = 0.0, negotiation_s: float = NEGOTIATION_S, max_instance_mb: float = 64.0,
                 tls: TlsFiles | None = None, idle_s: float = IDLE_S, association_s: float = ASSOCIATION_S,
                 max_pdu_kb: float = MAX_PDU_KB):
        self.ae_title, self.host, self.port = ae_title, host, port
        self.tls = tls
        self.min_free_mb, self.negotiation_s, self.max_instance_mb = min_free_mb, negotiation_s, max_instance_mb
        self.idle_s, self.association_s, self.max_pdu = idle_s, association_s, int(max_pdu_kb * 1024)
        self.max_associations, self.max_negotiating = MAX_ASSOCIATIONS, MAX_NEGOTIATING
        self._connections: dict[int, _Connection] = {}
        self._watchdog: threading.Thread | None = None
        self._stopping = threading.Event()
        self._receiving: dict[int, int] = {}  # bytes received per association since its last C-STORE
        self.spool, self.audit, self.allow_ae = spool, audit, allow_ae
        self.on_study = on_study or (lambda study_uid, state: None)
        self._server = None
        self._counts: dict[int, dict[str, int]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ handlers

    def _peer(self, event) -> dict:
        req = event.assoc.requestor
        return {"calling_ae": req.ae_title, "address": f"{req.address}:{req.port}"}

    def _count(self, event, key: str) -> None:
        with self._lock:
            counts = self._counts.setdefault(id(event.assoc), {"stored": 0, "refused": 0})
            counts[key] = counts.get(key, 0) + 1

    def _on_connection(self, event) -> None:
        """Watch a new connection (it holds an association slot until it ends) and bound its PDUs' length.

        pynetdicom reads a PDU to its end before it looks at any timer, bounding only each recv by the
        network timeout, and reads a PDU's whole announced length into memory: a peer sending one byte
        now and then would hold its slot for ever, and a length field of 4 GB would be read as such.
        The association's socket reads go through ``_bounded_recv``, which refuses a length over the
        maximum and times each read for the watchdog (``_watch``), which shuts down the socket of a
        connection over its deadlines: that ends the read, and the association with it.
        """
        assoc = event.assoc
        transport = assoc.dul.socket
        now = time.monotonic()
        conn = _Connection(assoc, transport.socket, "{}:{}".format(*event.address[:2]), now, now)
        with self._lock:
            self._connections[id(assoc)] = conn
            making_room = self._making_room(conn, now)
        for oldest, why in making_room:
            self._drop(oldest, f"its association request incomplete after {now - oldest.opened:.1f} s while {why}: "
                               f"the oldest makes room")
        _await_threads([oldest.assoc for oldest, _ in making_room], ROOM_WAIT_S)
        recv, send = transport.recv, transport.send

        header = bytearray(1)  # the type of the PDU being read (pynetdicom reads its 6-byte header, then the rest)

        def bounded_recv(nr_bytes: int) -> bytearray:
            limit = self.max_pdu if header[0] == 0x04 else max(self.max_pdu, OTHER_PDU_BYTES)
            if nr_bytes > limit:  # the 4-byte length field of the PDU whose header was just read
                name = _PDU_NAMES.get(header[0], f"0x{header[0]:02X}")
                why = (f"the node's maximum of {limit} (max_pdu_kb {self.max_pdu / 1024:g})" if header[0] == 0x04
                       else f"the node's limit of {limit} for a PDU other than P-DATA-TF")
                self._drop(conn, f"{name} PDU of {nr_bytes} bytes announced, over {why}")
                return bytearray()  # pynetdicom: "shorter than expected", the connection closes
            conn.reading = True
            try:
                data = recv(nr_bytes)
            finally:
                conn.reading, conn.progress = False, time.monotonic()
            if nr_bytes == 6 and data:
                header[0] = data[0]
            return data

        def timed_send(data: bytes) -> None:
            send(data)
            conn.progress = time.monotonic()

        transport.recv, transport.send = bounded_recv, timed_send

    def _making_room(self, new: _Connection, now: float) -> list[tuple[_Connection, str]]:
        """The connections still negotiating to close, oldest first, and why, so that at most ``max_negotiating``
        negotiate and one slot stays free for the new connection (the lock held).

        pynetdicom counts a connection against ``maximum_associations`` from the moment it is accepted, so
        peers that open connections and never finish their request would fill every slot and refuse all
        senders ("local limit exceeded") for as long as they keep at it. A real sender's request takes
        milliseconds, so only connections negotiating for over ``MIN_NEGOTIATING_S`` are closed (a burst
        of senders connecting at once never closes one of its own), the ones waiting longest first.
        """
        open_ = [c for c in self._connections.values() if not c.dropped and not c.ended]
        negotiating = sum(not c.assoc.is_established for c in open_)
        slow = sorted((c for c in open_ if c is not new and not c.assoc.is_established
                       and now - c.opened > MIN_NEGOTIATING_S), key=lambda c: c.opened)
        closing: list[tuple[_Connection, str]] = []
        for conn in slow:
            if negotiating > self.max_negotiating:
                why = f"more than {self.max_negotiating} connections were negotiating"
            elif len(open_) >= self.max_associations:  # one spare: a closed connection's thread ends a moment later
                why = f"all {self.max_associations} association slots were taken"
            else:
                break
            closing.append((conn, why))
            negotiating -= 1
            open_.remove(conn)
        return closing

    def _overdue(self, conn: _Connection, now: float) -> str | None:
        """Why a connection must be closed now (None: it may go on)."""
        if conn.ended:
            return None
        if not conn.assoc.is_established:
            if now - conn.opened > self.negotiation_s:
                return f"no complete association request within {self.negotiation_s:g} s"
            return None
        if now - conn.opened > self.association_s:
            return f"association open over {self.association_s:g} s (association_s)"
        if not conn.busy and now - conn.progress > self.idle_s:
            if conn.reading:
                return f"a PDU trickling in: not complete after {self.idle_s:g} s (idle_s)"
            return f"idle for {self.idle_s:g} s (idle_s)"
        return None

    def _watch(self) -> None:
        """The watchdog thread: every quarter second, close the connections over a deadline."""
        while not self._stopping.wait(0.25):
            now = time.monotonic()
            with self._lock:
                conns = list(self._connections.values())
            for conn in conns:
                reason = None if conn.dropped else self._overdue(conn, now)
                if reason:
                    self._drop(conn, reason)

    def _drop(self, conn: _Connection, reason: str) -> None:
        """Shut the connection's socket down (its read ends, and the association) and audit why, once."""
        with self._lock:  # the watchdog and the association's own read may both get here
            if conn.dropped:
                return
            conn.dropped = True
        try:
            _cut(conn.sock)
        except OSError:
            return  # already closed
        _wake_acceptor(conn.assoc)
        self.audit.write("association_dropped", address=conn.address, reason=reason)

    def _on_data(self, event) -> None:
        """Count a PDU's bytes; an association sending far more than the cap for one data set is closed."""
        key = id(event.assoc)
        with self._lock:
            received = self._receiving[key] = self._receiving.get(key, 0) + len(event.data)
        if received > 2 * self.max_instance_mb * 1e6 + 1e6:
            with self._lock:
                self._receiving[key] = -(1 << 62)  # drop once
            try:
                _cut(event.assoc.dul.socket.socket)
            except (AttributeError, OSError):
                return
            self.audit.write("association_dropped", **self._peer(event),
                             reason=f"over {2 * self.max_instance_mb:g} MB for one data set (the cap is "
                             f"{self.max_instance_mb:g} MB)")

    def _on_established(self, event) -> None:
        self.audit.write("association", **self._peer(event), called_ae=self.ae_title)

    def _on_rejected(self, event) -> None:
        """Audit a rejected association with pynetdicom's reason (it checks the slots after the allow-list)."""
        ae = event.assoc.ae
        if len([a for a in ae.active_associations if a.is_acceptor]) > ae.maximum_associations:
            reason = f"local limit exceeded ({ae.maximum_associations} associations at once)"
        else:
            reason = "calling AE title not on the allow-list"
        self.audit.write("association_rejected", **self._peer(event), reason=reason)

    def _on_closed(self, event) -> None:
        with self._lock:
            self._connections.pop(id(event.assoc), None)
            counts = self._counts.pop(id(event.assoc), {"stored": 0, "refused": 0})
            self._receiving.pop(id(event.assoc), None)
        self.audit.write("association_closed", **self._peer(event), how=event.event.name, **counts)

    def _on_connection_closed(self, event) -> None:
        with self._lock:
            self._connections.pop(id(event.assoc), None)

    def _on_echo(self, event) -> int:
        return 0x0000

    def _refuse(self, event, code: int, reason: str, sop_class: str, sop_uid: str) -> Dataset:
        self._count(event, "refused")
        self.audit.write("instance_refused", **self._peer(event), sop_class=sop_class, sop_uid=sop_uid,
                         status=f"0x{code:04X}", reason=reason)
        return _status(code, reason)

    def _on_store(self, event) -> Dataset:
        """Store a C-STORE's data set; while it runs the peer waits for us and is not idle."""
        conn = self._connections.get(id(event.assoc))
        if conn is not None:
            conn.busy += 1
        try:
            return self._store(event)
        finally:
            if conn is not None:
                conn.busy -= 1
                conn.progress = time.monotonic()

    def _store(self, event) -> Dataset:
        request = event.request
        sop_class = str(request.AffectedSOPClassUID)
        sop_uid = str(request.AffectedSOPInstanceUID)
        if sop_class != CT_IMAGE_STORAGE:
            from pynetdicom.sop_class import uid_to_sop_class

            name = getattr(uid_to_sop_class(sop_class), "name", "") or sop_class
            return self._refuse(event, SOP_CLASS_NOT_SUPPORTED, f"{name} not accepted: CT images only",
                                sop_class, sop_uid)
        with self._lock:
            self._receiving[id(event.assoc)] = 0
        path = Path(event.dataset_path)  # the data set is received into a file, never whole in memory
        size_mb = path.stat().st_size / 1e6
        if size_mb > self.max_instance_mb:
            return self._refuse(event, OUT_OF_RESOURCES, f"data set of {size_mb:.0f} MB, over the node's cap of "
                                f"{self.max_instance_mb:g} MB", sop_class, sop_uid)
        free = self.spool.free_mb()
        if free < self.min_free_mb:  # keep room for the database, the audit log and the running jobs
            return self._refuse(event, OUT_OF_RESOURCES, f"spool disk low: {free:.0f} MB free, below "
                                f"{self.min_free_mb:.0f} MB", sop_class, sop_uid)
        syntax = str(event.context.transfer_syntax)
        try:
            ds = dcmread(path, defer_size=4096)  # large values stay on disk until they are used
            reason = check_ct(ds, sop_uid, syntax)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged data
            return self._refuse(event, CANNOT_UNDERSTAND, f"data set cannot be decoded ({type(exc).__name__})",
                                sop_class, sop_uid)
        if reason:
            return self._refuse(event, DOES_NOT_MATCH, reason, sop_class, sop_uid)
        tags = tuple(t for t in CONTRAST_TAGS if str(ds.get(t, "") or "").strip())
        inst = Instance(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), sop_uid, sop_class,
                        str(ds.get("Modality", "") or "").upper(), str(ds.get("SeriesDescription", "") or ""),
                        tags, event.assoc.requestor.ae_title)
        try:
            state = self.spool.store(inst, path)
        except OSError as exc:
            log.error("cannot store %s: %s", sop_uid, exc)
            return self._refuse(event, OUT_OF_RESOURCES, f"spool not writable ({exc.strerror})", sop_class, sop_uid)
        except sqlite3.Error as exc:  # e.g. "database or disk is full"
            log.error("cannot record %s: %s", sop_uid, exc)
            return self._refuse(event, OUT_OF_RESOURCES, f"spool database: {exc}", sop_class, sop_uid)
        self._count(event, "stored")
        if state == "late":  # images a contoured study holds already: counted, one audit line per association
            self._count(event, "already_held")
        self.on_study(inst.study_uid, state)
        return _status(0x0000)

    # ------------------------------------------------------------------ server

    def start(self) -> int:
        """Listen (in background threads); returns the port (useful with port 0)."""
        from pynetdicom import AE, StoragePresentationContexts, _config, evt
        from pynetdicom.sop_class import Verification

        problem, warning = pynetdicom_fit()
        if problem:
            self.audit.write("refused_to_start", reason=problem)
            raise DicomNetworkError(problem)
        if warning:
            log.warning("%s", warning)
            self.audit.write("warning", reason=warning)
        _config.STORE_RECV_CHUNKED_DATASET = True  # C-STORE data sets go to a temporary file, not memory

        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = self.max_associations
        ae.maximum_pdu_size = self.max_pdu  # announced to the peers as the most they may send in one PDU
        ae.acse_timeout = self.negotiation_s  # ARTIM: between the connection and the A-ASSOCIATE-RQ
        # pynetdicom's own idle abort comes after the watchdog's, which audits why
        ae.network_timeout = ae.dimse_timeout = self.idle_s + 5
        syntaxes = accepted_syntaxes()
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        if self.allow_ae:
            ae.require_calling_aet = list(self.allow_ae)
        handlers = [(evt.EVT_CONN_OPEN, self._on_connection), (evt.EVT_DATA_RECV, self._on_data),
                    (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_ESTABLISHED, self._on_established), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_RELEASED, self._on_closed), (evt.EVT_ABORTED, self._on_closed),
                    (evt.EVT_CONN_CLOSE, self._on_connection_closed)]
        self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers,
                                       ssl_context=server_context(self.tls) if self.tls else None)
        self.port = self._server.server_address[1]
        self._stopping.clear()
        self._watchdog = threading.Thread(target=self._watch, name="segrap-scp-watchdog", daemon=True)
        self._watchdog.start()
        return self.port

    def stop(self) -> None:
        """Stop accepting associations, abort the ones still open and close the listening socket."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            for assoc in server.active_associations:  # a sender mid-transfer gets an A-ABORT now, not C-STORE
                _wake_acceptor(assoc)  # one still negotiating ends now, not after acse_timeout
                assoc.abort()  # refusals once the spool has closed (its stored images are kept)
                assoc.join(timeout=10)
        self._stopping.set()
        if self._watchdog is not None:
            self._watchdog.join(5)
            self._watchdog = None
