"""The ``segrap`` process imports nothing from the folder it is started in (issue 28, item 14f).

With an empty PYTHONPATH entry (PYTHONPATH=":" or "dir:") Python puts the current folder on sys.path,
and the console script's first import of json (or argparse, logging) ran a json.py lying there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PLANTED = ("json", "argparse", "logging", "dataclasses", "threading", "hashlib")


def _plant(folder: Path, marker: Path) -> None:
    for name in PLANTED:
        (folder / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\n"
                                           f"raise SystemExit('planted {name}.py ran')\n")


def _segrap() -> Path:
    script = Path(sys.executable).parent / ("segrap.exe" if os.name == "nt" else "segrap")
    if not script.exists():
        pytest.skip("the segrap console script is not installed next to this Python")
    return script


@pytest.mark.parametrize("pythonpath", [":", "", "{here}", os.pathsep + "/no/such/folder"])
@pytest.mark.parametrize("args", [["--version"], ["models", "list"]])
def test_the_segrap_command_ignores_modules_planted_in_the_current_folder(tmp_path, pythonpath, args):
    here, marker = tmp_path / "shared-folder", tmp_path / "planted-modules-ran"
    here.mkdir()
    _plant(here, marker)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    env |= {"PYTHONPATH": pythonpath.replace(":", os.pathsep).format(here=here), "SEGRAP_HOME": str(tmp_path / "home")}
    done = subprocess.run([str(_segrap()), *args], cwd=here, env=env, capture_output=True, text=True, timeout=120)
    assert not marker.exists(), f"planted modules ran: {marker.read_text().split()} ({done.stderr[-500:]})"
    assert done.returncode == 0, done.stderr[-2000:]
    assert "planted" not in done.stderr


def test_a_plain_python_there_does_import_the_planted_module(tmp_path):
    """The hazard is real: the same folder and PYTHONPATH make a plain Python import the planted json.py."""
    here, marker = tmp_path / "shared-folder", tmp_path / "planted-modules-ran"
    here.mkdir()
    _plant(here, marker)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"} | {"PYTHONPATH": os.pathsep}
    subprocess.run([sys.executable, "-c", "import json"], cwd=here, env=env, capture_output=True, timeout=60)
    assert marker.read_text().split() == ["json"]
