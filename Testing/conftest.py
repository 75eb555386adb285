"""Shared fixtures: phantom cases are deterministic, so each is made once per test session."""

from __future__ import annotations

import pytest
from SegRapSegmenterLib.phantom import cases as phantom


@pytest.fixture(scope="session")
def small_case() -> phantom.PhantomCase:
    """Phantom case 0 of cohort 0, small size, identity direction."""
    return phantom.make_case(0, seed=0, size="small")


@pytest.fixture(scope="session")
def small_cases() -> list[phantom.PhantomCase]:
    """Three small phantom cases of cohort 7 (different anatomy variations and tumours)."""
    return [phantom.make_case(i, seed=7, size="small") for i in range(3)]


@pytest.fixture(scope="session")
def written_case(tmp_path_factory) -> phantom.CasePaths:
    """A small phantom case written in the release layout."""
    root = tmp_path_factory.mktemp("phantom_release")
    return phantom.write_case(phantom.make_case(1, seed=3, size="small"), root)


def _rss_growth_mib(setup: str, hostile: str, env: dict | None = None) -> tuple[int, str, float]:
    """(exit code, stderr, MiB the peak resident memory grew by while ``hostile`` ran after ``setup``).

    Both run in one Python process of its own, which reads its peak (getrusage) after ``setup`` (the
    imports) and after ``hostile``, and exits at once (interpreter shutdown is not measured).
    """
    import os
    import subprocess
    import sys

    code = ("import os, resource, sys, traceback\n"
            f"exec(compile({setup!r}, 'setup', 'exec'))\n"
            "base, rc = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 0\n"
            f"try:\n    exec(compile({hostile!r}, 'hostile', 'exec'))\n"
            "except BaseException:\n    traceback.print_exc()\n    rc = 1\n"
            "sys.stderr.write(f'RSS {base} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n')\n"
            "sys.stderr.flush()\nos._exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **(env or {})})
    marks = [line.split() for line in proc.stderr.splitlines() if line.startswith("RSS ")]
    assert marks, f"the setup code failed:\n{proc.stderr[-3000:]}"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return proc.returncode, proc.stderr, (int(marks[-1][2]) - int(marks[-1][1])) * scale / 2**20


@pytest.fixture()
def rss_growth():
    """Run setup, then hostile code, in a Python of its own: (exit code, stderr, peak RSS growth in MiB)."""
    try:
        import resource  # noqa: F401 - POSIX only
    except ImportError:
        pytest.skip("peak memory is read with the resource module (POSIX)")
    return _rss_growth_mib
