"""The worker protocol, cancellation, a killed worker, bad inputs and the CLI's exit codes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from SegRapSegmenterLib import cli, runner
from SegRapSegmenterLib.errors import WorkerError
from SegRapSegmenterLib.pipeline import SegmentRequest
from SegRapSegmenterLib.runner import WorkerRun


def _request(paths, out, **kw) -> SegmentRequest:
    return SegmentRequest(ct=str(paths.ct), contrast_ct=str(paths.contrast_ct), out_dir=str(out), bundle="demo",
                          device="cpu", **kw)


def _run_until(run: WorkerRun, stage_prefix: str) -> list[dict]:
    seen = []
    for event in run.events():
        seen.append(event)
        if event.get("event") == "progress" and event.get("stage", "").startswith(stage_prefix):
            return seen
        if event.get("event") in ("done", "error", "cancelled"):
            break
    raise AssertionError(f"the worker never reached {stage_prefix}: {seen}")


def test_cancel_mid_run_stops_quickly_and_leaves_nothing(heldout_case, tmp_path, monkeypatch):
    """Cancel as on Windows, where no SIGTERM can be sent: the closed stdin alone stops the real worker
    within the grace period, cleanly (its own "cancelled" event and exit code), before any kill."""
    _, paths = heldout_case
    out = tmp_path / "out"
    monkeypatch.setattr(runner, "WINDOWS", True)  # stop_process_tree: no SIGTERM, only the closed stdin
    run = WorkerRun(_request(paths, out), grace_s=30.0).start()
    _run_until(run, "oar-inference")
    t0 = time.monotonic()
    run.cancel()
    rest = list(run.events())
    assert time.monotonic() - t0 < 10
    assert run.process.returncode == 130 and rest[-1]["event"] == "cancelled"
    assert "closed the worker's input" in rest[-1]["message"]
    assert not out.exists()  # not even the output folder: it is created only when the outputs are written
    assert not run.log_path.parent.exists()


def test_killed_worker_is_reported_and_its_staging_removed(heldout_case, tmp_path):
    _, paths = heldout_case
    out = tmp_path / "out"
    run = WorkerRun(_request(paths, out, tasks=("gtv",))).start()
    _run_until(run, "gtv-inference")
    psutil.Process(run.process.pid).kill()  # SIGKILL on POSIX, TerminateProcess on Windows
    with pytest.raises(WorkerError, match="killed by SIGKILL") as caught:
        run.wait()
    assert "Last log lines:" in str(caught.value)
    assert not out.exists()  # nothing: no staging folder, no output folder


@pytest.mark.skipif(os.name == "nt", reason="SIGTERM to another process is a kill on Windows")
def test_sigterm_to_the_cli_stops_the_worker_and_removes_its_temp_folder(heldout_case, tmp_path):
    """Issue 20 finding 6: the CLI forwards SIGTERM to the worker's tree; no worker, staging or segrap-run-* is left."""
    _, paths = heldout_case
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    cli_proc = subprocess.Popen(
        [sys.executable, "-m", "SegRapSegmenterLib.cli", "segment", "--ct", str(paths.ct), "--tasks", "oar",
         "--out", str(out), "--bundle", "demo", "--device", "cpu", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp)})
    worker_pid = None
    for line in cli_proc.stdout:
        event = json.loads(line)
        worker_pid = event.get("pid", worker_pid)
        if event["event"] == "progress" and event["stage"].startswith("oar-inference"):
            break
    assert worker_pid is not None and list(tmp.glob("segrap-run-*"))
    cli_proc.send_signal(signal.SIGTERM)
    assert cli_proc.wait(timeout=60) == cli.EXIT_INTERRUPTED, cli_proc.stderr.read()
    assert "stopped by SIGTERM" in cli_proc.stderr.read()
    assert not psutil.pid_exists(worker_pid) or psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE
    assert list(tmp.iterdir()) == [] and not out.exists()


def test_structure_subset_runs_only_the_needed_task_and_low_memory_is_recorded(heldout_case, tmp_path, capsys):
    _, paths = heldout_case
    out = tmp_path / "out"
    rc = cli.main(["segment", "--ct", str(paths.ct), "--contrast-ct", str(paths.contrast_ct), "--out", str(out),
                   "--bundle", "demo", "--device", "cpu", "--structures", "gtv_p,GTVn", "--json", "--low-memory"])
    assert rc == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    stages = {e.get("stage") for e in events if e["event"] == "progress"}
    assert "gtv-inference" in stages and "oar-inference" not in stages
    from SegRapSegmenterLib.formats.segfile import read_seg_nrrd

    assert read_seg_nrrd(events[-1]["outputs"]["segmentation"]).segment_names == ["GTVp", "GTVnd"]
    record = json.loads(open(events[-1]["outputs"]["provenance"]).read())["inference"]["gtv"]
    assert record["low_memory"] is True and record["path"] == "frugal"
    assert record["body_found"] and 0 < record["box_fraction"] <= 1


