"""Issue 29, item 4: the tests' PostgreSQL peer starts a real server of its own, and it does what the node's queue
will rely on: two connections that claim with SELECT ... FOR UPDATE SKIP LOCKED get two different rows."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from postgres_peer import postgres_server, postgres_url  # noqa: F401  (fixtures)


def _psycopg():
    """The PostgreSQL driver of the test extra; its absence skips, or fails under SEGRAP_REQUIRE_PEERS=1."""
    try:
        import psycopg
    except ImportError:
        message = "psycopg is not installed (pip install -e '.[test]')"
        if os.environ.get("SEGRAP_REQUIRE_PEERS") == "1":
            pytest.fail(message + ", and SEGRAP_REQUIRE_PEERS=1 makes its absence a failure")
        pytest.skip(message)
    return psycopg


def test_the_peer_is_a_fresh_database_on_a_loopback_port(postgres_server, postgres_url):
    psycopg = _psycopg()
    url = urlsplit(postgres_url)
    assert (url.scheme, url.hostname, url.username) == ("postgresql", "127.0.0.1", "segrap")
    assert url.port == postgres_server.port
    with socket.create_connection(("127.0.0.1", url.port), timeout=5):
        pass  # it listens there
    with psycopg.connect(postgres_url) as conn:
        database, tables = conn.execute("SELECT current_database(), (SELECT count(*) FROM pg_tables "
                                        "WHERE schemaname = 'public')").fetchone()
        version = conn.info.server_version
    assert database == url.path.lstrip("/") and tables == 0
    assert version >= 90500  # SKIP LOCKED is PostgreSQL 9.5 and later
    assert (postgres_server.data / "postmaster.pid").is_file()


def test_two_connections_claim_two_different_rows_with_skip_locked(postgres_url):
    psycopg = _psycopg()
    with psycopg.connect(postgres_url, autocommit=True) as setup:
        setup.execute("CREATE TABLE jobs (id serial PRIMARY KEY, study text NOT NULL, state text NOT NULL "
                      "DEFAULT 'queued')")
        setup.execute("INSERT INTO jobs (study) VALUES ('1.2.3.1'), ('1.2.3.2'), ('1.2.3.3')")
    claim = ("SELECT id, study FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED")
    with psycopg.connect(postgres_url) as first, psycopg.connect(postgres_url) as second:
        one = first.execute(claim).fetchone()  # first's transaction stays open: the row stays locked
        two = second.execute(claim).fetchone()
        assert one is not None and two is not None
        assert one[0] != two[0], "SKIP LOCKED gave the second worker the row the first holds"
        # without SKIP LOCKED the second would wait for the first: NOWAIT shows the row is really locked
        with pytest.raises(psycopg.errors.LockNotAvailable):
            with second.transaction():
                second.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE NOWAIT", (one[0],))
        first.execute("UPDATE jobs SET state = 'running' WHERE id = %s", (one[0],))
        first.commit()
        second.execute("UPDATE jobs SET state = 'running' WHERE id = %s", (two[0],))
        second.commit()
    with psycopg.connect(postgres_url) as check:
        rows = check.execute("SELECT id, state FROM jobs ORDER BY id").fetchall()
    assert rows == [(one[0], "running"), (two[0], "running"), (3, "queued")]


@pytest.mark.parametrize("required", [False, True])
def test_without_postgresql_the_peer_skips_with_the_reason_or_fails_when_required(tmp_path, required):
    """A machine without PostgreSQL: the fixture's own session, in a pytest of its own, with no server found."""
    (tmp_path / "test_inner.py").write_text(
        "import postgres_peer\n"
        "from postgres_peer import postgres_server  # noqa: F401\n"
        "postgres_peer.postgres_bin_dir = lambda: None  # as on a machine without the package\n"
        "def test_uses_the_peer(postgres_server):\n"
        "    raise AssertionError('ran without a server')\n")
    env = {k: v for k, v in os.environ.items() if k != "SEGRAP_REQUIRE_PEERS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    if required:
        env["SEGRAP_REQUIRE_PEERS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--rootdir",
                           str(tmp_path), str(tmp_path / "test_inner.py")], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert "PostgreSQL is not installed" in out and "package postgresql" in out
    if required:
        assert proc.returncode == 1 and "1 error" in out and "SEGRAP_REQUIRE_PEERS=1 makes its absence a failure" in out
    else:
        assert proc.returncode == 0 and "1 skipped" in out
