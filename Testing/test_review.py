"""The per-structure review: confidence in [0, 1], the flag and its reasons from each signal, the summary line and the
segment tags."""

from __future__ import annotations

from SegRapSegmenterLib.anatomy.review import (CERTAINTY_REVIEW_BELOW, REASONS_TAG, REVIEW_TAG, Review, review_structure,
                                               review_tags, summary_line)


def _review(**changes) -> Review:
    signals = dict(voxels=500, flags=[], certainty=0.97, removed_fraction=0.0, volume_ml=2.0, volume_range_ml=None)
    signals.update(changes)
    return review_structure(**signals)


def test_a_certain_whole_structure_is_not_flagged():
    review = _review()
    assert review.review is False and review.reasons == [] and review.confidence == 0.97


def test_an_empty_structure_has_confidence_zero_and_says_empty():
    review = _review(voxels=0, certainty=None)
    assert (review.confidence, review.review, review.reasons) == (0.0, True, ["empty"])


def test_low_certainty_is_a_reason_with_the_expected_dice():
    review = _review(certainty=CERTAINTY_REVIEW_BELOW - 0.2)
    assert review.review and review.reasons == [f"low network certainty (expected Dice {CERTAINTY_REVIEW_BELOW - 0.2:.2f})"]


def test_a_large_post_processing_loss_is_a_reason_and_lowers_the_confidence():
    review = _review(removed_fraction=0.44)
    assert review.reasons == ["44% removed by post-processing"]
    assert abs(review.confidence - 0.97 * 0.56) < 1e-9
    assert _review(removed_fraction=0.05).review is False  # a few stray voxels are not worth a look


def test_left_right_order_caps_the_confidence_and_an_implausible_volume_is_a_reason():
    swapped = _review(flags=["laterality"])
    assert swapped.reasons == ["left/right order"] and swapped.confidence <= 0.25
    big = _review(volume_ml=30.0, volume_range_ml=(1.0, 3.0))
    assert big.review and big.reasons[0].startswith("volume 15.0x") and big.confidence == 0.97  # a reason only
    assert _review(volume_ml=0.5, volume_range_ml=(1.0, 3.0)).review
    assert _review(volume_ml=2.5, volume_range_ml=(1.0, 3.0)).review is False


def test_the_summary_line_names_the_least_confident_first_or_says_none():
    reviews = {"Brain": _review(), "Lens_L": _review(voxels=0), "Parotid_L": _review(removed_fraction=0.3)}
    assert summary_line(reviews) == ("review 2 of 3 structures: Lens_L (empty); "
                                     "Parotid_L (30% removed by post-processing)")
    assert summary_line({"Brain": _review()}) == "no structure flagged for review"
    many = {f"S{k}": _review(voxels=0) for k in range(10)}
    assert summary_line(many).endswith("(reasons in the provenance and the segment tags)")


def test_segment_tags_hold_the_flag_confidence_and_reasons_without_the_tag_separator():
    structures = {"Brain": {**_review().record()},
                  "Lens_L": {**_review(voxels=0).record()},
                  "Odd": {"confidence": 0.1, "review": True, "review_reasons": ["a|b"]}}
    tags = review_tags(structures)
    assert tags["Brain"] == {REVIEW_TAG: "0", "SegRap.Confidence": "0.970"}
    assert tags["Lens_L"][REVIEW_TAG] == "1" and tags["Lens_L"][REASONS_TAG] == "empty"
    assert tags["Odd"][REASONS_TAG] == "a|b"  # the writer replaces '|' (Slicer's tag separator)


def test_a_little_uncertainty_and_a_little_clean_up_together_are_a_reason():
    review = _review(certainty=0.93, removed_fraction=0.08)
    assert review.review and review.reasons == ["low confidence (expected Dice 0.93, 8% removed by post-processing)"]


def test_a_contour_mostly_outside_the_body_is_a_reason():
    review = _review(outside_fraction=0.8)
    assert review.reasons == ["80% outside the body"] and review.confidence <= 0.2
    assert _review(outside_fraction=0.3).review is False
