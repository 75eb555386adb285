"""Bringing an untrusted bundle's files into a work folder: from a folder, a zip or a URL, within limits.

Every file must be one the manifest lists, at a plain relative path (no ``..``, no absolute or
drive paths, no links); sizes are checked against the limits (and the free disk) before anything
is written: a zip's declared sizes, its records lying apart (no shared bytes), each large entry's
compression ratio and the ratio over all entries together, a folder's file sizes, a download's
announced length, and every byte as it arrives. Downloads are https (plain http only when asked),
follow redirects only to the same scheme and host, and stop at a size cap and a deadline that
covers the connection, the TLS handshake and the headers as well as the body.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import select
import shutil
import socket
import stat
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import Cancelled, ModelError

MANIFEST_NAME = "segrap-model.json"
GiB = 1 << 30


def _env_bytes(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        raise ModelError(f"{name}={os.environ[name]!r} is not a number of bytes.") from None


@dataclass(frozen=True)
class Limits:
    """What an install may spend; the defaults fit a five-fold, two-task nnU-Net bundle many times over."""

    bundle_bytes: int = 32 * GiB  # all files together
    file_bytes: int = 8 * GiB  # any one file
    manifest_bytes: int = 16 << 20
    compression_ratio: float = 200.0  # a zip entry's declared size over its compressed size (entries over 1 MiB)
    zip_ratio: float = 10.0  # all entries' declared sizes over the zip's size (a real bundle: about 1.1)
    zip_ratio_floor: int = 16 << 20  # below this many bytes in all, a zip may inflate more (small JSON bundles)
    download_s: float = 6 * 3600.0  # the whole download
    read_timeout_s: float = 60.0  # one read of the response

    @classmethod
    def from_env(cls) -> "Limits":
        """The defaults, with SEGRAP_MAX_BUNDLE_BYTES / SEGRAP_MAX_BUNDLE_FILE_BYTES when set."""
        return cls(bundle_bytes=_env_bytes("SEGRAP_MAX_BUNDLE_BYTES", cls.bundle_bytes),
                   file_bytes=_env_bytes("SEGRAP_MAX_BUNDLE_FILE_BYTES", cls.file_bytes))


def plain_relative(path: str, where: str) -> PurePosixPath:
    """A manifest path as a plain relative POSIX path inside the bundle, or a ModelError naming it."""
    text = str(path)
    parts = PurePosixPath(text).parts
    if (not text or "\\" in text or "\0" in text or text.startswith("/") or ":" in text
            or any(p in ("", ".", "..") for p in text.split("/"))):
        raise ModelError(f"{where}: refused: {text!r} is not a plain relative path inside the bundle "
                         f"(no '..', '.', absolute, drive or backslash paths).")
    return PurePosixPath(*parts)


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _check_total(total: int, limits: Limits, where: str, target: Path) -> None:
    if total > limits.bundle_bytes:
        raise ModelError(f"{where}: refused: the bundle's files add up to {total / GiB:.2f} GiB, over the limit of "
                         f"{limits.bundle_bytes / GiB:.2f} GiB (SEGRAP_MAX_BUNDLE_BYTES).")
    free = _free_bytes(target)
    if total > free:
        raise ModelError(f"{where}: the bundle needs {total / GiB:.2f} GiB and {target} has only "
                         f"{free / GiB:.2f} GiB free.")


def _manifest_files(data: bytes, where: str) -> set[str]:
    """The relative paths a manifest lists (its 'files'), each checked to be plain."""
    try:
        manifest = json.loads(data)
        files = manifest["files"]
        if not isinstance(files, Mapping):
            raise TypeError("'files' is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{where}: the manifest {MANIFEST_NAME} cannot be read ({exc}).") from None
    return {plain_relative(p, where).as_posix() for p in files}


# --------------------------------------------------------------------------------------------
# Zip
# --------------------------------------------------------------------------------------------

LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes of fields, name length, extra length


def check_records_apart(path: Path, zf: zipfile.ZipFile, where: str | None = None) -> None:
    """Refuse a zip whose records share bytes: each record's header and data lie apart, before the directory.

    Two directory entries pointing at the same bytes let a reader that trusts the directory (torch's
    does) load the same megabytes many times over: a 10 MiB checkpoint loaded as 2 GiB. With records
    apart, everything read from the zip is at most the file's own size.
    """
    where = where or str(path)
    spans = []
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        for info in zf.infolist():
            fh.seek(info.header_offset)
            header = fh.read(LOCAL_HEADER.size)
            if len(header) < LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                raise ModelError(f"{where}: refused: record {info.filename!r} has no local header at offset "
                                 f"{info.header_offset}; a damaged or crafted zip.")
            _, name_length, extra_length = LOCAL_HEADER.unpack(header)
            end = info.header_offset + LOCAL_HEADER.size + name_length + extra_length + info.compress_size
            spans.append((info.header_offset, end, info.filename))
    spans.sort()
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise ModelError(f"{where}: refused: records {name!r} and {other!r} overlap (one starts at byte "
                             f"{start}, before the other ends at {end}); a crafted zip that reads the same bytes more than once.")
    directory = getattr(zf, "start_dir", size)
    if spans and spans[-1][1] > min(directory, size):
        raise ModelError(f"{where}: refused: record {spans[-1][2]!r} runs past the zip's directory or end "
                         f"({spans[-1][1]} > {min(directory, size)} bytes).")


def extract_zip(archive: Path, target: Path, limits: Limits) -> Path:
    """Extract a bundle zip into ``target`` after checking every entry; returns the bundle's folder in it."""
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            manifests = [i for i in infos if PurePosixPath(i.filename).name == MANIFEST_NAME
                         and len(PurePosixPath(i.filename).parts) <= 2]
            if len(manifests) != 1:
                raise ModelError(f"{archive}: no {MANIFEST_NAME} at the top of the zip or in exactly one folder "
                                 f"below it.")
            manifest = manifests[0]
            prefix = PurePosixPath(manifest.filename).parent.as_posix()
            prefix = "" if prefix == "." else prefix + "/"
            if manifest.file_size > limits.manifest_bytes:
                raise ModelError(f"{archive}: refused: its manifest declares {manifest.file_size} bytes.")
            check_records_apart(archive, zf)
            listed = _manifest_files(zf.read(manifest), f"{archive}:{manifest.filename}")
            total = 0
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                twice = sorted({n for n in names if names.count(n) > 1})
                raise ModelError(f"{archive}: refused: entries appear more than once ({', '.join(twice[:3])}).")
            for info in infos:
                name = info.filename
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise ModelError(f"{archive}: refused: entry {name!r} is a link; bundles may not contain links.")
                if not name.startswith(prefix):
                    raise ModelError(f"{archive}: refused: entry {name!r} is outside the bundle folder {prefix!r}.")
                rel = plain_relative(name[len(prefix):], f"{archive}: entry").as_posix()
                if info is not manifest and rel not in listed:
                    raise ModelError(f"{archive}: refused: entry {name!r} is not listed in the manifest.")
                if info.file_size > limits.file_bytes:
                    raise ModelError(f"{archive}: refused: entry {name!r} declares {info.file_size / GiB:.2f} GiB, "
                                     f"over the per-file limit of {limits.file_bytes / GiB:.2f} GiB.")
                ratio = info.file_size / max(info.compress_size, 1)
                if info.file_size > (1 << 20) and ratio > limits.compression_ratio:
                    raise ModelError(f"{archive}: refused: entry {name!r} inflates {ratio:.0f}-fold "
                                     f"({info.compress_size} -> {info.file_size} bytes; the limit is "
                                     f"{limits.compression_ratio:.0f}): a zip bomb, not model files.")
                total += info.file_size
            size = archive.stat().st_size
            if total > max(limits.zip_ratio_floor, limits.zip_ratio * size):
                raise ModelError(f"{archive}: refused: its {len(infos)} entries inflate to {total / 2**20:.1f} MiB "
                                 f"from a {size / 2**20:.1f} MiB zip ({total / max(size, 1):.0f}-fold; the limit is "
                                 f"{limits.zip_ratio:.0f}-fold over all entries): a zip bomb, not model files.")
            _check_total(total, limits, str(archive), target)
            for info in infos:
                rel = plain_relative(info.filename[len(prefix):], str(archive))
                destination = target.joinpath(*rel.parts)
                destination.parent.mkdir(parents=True, exist_ok=True)
                # zipfile stops at the declared size and checks the CRC, so a lying header cannot write more
                with zf.open(info) as src, open(destination, "xb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # a damaged directory, deflate stream or entry
        raise ModelError(f"{archive}: not a valid zip file ({exc}).") from exc
    except (NotImplementedError, RuntimeError) as exc:  # an unsupported compression method, an encrypted entry
        raise ModelError(f"{archive}: refused: an entry cannot be unpacked ({exc}); bundle zips hold stored or "
                         f"deflated entries without passwords.") from exc
    return target


# --------------------------------------------------------------------------------------------
# Folder
# --------------------------------------------------------------------------------------------


def copy_folder(source: Path, target: Path, limits: Limits) -> Path:
    """Copy a bundle folder's manifest and listed files into ``target``, refusing links and unlisted files."""
    root = source / MANIFEST_NAME
    if not root.is_file():
        found = [p.parent for p in source.glob(f"*/{MANIFEST_NAME}")]
        if len(found) != 1:
            raise ModelError(f"{source}: no {MANIFEST_NAME} at the top of the folder or in exactly one folder "
                             f"below it.")
        source = found[0]
    present: dict[str, Path] = {}
    total = 0
    for folder, dirs, files in os.walk(source, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            if path.is_symlink() or getattr(path, "is_junction", lambda: False)():  # junctions: Windows
                raise ModelError(f"{path}: refused: a link inside the bundle folder; bundles may not contain links.")
        for name in files:
            path = Path(folder) / name
            mode = path.lstat()
            if not stat.S_ISREG(mode.st_mode):
                raise ModelError(f"{path}: refused: not a regular file.")
            if mode.st_size > limits.file_bytes:
                raise ModelError(f"{path}: refused: {mode.st_size / GiB:.2f} GiB, over the per-file limit of "
                                 f"{limits.file_bytes / GiB:.2f} GiB.")
            present[path.relative_to(source).as_posix()] = path
            total += mode.st_size
    manifest = source / MANIFEST_NAME
    if manifest.stat().st_size > limits.manifest_bytes:
        raise ModelError(f"{manifest}: refused: {manifest.stat().st_size} bytes is not a manifest.")
    listed = _manifest_files(manifest.read_bytes(), str(manifest))
    unlisted = sorted(set(present) - listed - {MANIFEST_NAME})
    if unlisted:
        raise ModelError(f"{source}: refused: file(s) not listed in the manifest: {', '.join(unlisted[:5])}"
                         f"{' ...' if len(unlisted) > 5 else ''}.")
    _check_total(total, limits, str(source), target)
    for rel, path in present.items():
        destination = target / rel
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination, follow_symlinks=False)
    return target


# --------------------------------------------------------------------------------------------
# URL
# --------------------------------------------------------------------------------------------


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to the same scheme and host; anything else is a ModelError naming both."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urllib.parse.urlparse(req.full_url), urllib.parse.urlparse(newurl)
        if (old.scheme, old.netloc) != (new.scheme, new.netloc):
            raise ModelError(f"{req.full_url}: refused: the server redirects to {newurl}, another scheme or host. "
                             f"Install from that address directly if you trust it.")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


Report = Callable[[str, "float | None"], None]  # message, fraction done (None: not known)


class _Watch:
    """A download's watchdog: past the deadline or on ``should_stop()``, it shuts its connections' sockets down.

    urllib bounds each socket operation by its timeout only, so a server that accepts and then sends
    its headers slowly (or never) outlasts any deadline, and a cancel is not looked at until the body.
    Every connection of the download is made here (``connect``), polled while it is being made, and
    shut down by the watchdog thread, which ends whatever read or handshake is waiting on it.
    """

    def __init__(self, deadline: float, should_stop: Callable[[], bool] | None):
        self.deadline, self.should_stop = deadline, should_stop
        self.reason: str | None = None  # "cancelled" or "deadline" once the watchdog acted
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="segrap-download-watch", daemon=True)

    def __enter__(self) -> "_Watch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(5)
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def due(self) -> str | None:
        """Why the download must stop now (None: it may go on)."""
        if self.should_stop is not None and self.should_stop():
            return "cancelled"
        return "deadline" if time.monotonic() > self.deadline else None

    def _run(self) -> None:
        while not self._done.wait(0.1):
            reason = self.due()
            if reason:
                with self._lock:
                    self.reason = reason
                    for sock in self._sockets:
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                return

    def connect(self, address, timeout=None, source_address=None, *args, **kwargs) -> socket.socket:
        """``socket.create_connection`` whose connecting is polled, and whose socket the watchdog can shut down."""
        host, port = address[:2]
        error: OSError | None = None
        for family, kind, proto, _, addr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            try:
                if source_address:
                    sock.bind(source_address)
                sock.setblocking(False)
                if sock.connect_ex(addr) not in (0, *_IN_PROGRESS):
                    raise OSError(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), f"cannot connect to {addr}")
                while not any(select.select([], [sock], [sock], 0.1)[1:]):  # Windows: a failure is exceptional
                    if self.reason or self.due():
                        raise OSError(f"connecting to {host}:{port} stopped ({self.reason or self.due()})")
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, f"{os.strerror(code)} ({host}:{port})")
                sock.settimeout(timeout)
                with self._lock:
                    if self.reason:
                        raise OSError(f"connecting to {host}:{port} stopped ({self.reason})")
                    self._sockets.append(sock.dup())  # a TLS wrap detaches ``sock``; its duplicate stays ours
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        raise error or OSError(f"{host}:{port}: no address")


