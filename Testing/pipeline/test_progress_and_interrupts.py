"""Issue 31: progress shows the elapsed time and the time left of each task's sliding window (measured, not stage
weights); Ctrl-C says why the run stopped (Testing/node/test_send_summary.py: `segrap send`'s one line)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from SegRapSegmenterLib import cli
from SegRapSegmenterLib.console import ProgressPrinter, StageEstimate, duration


class Clock:
    """A clock the test sets, so the displayed times are known."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_estimate_comes_from_the_measured_rate_of_the_stage():
    clock = Clock()
    estimate = StageEstimate(clock)
    assert estimate.text(0.0) == ""  # first report: the start
    clock.now += 3
    assert estimate.text(0.02) == ""  # too little progress to say
    clock.now += 7
    assert estimate.left_s(0.25) == pytest.approx(30.0)  # 10 s for a quarter: 30 s for the rest
    assert estimate.text(0.25) == ", about 0:30 left of this task"
    assert duration(3725) == "1:02:05" and duration(65) == "1:05"


def test_stage_lines_carry_the_elapsed_time_and_a_quiet_stage_still_reports(capsys):
    clock = Clock()
    show = ProgressPrinter("segrap segment", clock=clock, tty=False)
    show({"event": "progress", "stage": "model", "fraction": 0.0, "message": "checking the model bundle"})
    clock.now += 5
    show({"event": "progress", "stage": "oar-inference", "fraction": 0.1, "message": "oar: 5% of the sliding window"})
    clock.now += 5
    show({"event": "progress", "stage": "oar-inference", "fraction": 0.2, "message": "oar: 20%"})  # < 15 s: quiet
    clock.now += 16
    show({"event": "progress", "stage": "oar-inference", "fraction": 0.5,
          "message": "oar: 60% of the sliding window, about 0:14 left of this task"})
    show({"event": "done"})
    assert capsys.readouterr().err.splitlines() == [
        "segrap segment [0:00]: checking the model bundle",
        "segrap segment [0:05]: oar: 5% of the sliding window",
        "segrap segment [0:26]: oar: 60% of the sliding window, about 0:14 left of this task",
        "segrap segment: finished in 0:26"]


def test_a_real_run_reports_the_time_left_of_its_sliding_window(heldout_case, tmp_path, capsys):
    """The small phantom is one tile of the demo model: stacked twice along z, at step 0.25 it is five."""
    import numpy as np
    import SimpleITK as sitk

    _, paths = heldout_case
    small = sitk.ReadImage(str(paths.contrast_ct))
    array = sitk.GetArrayFromImage(small)
    tall = sitk.GetImageFromArray(np.concatenate([array, array], axis=0))
    # the size differs from the small image's, so its geometry is copied field by field
    tall.SetSpacing(small.GetSpacing())
    tall.SetOrigin(small.GetOrigin())
    tall.SetDirection(small.GetDirection())
    image = tmp_path / "tall.nii.gz"
    sitk.WriteImage(tall, str(image))
    rc = cli.main(["segment", "--contrast-ct", str(image), "--out", str(tmp_path / "out"), "--bundle", "demo",
                   "--device", "cpu", "--step", "0.25", "--json"])
    assert rc == 0
    messages = [json.loads(line).get("message", "") for line in capsys.readouterr().out.splitlines()]
    window = [m for m in messages if "of the sliding window" in m]
    assert len(window) >= 4 and any("left of this task" in m for m in window), window


def _segment_until_inference(paths, out) -> subprocess.Popen:
    """`segrap segment --json` on the case's CT, returned once Task 1's inference has started."""
    proc = subprocess.Popen([sys.executable, "-m", "SegRapSegmenterLib.cli", "segment", "--ct", str(paths.ct),
                             "--out", str(out), "--bundle", "demo", "--device", "cpu", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if json.loads(line).get("stage") == "oar-inference":
            break
    return proc


@pytest.mark.skipif(os.name == "nt", reason="SIGINT to one process (Ctrl-C reaches the console group on Windows)")
def test_ctrl_c_says_the_run_was_interrupted(heldout_case, tmp_path):
    _, paths = heldout_case
    out = tmp_path / "out"
    proc = _segment_until_inference(paths, out)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends the CLI (the worker has a session of its own)
    assert proc.wait(timeout=60) == cli.EXIT_INTERRUPTED
    err = proc.stderr.read()
    assert "segrap segment: interrupted (Ctrl-C); cancelled, no output written" in err, err
    assert "segrap segment: ;" not in err and not out.exists()


def test_on_a_terminal_the_elapsed_time_runs_on_through_a_quiet_stage(capsys):
    clock = Clock()
    show = ProgressPrinter("segrap segment", clock=clock, tty=True, tick_s=0)  # redrawn by hand here
    show({"event": "progress", "stage": "write", "fraction": 0.95, "message": "writing the outputs"})
    clock.now += 35
    show.redraw()  # what the ticker does every second
    err = capsys.readouterr().err
    assert "\rsegrap segment [0:00] writing the outputs" in err and "\rsegrap segment [0:35] writing the outputs" in err
    show({"event": "done"})
    assert capsys.readouterr().err == "\nsegrap segment: finished in 0:35\n"
    show.redraw()
    assert capsys.readouterr().err == ""  # nothing is drawn after the end


@pytest.mark.skipif(os.name == "nt", reason="SIGSTOP/SIGCONT hold the CLI process still (POSIX)")
def test_a_sigterm_after_the_outputs_are_in_place_says_they_are_complete(heldout_case, tmp_path):
    """The race of issue 28 (14g): the worker moved its outputs into --out, the signal came before the CLI heard
    'done', and the CLI said 'no output written'. Held still (SIGSTOP) until the worker's provenance is in place,
    then stopped by SIGTERM, the CLI now says what --out holds."""
    import time

    _, paths = heldout_case
    out = tmp_path / "out"
    proc = _segment_until_inference(paths, out)
    proc.send_signal(signal.SIGSTOP)  # the CLI hears nothing more; its worker (a session of its own) goes on
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("*.provenance.json")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(out.glob("*.provenance.json")), "the worker did not finish its outputs"
        proc.send_signal(signal.SIGTERM)
    finally:
        proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=60) == cli.EXIT_INTERRUPTED
    err = proc.stderr.read()
    assert "no output written" not in err, err
    assert "stopped by SIGTERM after this run's outputs were in place" in err and "the set is complete" in err, err
    assert ".seg.nrrd" in err and ".provenance.json" in err


def test_a_stop_while_outputs_are_moved_says_the_set_is_incomplete(tmp_path):
    """Files moved in by the run without the provenance (moved last): an incomplete set, said so; older files and
    staging folders are not counted as this run's."""
    import time

    out = tmp_path / "out"
    out.mkdir()
    (out / "older.seg.nrrd").write_bytes(b"earlier run")
    os.utime(out / "older.seg.nrrd", ns=(1, 1))
    started = time.time_ns()
    (out / "case.seg.nrrd").write_bytes(b"this run")
    (out / ".segrap-partial-case.1-0123abcd").mkdir()
    message = cli.cancelled_message("segrap segment", "stopped by SIGTERM", out, started)
    assert message == (f"segrap segment: stopped by SIGTERM while this run's outputs were being moved into place: "
                       f"{out} holds case.seg.nrrd without its provenance, an incomplete set; run the case again")
    assert cli.cancelled_message("x", "interrupted (Ctrl-C)", tmp_path / "none", started) == \
        "x: interrupted (Ctrl-C); cancelled, no output written"
