"""Issue 31: a re-run replaces a case's outputs as one set, the provenance lists each output with its sha256,
and a second run of the same case into the same folder stops with exit 8 instead of both failing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from SegRapSegmenterLib import cli
from SegRapSegmenterLib.inference.bundles import sha256_file
from SegRapSegmenterLib.runner import acquire_case_lock, case_lock_path, release_case_lock


def _gtv(paths, out, *extra) -> list[str]:
    return ["segment", "--contrast-ct", str(paths.contrast_ct), "--out", str(out), "--case-id", "c1",
            "--bundle", "demo", "--device", "cpu", *extra]


def test_a_rerun_replaces_the_earlier_set_and_the_provenance_lists_each_output(heldout_case, tmp_path, capsys):
    _, paths = heldout_case
    out = tmp_path / "out"
    assert cli.main(_gtv(paths, out, "--nifti")) == cli.EXIT_OK
    first = json.loads((out / "c1.provenance.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["c1.provenance.json", "c1.seg.nrrd", "c1_gtv_4d.mha",
                                                      "c1_structures"]
    assert "replaced" not in first
    capsys.readouterr()
    (out / f".segrap-partial-c1.999-0123abcd").mkdir()  # the staging folder of a run killed with its caller

    assert cli.main(_gtv(paths, out)) == cli.EXIT_OK  # the same case again, without --nifti
    err = capsys.readouterr().err
    assert "warning: Replaced the outputs of an earlier run of c1" in err and "c1_structures" in err
    assert sorted(p.name for p in out.iterdir()) == ["c1.provenance.json", "c1.seg.nrrd"]
    provenance = json.loads((out / "c1.provenance.json").read_text())
    assert provenance["replaced"] == {"previous_created_utc": first["created_utc"],
                                      "removed": ["c1_structures", "c1_gtv_4d.mha"]}
    assert provenance["outputs"] == {"segmentation": {"file": "c1.seg.nrrd", "sha256": sha256_file(out / "c1.seg.nrrd")}}
    nifti = first["outputs"]["nifti"]
    assert nifti["folder"] == "c1_structures" and sorted(nifti["files"]) == ["GTVnd.nii.gz", "GTVp.nii.gz"]


def test_a_second_run_of_a_locked_case_stops_with_exit_8_and_changes_nothing(heldout_case, tmp_path, capsys):
    _, paths = heldout_case
    out = tmp_path / "out"
    out.mkdir()
    (out / "c1.seg.nrrd").write_text("an earlier result")
    lock = acquire_case_lock(out, "c1", out / ".segrap-partial-c1.1-00000000")
    try:
        assert cli.main(_gtv(paths, out)) == cli.EXIT_BUSY
    finally:
        release_case_lock(lock, succeeded=True)
    err = capsys.readouterr().err
    assert f"case c1 is being written by another run (process {os.getpid()}" in err and "Nothing was changed" in err
    assert sorted(p.name for p in out.iterdir()) == ["c1.seg.nrrd"] and not case_lock_path(out, "c1").exists()
    assert (out / "c1.seg.nrrd").read_text() == "an earlier result"


def test_two_concurrent_runs_of_one_case_never_both_fail(heldout_case, tmp_path):
    _, paths = heldout_case
    out = tmp_path / "out"
    command = [sys.executable, "-m", "SegRapSegmenterLib.cli", *_gtv(paths, out)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes in ([0, 0], [0, 8]), results  # one after the other, or the second told to wait
    assert all("is being written by another run" in err for rc, err in results if rc == 8)
    assert sorted(p.name for p in out.iterdir()) == ["c1.provenance.json", "c1.seg.nrrd"]  # no lock, no staging left
    assert json.loads((out / "c1.provenance.json").read_text())["outputs"]["segmentation"]["sha256"] == \
        sha256_file(out / "c1.seg.nrrd")
