"""Sending DICOM files to a peer (C-ECHO, then C-STORE): ``segrap send`` and the node's deliveries.

Every failure is a DicomNetworkError naming the peer and what went wrong: no connection, an
association the peer rejected (with its reason), or a store the peer refused (with its status).
Failures that a retry cannot cure (a permanent association rejection, a SOP class the peer does not
accept, a refusal status such as 0x0122 or 0xA9xx) are its subclass DicomRefusedError.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from ..errors import DicomNetworkError, DicomRefusedError, InputError
from .address import Destination, check_ae_title
from .tls import TlsFiles, client_context

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
_BASE_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")  # explicit, implicit VR little endian
# OpenSSL's reasons when one side's certificate is not trusted by the other: the same files fail the same way again
_TLS_UNTRUSTED = re.compile(r"\[SSL: (CERTIFICATE_VERIFY_FAILED|(?:SSLV3|TLSV1|TLSV13)_ALERT_"
                            r"(?:UNKNOWN_CA|BAD_CERTIFICATE|CERTIFICATE_\w+|UNSUPPORTED_CERTIFICATE|ACCESS_DENIED))\]")


@dataclass
class SendReport:
    """What a send did: the SOP instances the peer accepted, and any warnings it answered with."""

    destination: Destination
    sent: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _File:
    path: Path
    sop_class: str
    sop_instance: str
    transfer_syntax: str


def _header(path: Path, strict: bool) -> _File | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        if strict:
            raise InputError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc}).") from exc
        return None
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or getattr(meta, "MediaStorageSOPClassUID", "") or "")
    sop_instance = str(ds.get("SOPInstanceUID", "") or "")
    if not sop_class or not sop_instance or sop_class == "1.2.840.10008.1.3.10":  # DICOMDIR is not sent
        if strict:
            raise InputError(f"{path}: a DICOM file without SOP class or instance UID; it cannot be sent.")
        return None
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or "1.2.840.10008.1.2")
    return _File(path, sop_class, sop_instance, syntax)


def collect_files(paths: Iterable[str | Path]) -> list[_File]:
    """The DICOM files named or found under the folders named (non-DICOM files in folders are skipped)."""
    found: list[_File] = []
    for item in paths:
        path = Path(item)
        if path.is_file():
            found.append(_header(path, strict=True))
        elif path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    entry = _header(Path(root) / name, strict=False)
                    if entry is not None:
                        found.append(entry)
        else:
            raise InputError(f"{path}: no such file or folder.")
    if not found:
        raise InputError(f"No DICOM files in {', '.join(str(p) for p in paths)}.")
    return found


class _Capture(logging.Handler):
    """Collects pynetdicom's error lines (they carry the peer's rejection reason)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def _captured():
    handler = _Capture()
    logger = logging.getLogger("pynetdicom")
    propagate, logger.propagate = logger.propagate, False  # the reasons end up in our own message
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _pynetdicom_ae():
    try:
        from pynetdicom import AE
    except ImportError:
        # a bare "pynetdicom" lets pip pick pynetdicom 3, which pulls pydicom 3 over Slicer 5.10's pydicom 2.4.4 (its
        # DICOM plugins need it): the install hint holds this Python's pydicom where it is
        import importlib.metadata

        try:
            hold = f"pydicom=={importlib.metadata.version('pydicom')}"
        except importlib.metadata.PackageNotFoundError:
            hold = "pydicom>=2.4,<4"
        raise DicomNetworkError(
            "pynetdicom is not installed in this Python. In 3D Slicer, press 'Send to' in the SegRap Segmenter panel, "
            f"which offers an install that keeps Slicer's pydicom, or run in Slicer's Python console: "
            f"slicer.util.pip_install(['pynetdicom>=2.1,<4', '{hold}']). Elsewhere: "
            f"pip install \"pynetdicom>=2.1,<4\" \"{hold}\".") from None
    return AE


def _associate(dest: Destination, calling_ae: str, contexts: Sequence[tuple[str, Sequence[str]]], timeout: float,
               tls: TlsFiles | None = None):
    AE = _pynetdicom_ae()

    ae = AE(ae_title=check_ae_title(calling_ae, "Calling AE title"))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    with _captured() as errors:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                             tls_args=(client_context(tls), None) if tls else None)
    if assoc.is_established:
        return assoc
    detail = "; ".join(line for line in errors.lines if line.startswith(("Result", "Reason")))
    untrusted = [m.group(1) for line in errors.lines for m in [_TLS_UNTRUSTED.search(line)] if m]
    if tls is not None and untrusted:
        whose = ("its certificate is not signed by our CA (tls_ca)" if untrusted[0] == "CERTIFICATE_VERIFY_FAILED"
                 else "it did not accept our certificate (tls_cert)")
        raise DicomRefusedError(f"{dest}: the TLS handshake failed, {whose}: {untrusted[0]}. Check the TLS files "
                                f"for this destination; retrying with the same files cannot help.")
    unreachable = [line for line in errors.lines if "connect" in line.lower() or "TCP" in line]
    if unreachable:
        raise DicomNetworkError(f"{dest}: no DICOM connection ({unreachable[-1]}). Check the host, the port and "
                                f"that the peer is running.")
    if assoc.is_rejected:
        # A-ASSOCIATE-RJ result 1 is "rejected (permanent)": the same request would be rejected again
        permanent = getattr(getattr(assoc.acceptor, "primitive", None), "result", None) == 0x01
        raise (DicomRefusedError if permanent else DicomNetworkError)(
            f"{dest}: the association was rejected ({detail or 'no reason given'}). Check that the peer knows the "
            f"calling AE title {calling_ae!r} and is called {dest.ae_title!r}.")
    if assoc.is_aborted:
        raise DicomNetworkError(f"{dest}: the peer aborted the association (no presentation context accepted, or it "
                                f"does not accept these SOP classes).")
    raise DicomNetworkError(f"{dest}: no DICOM connection ({'; '.join(errors.lines[-2:]) or 'connection refused'}). "
                            f"Check the host, the port and that the peer is running.")


