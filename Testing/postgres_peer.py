"""A real PostgreSQL for the tests (issue 29): a cluster of its own in a temporary folder, on a free loopback port.

Import the fixtures into a test module (``from postgres_peer import postgres_server, postgres_url``). The server
is Debian's ``postgresql`` package (``/usr/lib/postgresql/<version>/bin``, which .ci/run installs) or any
``pg_ctl`` on PATH. Without it the tests skip and say why, unless SEGRAP_REQUIRE_PEERS=1 makes its absence a
failure, as for the DICOM peers. PostgreSQL refuses to run as root, so under root the server runs as the
``postgres`` system user that Debian's package creates (``runuser -u postgres --``), in a folder it owns.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVER_USER = "postgres"  # the system account Debian's postgresql package makes; used only when we are root
ROLE = "segrap"  # the database superuser initdb creates; trusted on loopback and the socket only


def _absent(message: str) -> None:
    """Skip the test for a missing peer, or fail it when SEGRAP_REQUIRE_PEERS=1."""
    if os.environ.get("SEGRAP_REQUIRE_PEERS") == "1":
        pytest.fail(message + ", and SEGRAP_REQUIRE_PEERS=1 makes its absence a failure")
    pytest.skip(message)


def postgres_bin_dir() -> Path | None:
    """The folder of initdb and pg_ctl: Debian's newest /usr/lib/postgresql/<version>/bin, else pg_ctl on PATH."""
    def version(path: str) -> tuple[int, ...]:
        return tuple(int(v) for v in re.findall(r"\d+", Path(path).parent.parent.name))

    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=version)
    pg_ctl = debian[-1] if debian else shutil.which("pg_ctl")
    if pg_ctl is None:
        return None
    folder = Path(pg_ctl).parent
    return folder if (folder / "initdb").is_file() else None


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresServer:
    """A running throwaway PostgreSQL: where it listens, its files, and how to run its programs."""

    bin_dir: Path
    root: Path  # the temporary folder: data/, the unix socket and the server's log
    port: int
    as_user: list[str]  # ["runuser", "-u", "postgres", "--"] under root, else []

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        """The connection URL of one database of this server, over TCP on loopback."""
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{database}"

    def run(self, program: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run one of the server's programs (as the server's user); a failure raises with its output and the log."""
        proc = subprocess.run([*self.as_user, str(self.bin_dir / program), *args], capture_output=True, text=True,
                              timeout=timeout, cwd=self.root)
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.is_file() else "(no server log)"
            raise RuntimeError(f"{program} {' '.join(args)} failed with exit code {proc.returncode}:\n"
                               f"{proc.stdout}{proc.stderr}\nserver log {self.log}:\n{log}")
        return proc

    def create_database(self, name: str) -> str:
        """Create an empty database and return its URL."""
        self.run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", ROLE, name)
        return self.url(name)


def _start(bin_dir: Path) -> PostgresServer:
    """initdb a cluster in a new temporary folder and start it on a free loopback port with its socket there."""
    root = Path(tempfile.mkdtemp(prefix="segrap-pg-"))  # short: a unix socket's path has ~107 bytes at most
    as_user: list[str] = []
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        runuser = shutil.which("runuser")
        try:
            import pwd

            account = pwd.getpwnam(SERVER_USER)
        except KeyError:
            account = None
        if runuser is None or account is None:
            shutil.rmtree(root)
            _absent(f"PostgreSQL refuses to run as root, and there is no {SERVER_USER!r} user or runuser to run it as "
                    f"(Debian's postgresql package makes the user)")
        os.chown(root, account.pw_uid, account.pw_gid)
        as_user = [runuser, "-u", SERVER_USER, "--"]
    for _ in range(3):  # the free port can be taken between our look and the server's bind: try another
        server = PostgresServer(bin_dir, root, _free_port(), as_user)
        if not server.data.exists():
            try:
                server.run("initdb", "-D", str(server.data), "-U", ROLE, "--auth=trust", "--encoding=UTF8",
                           "--no-locale", "--no-sync", timeout=120)
            except RuntimeError:
                shutil.rmtree(root, ignore_errors=True)
                raise
        try:
            server.run("pg_ctl", "-D", str(server.data), "-l", str(server.log), "-w", "-t", "60", "start", "-o",
                       f"-c listen_addresses=127.0.0.1 -p {server.port} -k {root} -c fsync=off", timeout=90)
            return server
        except RuntimeError as exc:
            log = server.log.read_text(errors="replace") if server.log.is_file() else ""
            if "could not bind" not in log:
                shutil.rmtree(root, ignore_errors=True)
                raise exc
    shutil.rmtree(root, ignore_errors=True)
    raise RuntimeError("PostgreSQL could not bind a free loopback port in three tries")


def _stop(server: PostgresServer) -> None:
    """Stop the server (fast, then immediate) and remove its folder."""
    try:
        server.run("pg_ctl", "-D", str(server.data), "-w", "-t", "30", "-m", "fast", "stop", timeout=60)
    except (RuntimeError, subprocess.TimeoutExpired):
        server.run("pg_ctl", "-D", str(server.data), "-w", "-t", "30", "-m", "immediate", "stop", timeout=60)
    finally:
        if not (server.data / "postmaster.pid").exists():
            shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL for the test session; each test takes a database of its own (``postgres_url``)."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        _absent("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pg_ctl or pg_ctl on PATH; Debian "
                "package postgresql, which .ci/run installs)")
    server = _start(bin_dir)
    try:
        yield server
    finally:
        _stop(server)


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """The URL of a new, empty database for this test: postgresql://segrap@127.0.0.1:PORT/DB."""
    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40] + f"_{os.getpid()}_{id(request) % 10**6}"
    return postgres_server.create_database(name)
