"""DICOM network addresses: ``AE@HOST:PORT`` strings and AE title rules (PS3.5 6.2: AE VR)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError
from .tls import TlsFiles


def check_ae_title(title: str, what: str = "AE title") -> str:
    """The AE title, stripped; InputError when it is empty, longer than 16 characters or not printable ASCII."""
    text = str(title).strip()
    if not text or len(text) > 16 or "\\" in text or not all(32 <= ord(c) < 127 for c in text):
        raise InputError(f"{what} {title!r}: an AE title is 1 to 16 printable ASCII characters without a backslash.")
    return text


@dataclass(frozen=True)
class Destination:
    """A DICOM peer to C-STORE to (or to listen as); ``tls``: the files of mutual TLS to it (None: plain TCP)."""

    ae_title: str
    host: str
    port: int
    tls: TlsFiles | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_destination(text: str) -> Destination:
    """``AE@HOST:PORT`` as a Destination; InputError naming the part that is wrong."""
    value = str(text).strip()
    ae, at, rest = value.partition("@")
    host, colon, port = rest.rpartition(":")
    if not at or not colon or not host:
        raise InputError(f"Destination {text!r}: write AE@HOST:PORT, e.g. TPS@10.0.0.5:104.")
    try:
        number = int(port)
    except ValueError:
        number = 0
    if not 0 < number < 65536:
        raise InputError(f"Destination {text!r}: the port must be a number from 1 to 65535.")
    return Destination(check_ae_title(ae, f"Destination {text!r}: AE title"), host.strip("[]"), number)