_IN_PROGRESS = {errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN, 10035}  # 10035: WSAEWOULDBLOCK (Windows)


class _WatchedConnections:
    """A urllib handler whose HTTP(S) connections are made by a ``_Watch``."""

    def __init__(self, watch: _Watch, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.watch = watch

    def do_open(self, http_class, req, **http_conn_args):
        def connection(host, **kwargs):
            conn = http_class(host, **kwargs)
            conn._create_connection = self.watch.connect  # http.client's hook for making the socket
            return conn

        return super().do_open(connection, req, **http_conn_args)


class _WatchedHTTP(_WatchedConnections, urllib.request.HTTPHandler):
    pass


class _WatchedHTTPS(_WatchedConnections, urllib.request.HTTPSHandler):
    pass


def download(url: str, target: Path, limits: Limits, allow_http: bool = False, report: Report | None = None,
             should_stop: Callable[[], bool] | None = None) -> None:
    """Download ``url`` to ``target``: https (http if ``allow_http``) or file, within the size cap and deadline.

    ``report(message, fraction)`` hears about the bytes so far; ``should_stop()`` returning True stops the
    download with ``Cancelled`` within a tenth of a second, connecting, waiting for headers or reading.
    ``limits.download_s`` bounds it all, from the connection to the last byte.
    """
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme == "http" and not allow_http:
        raise ModelError(f"{url}: refused: plain http can be altered on the way, checksums and all (they travel "
                         f"in the same download); use https, or pass --allow-http on a network you trust.")
    if scheme not in ("https", "http", "file"):
        raise ModelError(f"{url}: unsupported URL scheme {scheme!r}; use https.")
    with _Watch(time.monotonic() + limits.download_s, should_stop) as watch:
        try:
            _fetch(url, target, limits, watch, report)
        except (ModelError, Cancelled):
            raise
        except (OSError, ValueError, urllib.error.URLError, http.client.HTTPException) as exc:
            if (watch.reason or watch.due()) == "cancelled":
                raise Cancelled(f"{url}: download cancelled.") from None
            if watch.reason or watch.due():
                raise ModelError(f"{url}: download took longer than {limits.download_s:g} s (connecting, the "
                                 f"headers and the body); refused.") from None
            raise ModelError(f"{url}: download failed ({exc}).") from exc


def _fetch(url: str, target: Path, limits: Limits, watch: _Watch, report: Report | None) -> None:
    """The download itself, its connections made and watched by ``watch``."""
    opener = urllib.request.build_opener(_SameOriginRedirects, _WatchedHTTP(watch), _WatchedHTTPS(watch))
    cap = min(limits.bundle_bytes, _free_bytes(target.parent))
    written = 0
    with opener.open(url, timeout=min(limits.read_timeout_s, limits.download_s)) as response, \
            open(target, "wb") as fh:
        length = response.headers.get("Content-Length") if hasattr(response, "headers") else None
        if length is not None and length.isdigit() and int(length) > cap:
            raise ModelError(f"{url}: refused: the server announces {int(length) / GiB:.2f} GiB, over the "
                             f"limit of {cap / GiB:.2f} GiB (bundle limit or free disk).")
        read = getattr(response, "read1", response.read)
        total = int(length) if length is not None and length.isdigit() else None
        while True:
            reason = watch.due()
            if reason == "cancelled":
                raise Cancelled(f"{url}: download cancelled.")
            if reason:
                raise ModelError(f"{url}: download took longer than {limits.download_s:g} s "
                                 f"({written} bytes received); refused.")
            block = read(1 << 16)  # what has arrived, so a trickling body still meets the deadline
            if not block:
                break
            written += len(block)
            if written > cap:
                raise ModelError(f"{url}: refused: the download passed {cap / GiB:.2f} GiB (bundle limit or "
                                 f"free disk) and was stopped.")
            fh.write(block)
            if report is not None and (written - len(block)) >> 20 != written >> 20:  # once a MiB
                size = f" of {total / 2**20:.0f}" if total else ""
                report(f"Downloading: {written / 2**20:.0f}{size} MiB", written / total if total else None)
