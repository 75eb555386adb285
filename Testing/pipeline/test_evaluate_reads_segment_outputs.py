"""Issue 31: `segrap evaluate` reads what `segrap segment` writes (one case, a cohort, with --nifti and --rtstruct),
DICOM runs are named after their study so the phantom's truth matches, and a failed evaluation leaves no folder."""

from __future__ import annotations

import os
import shutil
import stat

import pytest
from SegRapSegmenterLib import cli
from SegRapSegmenterLib.errors import InputError
from SegRapSegmenterLib.evaluation import evaluate
from SegRapSegmenterLib.formats.dicom import study_case_id
from SegRapSegmenterLib.node.spool import case_id_for


def _release(segment_run):
    return segment_run["paths"].folder.parent  # SegRapPhantom_Set: the held-out truth, case segrap_0000


def test_one_cases_output_folder_with_nifti_is_one_case(segment_run):
    assert segment_run["returncode"] == 0
    names = {p.name for p in segment_run["out"].iterdir()}
    assert {"segrap_0000_structures", "segrap_0000_oar_4d.mha"} <= names  # four readable sets of one case
    result = evaluate.evaluate(segment_run["out"], _release(segment_run))
    assert result.cases == ["segrap_0000"] and not result.prediction_only
    assert len(result.rows) == 47 and result.formats["prediction"] == {"seg.nrrd"}


def test_a_cohorts_output_folder_is_read_case_by_case(segment_run, tmp_path):
    cohort = tmp_path / "cohort"
    shutil.copytree(segment_run["out"], cohort / "segrap_0000")
    result = evaluate.evaluate(cohort, _release(segment_run))
    assert result.cases == ["segrap_0000"] and len(result.rows) == 47


def test_a_failed_evaluation_leaves_no_folder_and_reports_are_readable_by_others(segment_run, tmp_path, capsys):
    out = tmp_path / "new" / "evaluation"
    assert cli.main(["evaluate", "--pred", str(segment_run["out"]), "--ref", str(tmp_path / "missing"),
                     "--out", str(out)]) == cli.EXIT_INPUT
    assert not (tmp_path / "new").exists()
    capsys.readouterr()
    assert cli.main(["evaluate", "--pred", str(segment_run["out"]), "--ref", str(_release(segment_run)),
                     "--out", str(out), "--no-plots"]) == cli.EXIT_OK
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == dict.fromkeys(["scores.csv", "summary.json", "report.md"], 0o666 & ~umask)


def test_a_dicom_run_is_named_after_its_study_and_the_phantoms_truth_matches(tmp_path, capsys):
    phantom = tmp_path / "phantom"
    assert cli.main(["dicom-phantom", "--out", str(phantom), "--index", "1", "--seed", "99", "--masks"]) == 0
    truth = next(phantom.glob("*.seg.nrrd"))
    out = tmp_path / "out"
    rc = cli.main(["segment", "--ct", str(phantom / "CT"), "--contrast-ct", str(phantom / "CT_contrast"),
                   "--tasks", "gtv", "--rtstruct", "--out", str(out), "--bundle", "demo", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    case_id = truth.name[: -len(".seg.nrrd")]
    assert case_id.startswith("study-") and (out / f"{case_id}_RTSTRUCT.dcm").is_file()
    from SegRapSegmenterLib.formats.dicom import series_case_id

    assert series_case_id(phantom / "CT") == case_id  # not "phantom", the CT folder's parent
    result = evaluate.evaluate(out, phantom)  # the CT series beside the truth are images, not cases
    assert result.cases == [case_id] and [r.structure for r in result.rows] == ["GTVp", "GTVnd"]
    assert all(r.score.dsc > 0.5 for r in result.rows), [(r.structure, r.score.dsc) for r in result.rows]
    with pytest.raises(InputError, match="give the folder that holds both"):
        evaluate.evaluate(out / f"{case_id}_RTSTRUCT.dcm", phantom)


def test_the_study_case_id_is_the_nodes():
    assert study_case_id("1.2.826.0.1.3680043.8.498.1") == case_id_for("1.2.826.0.1.3680043.8.498.1")


def test_a_case_file_beside_a_segment_output_set_is_read_too(segment_run, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(segment_run["out"], mixed)
    shutil.copy(segment_run["out"] / "segrap_0000.seg.nrrd", mixed / "other.seg.nrrd")  # no provenance: a plain file
    result = evaluate.evaluate(mixed, _release(segment_run))
    assert result.cases == ["segrap_0000"] and result.prediction_only == ["other"]  # said, not dropped
