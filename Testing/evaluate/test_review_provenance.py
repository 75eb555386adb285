"""`segrap evaluate` reads each run's review flags from its provenance; one it cannot read is said (a warning naming
the file, the summary's review_flag.unreadable_provenance, the report), not silently left out of the figures."""

from __future__ import annotations

import json
import logging

import pytest
from SegRapSegmenterLib import cli
from SegRapSegmenterLib.evaluation import evaluate
from SegRapSegmenterLib.formats import segfile
from SegRapSegmenterLib.phantom import cases as phantom

FLAGS = {"GTVp": {"confidence": 0.91, "review": False}, "GTVnd": {"confidence": 0.42, "review": True}}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two small cases in the release layout, and per case the truth's tumours as a run's .seg.nrrd + provenance."""
    root = tmp_path_factory.mktemp("review_provenance")
    for index in (0, 1):
        case = phantom.make_case(index, seed=5, size="small")
        phantom.write_case(case, root / "release")
        segfile.write_seg_nrrd(root / "pred" / f"{case.case_id}.seg.nrrd", case.gtv_masks(), case.ct)
        (root / "pred" / f"{case.case_id}.provenance.json").write_text(json.dumps({"structures": FLAGS}))
    return root


def test_readable_provenance_gives_the_figures_and_no_warning(two_runs):
    result = evaluate.evaluate(two_runs / "pred", two_runs / "release", "gtv")
    flag = result.summary()["review_flag"]
    assert flag["structures"] == 4 and flag["unreadable_provenance"] == {}
    assert not any("provenance" in note for note in result.notes)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"structures": {"GTVp": {"confidence": "high", '
                                                                '"review": true}}}'])
def test_an_unreadable_provenance_is_warned_named_and_recorded(two_runs, tmp_path, content, caplog, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    for path in (two_runs / "pred").iterdir():
        pred.joinpath(path.name).write_bytes(path.read_bytes())
    broken = pred / "segrap_0001.provenance.json"
    broken.write_text(content)
    out = tmp_path / "evaluation"
    with caplog.at_level(logging.WARNING, logger="segrap.evaluate"):
        assert cli.main(["evaluate", "--pred", str(pred), "--ref", str(two_runs / "release"), "--out", str(out),
                         "--task", "gtv", "--no-plots"]) == cli.EXIT_OK
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(broken) in warnings[0] and "segrap_0001" in warnings[0]
    printed = capsys.readouterr().out
    assert "left out, their provenance unreadable (see Notes): segrap_0001" in printed and str(broken) in printed
    summary = json.loads((out / "summary.json").read_text())
    flag = summary["review_flag"]
    assert list(flag["unreadable_provenance"]) == ["segrap_0001"] and str(broken) in flag["unreadable_provenance"][
        "segrap_0001"]
    assert flag["structures"] == 2  # only segrap_0000's two tumours: the other case's flags are not guessed
    assert any(str(broken) in note for note in summary["notes"])
    assert "provenance unreadable (see Notes): segrap_0001" in (out / "report.md").read_text()


def test_only_unreadable_provenances_still_give_a_review_flag_entry(two_runs, tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    for path in (two_runs / "pred").glob("*.seg.nrrd"):
        pred.joinpath(path.name).write_bytes(path.read_bytes())
        pred.joinpath(path.name.replace(".seg.nrrd", ".provenance.json")).write_bytes(b"\xff\xfe not utf-8")
    flag = evaluate.evaluate(pred, two_runs / "release", "gtv").summary()["review_flag"]
    assert flag is not None and sorted(flag["unreadable_provenance"]) == ["segrap_0000", "segrap_0001"]
    assert flag["structures"] == 0 and flag["auc"] is None


def test_a_run_without_provenance_or_flags_has_no_review_entry(two_runs, tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    for path in (two_runs / "pred").glob("*.seg.nrrd"):
        pred.joinpath(path.name).write_bytes(path.read_bytes())
    pred.joinpath("segrap_0000.provenance.json").write_text(json.dumps({"tool": "an older segrap"}))
    result = evaluate.evaluate(pred, two_runs / "release", "gtv")
    assert result.summary()["review_flag"] is None and result.unreadable_provenance == {}