def test_a_left_right_swap_is_warned_on_the_terminal_and_flagged_in_the_provenance(heldout_case, segment_run,
                                                                                      tmp_path, capsys):
    """A bundle that misdeclares its training orientation (LPS models labelled RPS) mirrors every input
    relative to its training data: the demo network then puts each left structure on the patient's right.
    A manifest that contradicts the orientation its training dataset recorded is refused; where both
    say RPS (a conversion that recorded it wrongly), the QA must say so, by name; the correct bundle's
    run on the same case must not."""
    from SegRapSegmenterLib.anatomy.qa import LATERALITY_WARNING
    from SegRapSegmenterLib.inference import bundles as models

    assert not [e for e in segment_run["events"] if e["event"] == "warning" and LATERALITY_WARNING in e["message"]]

    bundle = tmp_path / "misdeclared"
    shutil.copytree(models.DEMO_BUNDLE_PATH, bundle)
    manifest = json.loads((bundle / models.MANIFEST_NAME).read_text())
    assert manifest["tasks"]["oar"]["orientation"] == "LPS"
    manifest["tasks"]["oar"]["orientation"] = "RPS"
    (bundle / models.MANIFEST_NAME).write_text(json.dumps(manifest))
    _, paths = heldout_case
    out = tmp_path / "out"
    args = ["segment", "--ct", str(paths.ct), "--out", str(out), "--bundle", str(bundle), "--device", "cpu",
            "--structures", "Mandible_L,Mandible_R,TemporalLobe_L,TemporalLobe_R"]
    assert cli.main(args) == cli.EXIT_MODEL
    assert "left and right could come out swapped" in capsys.readouterr().err and not out.exists()

    dataset_path = bundle / "oar" / "dataset.json"
    dataset = json.loads(dataset_path.read_text())
    assert dataset[models.DATASET_ORIENTATION_KEY] == "LPS"
    dataset[models.DATASET_ORIENTATION_KEY] = "RPS"
    dataset_path.write_text(json.dumps(dataset))
    manifest["files"]["oar/dataset.json"] = models.sha256_file(dataset_path)
    (bundle / models.MANIFEST_NAME).write_text(json.dumps(manifest))
    rc = cli.main(args)
    assert rc == 0  # a warning, not a failure: the contours are there for the user to check
    err = capsys.readouterr().err
    assert "warning: Mandible_L lies to the patient's right of Mandible_R: " + LATERALITY_WARNING in err
    provenance = json.loads(next(out.glob("*.provenance.json")).read_text())
    assert "laterality" in provenance["structures"]["Mandible_L"]["flags"]
    assert "laterality" in provenance["structures"]["Mandible_R"]["flags"]


def _segment(*args) -> int:
    return cli.main(["segment", "--bundle", "demo", "--device", "cpu", *args])


def test_bad_inputs_give_specific_errors_and_exit_codes(heldout_case, tmp_path, capsys):
    _, paths = heldout_case
    out = tmp_path / "out"
    assert _segment("--ct", str(tmp_path / "missing.nii.gz"), "--tasks", "oar", "--out", str(out)) == cli.EXIT_INPUT
    assert "missing.nii.gz: no such file" in capsys.readouterr().err
    assert _segment("--ct", str(paths.ct), "--tasks", "gtv", "--out", str(out)) == cli.EXIT_INPUT
    assert "give --contrast-ct" in capsys.readouterr().err
    assert _segment("--ct", str(paths.ct), "--structures", "Spleen", "--out", str(out)) == cli.EXIT_INPUT
    assert "Unknown structure name 'Spleen'" in capsys.readouterr().err
    assert cli.main(["segment", "--ct", str(paths.ct), "--tasks", "oar", "--out", str(out),
                     "--bundle", "not-installed-model"]) == cli.EXIT_MODEL
    assert "not installed" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert _segment("--ct", str(paths.ct), "--tasks", "oar", "--out", str(blocker / "sub")) == cli.EXIT_OUTPUT
    assert "cannot be created" in capsys.readouterr().err
    assert _segment("--ct", str(paths.ct), "--tasks", "oar", "--rtstruct", "--out", str(out)) == cli.EXIT_INPUT
    assert "DICOM series folder" in capsys.readouterr().err
    assert not out.exists()  # refused runs leave no output folder behind


def test_cohort_selection_is_resumable_and_split_by_part(tmp_path):
    for name in ("segrap_0001", "segrap_0002", "segrap_0003"):
        (tmp_path / "in" / name).mkdir(parents=True)
        (tmp_path / "in" / name / "image.nii.gz").write_bytes(b"")
        (tmp_path / "in" / name / "image_contrast.nii.gz").write_bytes(b"")
    (tmp_path / "in" / "notes").mkdir()
    cases = cli._cohort_cases(tmp_path / "in", "1/1")
    assert [c[0] for c in cases] == ["segrap_0001", "segrap_0002", "segrap_0003"]
    assert [c[0] for c in cli._cohort_cases(tmp_path / "in", "2/2")] == ["segrap_0002"]
    assert cli.main(["segment", "--input-dir", str(tmp_path / "in"), "--part", "3/2", "--out", str(tmp_path)]) \
        == cli.EXIT_INPUT
    # finished cases are skipped: with every case done, nothing runs and the command succeeds
    for name in ("segrap_0001", "segrap_0002", "segrap_0003"):
        (tmp_path / "out" / name).mkdir(parents=True)
        (tmp_path / "out" / name / f"{name}.provenance.json").write_text("{}")
    assert cli.main(["segment", "--input-dir", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                     "--bundle", "demo"]) == 0


def test_worker_reports_an_invalid_request(tmp_path):
    bad = tmp_path / "request.json"
    bad.write_text("{not json")
    proc = subprocess.run([sys.executable, "-m", "SegRapSegmenterLib.worker", "--request", str(bad)],
                          capture_output=True, text=True, timeout=120)
    event = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 3 and event["event"] == "error" and "not a valid request" in event["message"]
