"""The review figures `segrap evaluate` and bench_quality report: AUC, sensitivity and false flags, by hand."""

from __future__ import annotations

from SegRapSegmenterLib.evaluation.quality import Reviewed, auc_for_bad, review_figures


def _row(dsc: float, confidence: float, review: bool, absent: bool = False) -> Reviewed:
    return Reviewed("c", "S", dsc, confidence, review, absent)


def test_auc_counts_pairs_and_ties_half():
    rows = [_row(0.1, 0.2, True), _row(0.3, 0.9, False), _row(0.95, 0.8, False), _row(0.7, 0.9, False)]
    # bad confidences 0.2 and 0.9 against good 0.8 and 0.9: 0.2<0.8, 0.2<0.9, 0.9>0.8, 0.9=0.9 -> 2.5 of 4
    assert auc_for_bad(rows) == 2.5 / 4
    assert auc_for_bad([_row(0.95, 0.8, False)]) is None


def test_sensitivity_false_flags_and_absent_structures_left_out():
    rows = [_row(0.1, 0.2, True), _row(0.4, 0.6, False), _row(0.95, 0.97, False), _row(0.92, 0.5, True),
            _row(1.0, 0.0, True, absent=True)]
    figures = review_figures(rows)
    assert figures["sensitivity"] == 0.5 and figures["false_flags"] == 0.5
    assert figures["structures"] == 4 and figures["absent_left_out"] == 1 and figures["dsc_below_0.5"] == 2
