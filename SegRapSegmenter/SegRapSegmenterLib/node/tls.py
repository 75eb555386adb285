"""Mutual TLS for the node and ``segrap send``: only peers with a certificate signed by the given CA get through.

DICOM's secure transport connection profile (PS3.15 B.1, with BCP 195's rules: TLS 1.2 or later)
as DCMTK speaks it (``storescu +tls KEY CERT +cf CA``). Both sides present a certificate and verify
the other's against the CA file. Host names are not checked: DICOM peers are known by their
certificates (issue them from a CA of your own for the scanners, PACS and planning systems).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError


@dataclass(frozen=True)
class TlsFiles:
    """Our certificate and private key (PEM) and the CA certificate(s) that peers must be signed by."""

    cert: Path
    key: Path
    ca: Path


def tls_files(cert, key, ca, where: str = "--tls-cert/--tls-key/--tls-ca") -> TlsFiles | None:
    """The three files, checked to exist; None when none is given; InputError when only some are."""
    given = [v for v in (cert, key, ca) if v]
    if not given:
        return None
    if len(given) != 3:
        raise InputError(f"{where}: give all three (our certificate, our private key, the peers' CA) or none.")
    files = TlsFiles(Path(cert).expanduser(), Path(key).expanduser(), Path(ca).expanduser())
    for path in (files.cert, files.key, files.ca):
        if not path.is_file():
            raise InputError(f"{where}: {path} is not a file.")
    return files


class _HandshakeInThread(ssl.SSLContext):
    """A server context whose handshake happens in the association's thread, not in the accepting one.

    pynetdicom wraps each accepted socket in the thread that accepts connections; a handshake there
    would let one silent client stop every other connection. Deferred, the handshake runs at the
    association's first read, under the SCP's negotiation deadline.
    """

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, *args, **kwargs):
        return super().wrap_socket(sock, server_side, False, *args, **kwargs)


def _context(cls, purpose: int, files: TlsFiles) -> ssl.SSLContext:
    context = cls(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(files.cert, files.key)
        context.load_verify_locations(cafile=str(files.ca))
    except (ssl.SSLError, OSError) as exc:
        raise InputError(f"TLS files {files.cert}, {files.key}, {files.ca}: cannot be loaded ({exc}); give a PEM "
                         f"certificate, its unencrypted private key and the CA certificate.") from exc
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The SCP's context: our certificate, and a client certificate signed by the CA required."""
    return _context(_HandshakeInThread, ssl.PROTOCOL_TLS_SERVER, files)


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """The SCU's context: our certificate, and the server's certificate checked against the CA."""
    context = _context(ssl.SSLContext, ssl.PROTOCOL_TLS_CLIENT, files)
    context.check_hostname = False  # DICOM peers are known by certificate, not by host name
    context.verify_mode = ssl.CERT_REQUIRED
    return context
