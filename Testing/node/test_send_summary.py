"""Issue 31: `segrap send` prints one summary line per association, not two log lines per file."""

from __future__ import annotations

import subprocess
import sys

from node_peers import free_port
from SegRapSegmenterLib.phantom.dicom_series import write_variant


def test_send_prints_one_summary_line_for_the_association(tmp_path, storescp_factory):
    written = write_variant("standard", tmp_path / "study", slices=12)
    scp = storescp_factory(tmp_path / "received", free_port())
    proc = subprocess.run([sys.executable, "-m", "SegRapSegmenterLib.cli", "send", str(written.ct_dir),
                           "--to", scp.destination], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sent 12 file(s) to {scp.destination} in one association"), lines
    assert len(scp.files()) == 12