def echo(dest: Destination, calling_ae: str = "SEGRAP", timeout: float = 30.0, tls: TlsFiles | None = None) -> None:
    """C-ECHO the peer; DicomNetworkError when it cannot be reached or does not answer with success."""
    assoc = _associate(dest, calling_ae, [(VERIFICATION, _BASE_SYNTAXES)], timeout, tls)
    status = None
    try:
        status = assoc.send_c_echo()
    finally:
        _end(assoc, gracefully=bool(status))  # no answer: abort (a release would wait for one as well)
    code = int(getattr(status, "Status", -1)) if status else -1
    if code != 0:
        raise DicomNetworkError(f"{dest}: C-ECHO failed ({'no answer' if code < 0 else f'status 0x{code:04X}'}).")


def _contexts(files: Sequence[_File]) -> list[tuple[str, list[str]]]:
    by_class: dict[str, list[str]] = {}
    for f in files:
        syntaxes = by_class.setdefault(f.sop_class, list(_BASE_SYNTAXES))
        if f.transfer_syntax not in syntaxes:
            syntaxes.append(f.transfer_syntax)
    if len(by_class) > 127:
        raise InputError(f"{len(by_class)} different SOP classes: one association holds at most 127; send fewer.")
    return [(VERIFICATION, list(_BASE_SYNTAXES))] + list(by_class.items())


def refused_for_good(status: int) -> bool:
    """A C-STORE failure status that resending the same file cannot cure (PS3.4 B.2.3 and C.4.2.1.4).

    0x0122 SOP class not supported, 0x0124 not authorised, 0xA9xx data set does not match the SOP
    class, 0xCxxx cannot understand. The others (0xA7xx out of resources, 0x0110 processing failure,
    ...) may pass on a later attempt and are retried.
    """
    return status in (0x0122, 0x0124) or 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF


def _sop_class_name(uid: str) -> str:
    from pynetdicom.sop_class import uid_to_sop_class

    return getattr(uid_to_sop_class(uid), "name", "") or uid


def _check_accepted(assoc, files: Sequence[_File], dest: Destination) -> None:
    """DicomRefusedError when the peer accepted no presentation context for one of the files' SOP classes."""
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    refused = sorted({f.sop_class for f in files} - accepted)
    if refused:
        names = ", ".join(f"{_sop_class_name(uid)} ({uid})" for uid in refused)
        raise DicomRefusedError(f"{dest}: the peer does not accept {names}: it refused that presentation context. "
                                f"Configure the peer to store this SOP class, or send elsewhere.")


def send_files(paths: Iterable[str | Path], dest: Destination, calling_ae: str = "SEGRAP",
               timeout: float = 30.0, tls: TlsFiles | None = None) -> SendReport:
    """C-ECHO, then C-STORE every DICOM file of ``paths`` in one association (mutual TLS with ``tls``); stops at
    the first refused store."""
    files = collect_files(list(paths))
    report = SendReport(dest)
    assoc = _associate(dest, calling_ae, _contexts(files), timeout, tls)
    # A peer that answered gets a release at the end; after a C-STORE with no answer the association may be
    # half-dead (the peer closed the connection and pynetdicom marks it aborted only moments later), where a
    # release waits up to the ACSE timeout for a reply that cannot come (30 s; 108 s in CI's run under load)
    answered = True
    try:
        status = assoc.send_c_echo()
        if not status or int(status.Status) != 0:
            raise DicomNetworkError(f"{dest}: the association was accepted but C-ECHO failed.")
        _check_accepted(assoc, files, dest)
        for f in files:
            ds = pydicom.dcmread(f.path)
            try:
                status = assoc.send_c_store(ds)
            except ValueError as exc:  # pynetdicom: no accepted context can carry this data set
                raise DicomRefusedError(f"{dest}: {f.path} cannot be sent in this association ({exc}).") from exc
            code = int(getattr(status, "Status", -1)) if status else -1
            if code < 0:
                answered = False
                raise DicomNetworkError(f"{dest}: no answer to the C-STORE of {f.path} (timeout or aborted "
                                        f"association); {len(report.sent)} of {len(files)} files were stored.")
            comment = str(status.get("ErrorComment", "") or "")
            if code != 0 and not 0xB000 <= code <= 0xBFFF and code != 0x0107 and code != 0x0116:
                error = DicomRefusedError if refused_for_good(code) else DicomNetworkError
                raise error(f"{dest}: the peer refused {f.path} (SOP instance {f.sop_instance}) with "
                            f"status 0x{code:04X}{': ' + comment if comment else ''}; "
                            f"{len(report.sent)} of {len(files)} files were stored before it.")
            if code != 0:
                report.warnings.append(f"{f.path}: stored with warning status 0x{code:04X} {comment}".strip())
            report.sent.append(f.sop_instance)
    except BaseException as exc:
        _end(assoc, gracefully=answered and isinstance(exc, DicomNetworkError))  # DicomRefusedError is one
        raise
    _end(assoc, gracefully=True)
    return report


def _end(assoc, gracefully: bool) -> None:
    """Release an association still established, or abort it (which waits for nothing)."""
    if assoc.is_established:
        assoc.release() if gracefully else assoc.abort()
