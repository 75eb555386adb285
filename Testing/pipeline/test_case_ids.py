"""Case ids are names, never paths (issue 20): refused in the CLI, the batch mode, the worker and the runner,
and the worker's staging folder must be one of ours inside the output folder (it is deleted afterwards)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from SegRapSegmenterLib import cli
from SegRapSegmenterLib.errors import InputError
from SegRapSegmenterLib.pipeline import SegmentRequest, check_case_id, is_staging_of, request_paths
from SegRapSegmenterLib.runner import WorkerRun


@pytest.fixture()
def victim(tmp_path) -> Path:
    """A folder beside the output folder that a path-like case id would reach."""
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    return folder


def _intact(victim: Path) -> bool:
    return (victim / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("case_id", ["x/../../victim", "../victim", "..", ".", ".segrap-partial-x", "a\\b", "C:x",
                                     "a\nb", " padded", ""])
def test_path_like_case_ids_are_refused(case_id):
    with pytest.raises(InputError, match="is not a plain name"):
        check_case_id(case_id)


@pytest.mark.parametrize("case_id", ["segrap_0001", "Patient 7", "HN-2023.01", "病例1"])
def test_plain_names_pass(case_id):
    assert check_case_id(case_id) == case_id


def test_cli_refuses_a_path_like_case_id_before_starting_anything(tmp_path, victim, written_case, capsys):
    out = tmp_path / "out" / "a"
    rc = cli.main(["segment", "--ct", str(written_case.ct), "--out", str(out), "--case-id", "x/../../../victim",
                   "--bundle", "demo", "--tasks", "oar"])
    assert rc == cli.EXIT_INPUT and "--case-id 'x/../../../victim' is not a plain name" in capsys.readouterr().err
    assert _intact(victim) and not out.exists()


def test_runner_refuses_a_path_like_case_id(tmp_path, victim):
    request = SegmentRequest(ct="ct.nii.gz", out_dir=str(tmp_path / "out" / "a"), case_id="x/../../../victim")
    with pytest.raises(InputError, match="is not a plain name"):
        WorkerRun(request)
    assert _intact(victim)


def test_batch_mode_refuses_a_case_folder_whose_name_is_not_plain(tmp_path, capsys):
    cohort = tmp_path / "cohort"
    (cohort / "bad\x01name").mkdir(parents=True)
    (cohort / "bad\x01name" / "image.nii.gz").write_bytes(b"")
    rc = cli.main(["segment", "--input-dir", str(cohort), "--out", str(tmp_path / "out"), "--bundle", "demo"])
    assert rc == cli.EXIT_INPUT and "is not a plain name" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


STAGING_NOT_OURS = ["{victim}", "{out}", "{out}/sub/.segrap-partial-x", "{out}/../victim", "{out}/not-ours"]


def _staging_request(tmp_path: Path, victim: Path, staging: str) -> SegmentRequest:
    """A request whose staging_dir is ``staging``, beside an earlier result and a staging-like folder deeper down."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.seg.nrrd").write_text("an earlier result")
    (out / "sub" / ".segrap-partial-x").mkdir(parents=True)
    return SegmentRequest(ct=str(tmp_path / "ct.nii.gz"), out_dir=str(out), case_id="case",
                          staging_dir=staging.format(victim=victim, out=out))


def _nothing_deleted(tmp_path: Path, victim: Path) -> bool:
    out = tmp_path / "out"
    return _intact(victim) and (out / "earlier.seg.nrrd").is_file() and (out / "sub" / ".segrap-partial-x").is_dir()


@pytest.mark.parametrize("staging", STAGING_NOT_OURS)
def test_a_staging_dir_that_is_not_the_runs_own_is_refused(tmp_path, victim, staging):
    """Each way a staging folder is not ours (outside, the output folder itself, deeper, through .., another name):
    ``request_paths``, which the worker calls before it remembers a folder to delete, refuses it."""
    with pytest.raises(InputError, match="staging_dir .* refused"):
        request_paths(_staging_request(tmp_path, victim, staging))
    assert _nothing_deleted(tmp_path, victim)


def test_worker_refuses_a_staging_dir_that_is_not_its_own_and_deletes_nothing(tmp_path, victim):
    """The real worker process on one of those requests (each of them is refused in the same call, above)."""
    path = tmp_path / "request.json"
    path.write_text(json.dumps(asdict(_staging_request(tmp_path, victim, STAGING_NOT_OURS[0]))))
    proc = subprocess.run([sys.executable, "-m", "SegRapSegmenterLib.worker", "--request", str(path)],
                          capture_output=True, text=True, timeout=300)
    event = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 3 and event["event"] == "error" and "staging_dir" in event["message"]
    assert _nothing_deleted(tmp_path, victim)


def test_the_default_staging_folder_is_inside_the_output_folder_and_unique_per_run(tmp_path):
    request = SegmentRequest(ct=str(tmp_path / "scans" / "p1.nii.gz"), out_dir=str(tmp_path / "out"))
    case_id, staging = request_paths(request)
    assert case_id == "p1" and staging.parent == tmp_path / "out" and staging.name.startswith(".segrap-partial-p1.")
    assert request_paths(request)[1] != staging  # issue 31: two runs never share a staging folder
    assert is_staging_of(staging.name, "p1") and not is_staging_of(staging.name, "p") \
        and not is_staging_of(staging.name.replace("p1", "p1.x", 1), "p1")
    request.staging_dir = str(staging)
    assert request_paths(request) == (case_id, staging)
