"""The CLI's own process only starts and follows the worker: it loads none of the libraries the worker needs.

Every megabyte it holds adds to the run's footprint (bench_segment.py measures the whole process tree),
and Slicer's process, which starts runs the same way, is spared scipy and nnU-Net.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("numpy", "SimpleITK", "scipy", "pydicom", "torch", "nnunetv2", "nrrd")

_PROBE = """
import json, sys
from SegRapSegmenterLib import cli, runner

def started(self):
    print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)))
    raise SystemExit(0)

runner.WorkerRun.start = started  # the moment the worker would start: what has the parent loaded?
cli.main({argv})
"""


def _loaded_before_the_worker_starts(argv: list[str]) -> list[str]:
    code = _PROBE.format(heavy=repr(HEAVY), argv=repr(argv))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_segment_starts_the_worker_without_numpy_simpleitk_or_torch(tmp_path):
    ct = tmp_path / "image.nii.gz"
    ct.write_bytes(b"")  # the parent does not read the image: the worker does
    loaded = _loaded_before_the_worker_starts(["segment", "--ct", str(ct), "--out", str(tmp_path / "out"),
                                               "--tasks", "oar", "--bundle", "demo", "--device", "cpu"])
    assert loaded == []


def test_the_probe_sees_a_heavy_import_when_there_is_one(tmp_path):
    code = _PROBE.format(heavy=repr(HEAVY), argv=repr(["segment", "--ct", "x", "--out", str(tmp_path)]))
    code = "import numpy\n" + code
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["numpy"]


def test_every_subcommand_is_still_offered():
    from SegRapSegmenterLib import cli

    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps the subparsers here
    assert set(commands) == set(cli.COMMANDS)
    assert cli._command_of(["-v", "segment", "--ct", "x"]) == "segment"
    assert cli._command_of(["--help"]) is None
    assert cli._command_of(["nonsense"]) is None
