"""Peers and helpers for the DICOM node tests: a real ``segrap serve`` process, DCMTK, Orthanc, loopback only.

Every wait is bounded and every process a test starts is stopped by its fixture. Tests that need a
peer (DCMTK's storescu/storescp, Orthanc, dciodvfy) skip when it is missing, unless
SEGRAP_REQUIRE_PEERS=1 (set by .ci/run), which turns a missing peer into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from SegRapSegmenterLib.runner import stop_process_tree

PACKAGE_PARENT = Path(__file__).resolve().parents[2] / "SegRapSegmenter"


def _missing(message: str):
    if os.environ.get("SEGRAP_REQUIRE_PEERS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def require(tool: str) -> str:
    """The path of a peer program; skip (or fail under SEGRAP_REQUIRE_PEERS=1) when it is not installed."""
    path = shutil.which(tool)
    if path is None:
        _missing(f"{tool} is not installed (Debian packages dcmtk, orthanc, dicom3tools; .ci/run installs them)")
    return path


def dcmtk(tool: str) -> str:
    """DCMTK's program of that name (pynetdicom installs Python scripts called storescu and storescp too)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(folder) / tool
        if not (path.is_file() and os.access(path, os.X_OK)):
            continue
        try:
            version = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            continue
        if "dcmtk" in (version.stdout + version.stderr).lower():
            return str(path)
    _missing(f"DCMTK's {tool} is not installed (Debian package dcmtk; .ci/run installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.25):
    """Poll ``predicate`` until it returns something true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def audit_events(spool: Path, event: str | None = None) -> list[dict]:
    path = spool / "audit.jsonl"
    if not path.is_file():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if event is None or e["event"] == event]


def dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run([require("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


class NodeProcess:
    """``segrap serve`` in its own process, ready when it answers C-ECHO."""

    def __init__(self, spool: Path, port: int, args: list[str], log: Path):
        self.spool, self.port, self.args, self.log_path = spool, port, args, log
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0, ready_tls=None) -> "NodeProcess":
        """Start and wait for the node's C-ECHO answer (over mutual TLS with ``ready_tls``, a TlsFiles)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self._log = open(self.log_path, "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "SegRapSegmenterLib.cli", "serve", "--host", "127.0.0.1", "--port",
             str(self.port), "--spool", str(self.spool), "--bundle", "demo", "--device", "cpu", *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        from SegRapSegmenterLib.errors import DicomNetworkError
        from SegRapSegmenterLib.node.address import Destination
        from SegRapSegmenterLib.node.scu import echo

        calling = self.args[self.args.index("--allow-ae") + 1] if "--allow-ae" in self.args else "SCANNER"

        def answers() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"segrap serve exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                echo(Destination("SEGRAP", "127.0.0.1", self.port), calling, timeout=5, tls=ready_tls)
            except DicomNetworkError:
                return False
            return True

        wait_until(answers, timeout, "segrap serve to answer C-ECHO", interval=0.5)
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would (the worker it started is left running, as after a real crash)."""
        if self.process and self.process.poll() is None:
            self.orphans = psutil.Process(self.process.pid).children(recursive=True)
            self.process.kill()
            self.process.wait(30)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait for the clean exit; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
            pytest.fail(f"segrap serve did not exit within {timeout:.0f} s of SIGTERM")

    def close(self) -> None:
        if self.process and self.process.poll() is None:
            self.kill()
        for proc in getattr(self, "orphans", []):  # normally already stopped by the restarted node
            try:
                proc.kill()
            except psutil.Error:
                pass
        if getattr(self, "_log", None):
            self._log.close()


class StoreScp:
    """DCMTK's storescp as the treatment planning system: every received file lands in ``folder``."""

    def __init__(self, folder: Path, port: int, ae_title: str = "TPS", options: tuple[str, ...] = ()):
        """``options``: more storescp options, e.g. ``("+uf",)`` to keep every received copy in a file of its own."""
        self.folder, self.port, self.ae_title, self.options = folder, port, ae_title, options
        self.process: subprocess.Popen | None = None

    def start(self) -> "StoreScp":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([dcmtk("storescp"), "-aet", self.ae_title, *self.options, "-od",
                                         str(self.folder), str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self._listening(), 30, "storescp to listen")
        return self

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.glob("*") if p.is_file()) if self.folder.is_dir() else []

    def close(self) -> None:
        if self.process and self.process.poll() is None:
            stop_process_tree(self.process, grace_s=10)

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"


def storescu(folder_or_files, port: int, calling_ae: str = "SCANNER", called_ae: str = "SEGRAP",
             options: tuple[str, ...] = ()):
    """Send with DCMTK's storescu (folders recursively); returns the completed process.

    ``options``: more storescu options, e.g. ``("-R",)`` to propose each file's own (compressed) transfer syntax.
    """
    items = [str(p) for p in (folder_or_files if isinstance(folder_or_files, (list, tuple)) else [folder_or_files])]
    return subprocess.run([dcmtk("storescu"), "-v", "-aet", calling_ae, "-aec", called_ae, "+sd", "+r", *options,
                           "127.0.0.1", str(port), *items], capture_output=True, text=True, timeout=120)




def make_pki(folder: Path) -> dict[str, Path]:
    """A test CA, the node's and a client's certificates signed by it, and a rogue self-signed one (openssl)."""
    openssl = require("openssl")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60, cwd=folder)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=SegRap test CA")
    for name in ("node", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
            f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            f"{name}.crt", "-days", "2")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out", "rogue.crt", "-days", "2",
        "-subj", "/CN=rogue")
    return {p.stem + p.suffix.replace(".", "_"): p for p in folder.iterdir() if p.suffix in (".crt", ".key")}
