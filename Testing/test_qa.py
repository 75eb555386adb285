"""QA of a finished segmentation: a left structure on the patient's right of its partner is flagged and warned about."""

from __future__ import annotations

from SegRapSegmenterLib.anatomy.qa import LATERALITY_WARNING, laterality_warnings, structure_report
from SegRapSegmenterLib.arrays import CroppedMasks
from SegRapSegmenterLib.phantom import cases as phantom


def test_swapped_pair_is_flagged_and_warned_and_a_correct_one_is_not():
    case = phantom.make_case(0, seed=5, size="small", direction="flipped")  # stored right-to-left
    masks = CroppedMasks.of(case.oar_masks())
    report, warnings = structure_report(masks, case.ct)
    assert not any("laterality" in entry["flags"] for entry in report.values())
    assert laterality_warnings(warnings) == []

    left, right = masks.crop("Parotid_L"), masks.crop("Parotid_R")
    masks.put("Parotid_L", *right)
    masks.put("Parotid_R", *left)
    report, warnings = structure_report(masks, case.ct)
    assert "laterality" in report["Parotid_L"]["flags"] and "laterality" in report["Parotid_R"]["flags"]
    flagged = [n for n, entry in report.items() if "laterality" in entry["flags"]]
    assert sorted(flagged) == ["Parotid_L", "Parotid_R"]
    swapped = laterality_warnings(warnings)
    assert len(swapped) == 1 and swapped[0].startswith("Parotid_L lies to the patient's right of Parotid_R")
    assert LATERALITY_WARNING in swapped[0]


def test_empty_structures_are_warned_but_are_not_laterality_warnings():
    case = phantom.make_case(0, seed=5, size="small")
    masks = CroppedMasks.of(case.oar_masks())
    box, data = masks.crop("Lens_L")
    masks.put("Lens_L", box, data & False)
    report, warnings = structure_report(masks, case.ct)
    assert report["Lens_L"]["flags"] == ["empty"] and report["Lens_L"]["voxels"] == 0
    assert any(w.startswith("Lens_L: empty") for w in warnings)
    assert laterality_warnings(warnings) == []
